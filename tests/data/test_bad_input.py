"""Bad input is repaired and counted, dropped and counted, or refused with the rows named; never silent."""

from __future__ import annotations

import codecs
import json
import logging

import pytest

from conftest import make_examples, write_csv
from nlprnn.data.cleaning import repair_utf8
from nlprnn.data.datamodule import TextDataModule
from nlprnn.data.sources import SourceSpec, load_splits
from nlprnn.errors import UserError


def labelled_rows(splits) -> list[tuple[str, str]]:
    names = splits["train"].features["label"].names
    return [(t, names[y]) for split in splits.values() for t, y in zip(split["text"], split["label"])]


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
    path = write_csv(tmp_path / "latin1.csv", make_examples(40))
    raw = path.read_bytes()
    raw += b"caf\xe9 cr\xe8me was good,positive\n"  # Latin-1 bytes: two invalid sequences
    raw += b"\xff\xfe bad bytes,negative\n"  # two more: each byte that starts no sequence counts once
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING):
        splits = load_splits(SourceSpec(train_file=str(path)))
    texts = [t for s in splits.values() for t in s["text"]]
    assert "caf\ufffd cr\ufffdme was good" in texts
    assert "\ufffd\ufffd bad bytes" in texts
    assert f"replaced 4 invalid UTF-8 byte sequence(s) in {path}" in warnings_of(caplog)


def test_valid_utf8_is_read_in_place(tmp_path):
    path = write_csv(tmp_path / "ok.csv", [{"text": "naïve café ☕", "label": "positive"}])
    assert repair_utf8(path) == (path, 0)


def test_repairs_are_made_once_per_file_version(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"text\tlabel\nfine \x80 text\tpositive\n")
    first = repair_utf8(path)
    assert first[1] == 1 and first[0] != path and b"\xef\xbf\xbd" in first[0].read_bytes()
    assert repair_utf8(path) == first


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_file_with_its_byte_order_mark_is_read_as_utf16(tmp_path, caplog, encoding):
    """As Excel saves "Unicode text": UTF-16 with a byte order mark, tab-separated."""
    rows = [(f"café {i} ☕", "positive" if i % 2 else "negative") for i in range(40)]
    text = "text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows)
    path = tmp_path / "excel.tsv"
    path.write_bytes((codecs.BOM_UTF16_BE if encoding.endswith("be") else b"") + text.encode(encoding))
    with caplog.at_level(logging.INFO):
        splits = load_splits(SourceSpec(train_file=str(path)))
    assert sorted(labelled_rows(splits)) == sorted(rows)
    assert f"{path} is UTF-16 (it starts with a byte order mark): read as such" in caplog.text
    assert "replaced" not in warnings_of(caplog)


def test_two_runs_repair_one_file_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "big.tsv"
    path.write_bytes(b"text\tlabel\n" + b"caf\xe9 cr\xe8me\tpositive\n" * 200_000)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(repair_utf8, [path, path]))
    assert results[0] == results[1] and results[0][1] == 400_000
    assert results[0][0].read_bytes() == path.read_bytes().replace(b"\xe9", "\ufffd".encode()).replace(b"\xe8", "\ufffd".encode())


def test_empty_and_whitespace_texts_are_dropped_with_a_count(tmp_path, caplog):
    rows = make_examples(40) + [{"text": "", "label": "positive"}, {"text": "  \t ", "label": "negative"}]
    rows.append({"text": "\u00a0\u2003", "label": "positive"})  # Unicode spaces only
    path = write_csv(tmp_path / "blanks.csv", rows)
    with caplog.at_level(logging.WARNING):
        splits = load_splits(SourceSpec(train_file=str(path)))
    assert sum(len(s) for s in splits.values()) == 40
    assert "dropped 3 empty or whitespace-only text(s) from the train split" in warnings_of(caplog)


def test_texts_over_max_length_are_cut_and_counted(tmp_path, caplog):
    rows = make_examples(40)
    for row in rows[:3]:
        row["text"] = " ".join(["good"] * 30)
    path = write_csv(tmp_path / "long.csv", rows)
    data = TextDataModule(train_file=str(path), max_length=20)
    with caplog.at_level(logging.WARNING):
        data.prepare()
    meta = json.loads((data.prepared_dir / "meta.json").read_text())
    assert sum(meta["truncated"].values()) == 3
    assert all(int(data.splits[s].with_format("numpy")[:]["length"].max()) <= 20 for s in data.splits)
    assert "to max_length=20 tokens" in warnings_of(caplog)


@pytest.mark.parametrize("labels", ["strings", "integers"])
def test_rows_without_a_label_are_refused_by_row_number(tmp_path, labels):
    rows = [{"text": f"text {i}", "label": ("positive" if i % 2 else "negative") if labels == "strings" else str(i % 3)}
            for i in range(30)]
    for i in (4, 11, 12, 13, 14, 15, 20):
        rows[i]["label"] = ""
    path = write_csv(tmp_path / "unlabeled.csv", rows)
    with pytest.raises(UserError) as err:
        load_splits(SourceSpec(train_file=str(path)))
    assert f"{path} has 7 row(s) with no label, the first at data row(s) 5, 12, 13, 14, 15;" in str(err.value)


def test_jsonl_null_labels_are_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": f"t {i}", "label": None if i == 2 else "a"}) for i in range(5)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="1 row\\(s\\) with no label, the first at data row\\(s\\) 3;"):
        load_splits(SourceSpec(train_file=str(path)))
