"""Tokenizer kinds: trained on train only, padding id 0, and every option honoured."""

from __future__ import annotations

import json

import pytest

from conftest import make_examples, write_csv
from nlprnn.data.datamodule import TextDataModule
from nlprnn.data.tokenizer import PAD, UNK, TokenizerConfig, load_tokenizer, train_tokenizer
from nlprnn.errors import UserError

KINDS = ["wordlevel", "wordpiece", "bpe", "unigram"]
TEST_ONLY = "zyzzyva 4711 ǭǯ"  # a word, digits and letters that no training text has


@pytest.fixture
def train_and_test(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_examples(80))
    test = write_csv(tmp_path / "test.csv", [{"text": f"{TEST_ONLY} good", "label": "positive"}] * 6)
    return train, test


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_trained_on_the_training_split_only(kind, train_and_test):
    train, test = train_and_test
    config = TokenizerConfig(kind=kind, vocab_size=2000)
    data = TextDataModule(train_file=str(train), validation_file=str(train), test_file=str(test), tokenizer=config)
    data.prepare()
    vocab = data.tokenizer().get_vocab()
    # Even a subword alphabet holds no character that only the test split has.
    assert not set("4711ǭǯ") & set("".join(vocab)), sorted(vocab)
    assert "zyzzyva" not in vocab
    if kind == "wordlevel":  # deterministic: exactly the vocabulary of the training texts alone
        assert vocab == train_tokenizer([row["text"] for row in make_examples(80)], config).get_vocab()
    assert (data.pad_id, vocab[PAD], vocab[UNK]) == (0, 0, 1)
    batch = next(iter(data.test_dataloader()))
    for row, length in zip(batch["input_ids"], batch["lengths"]):
        assert (row[length:] == 0).all() and (row[:length] != 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_caps_the_vocabulary(kind):
    texts = [f"word{i} word{i % 7} common" for i in range(400)]
    small = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=60))
    large = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=2000))
    assert small.get_vocab_size() <= 60 < large.get_vocab_size()


@pytest.mark.parametrize("kind", ["wordlevel", "wordpiece", "bpe"])
def test_min_frequency_keeps_rare_words_out(kind):
    texts = ["the cat sat on the mat"] * 5 + ["onceword appears here"]
    kept = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=300, min_frequency=1)).get_vocab()
    dropped = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=300, min_frequency=2)).get_vocab()
    assert "onceword" in kept and "onceword" not in dropped
    assert "cat" in dropped


def test_unigram_refuses_min_frequency():
    with pytest.raises(UserError, match="min_frequency does not apply to unigram"):
        train_tokenizer(["a b c"], TokenizerConfig(kind="unigram", min_frequency=2))


@pytest.mark.parametrize("kind", KINDS)
def test_lowercase_folds_case_or_keeps_it(kind):
    texts = ["Great film", "great film", "GREAT acting"] * 20
    folded = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=100, lowercase=True))
    kept = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=100, lowercase=False))
    assert folded.encode("Great").ids == folded.encode("great").ids == folded.encode("GREAT").ids
    assert kept.encode("Great").ids != kept.encode("great").ids


@pytest.mark.parametrize("kind", KINDS)
def test_max_length_cuts_counts_and_is_saved(kind, tmp_path):
    rows = make_examples(60)
    rows[0]["text"] = " ".join(["good film"] * 40)  # 80 words
    path = write_csv(tmp_path / "long.csv", rows)
    data = TextDataModule(train_file=str(path), tokenizer=TokenizerConfig(kind=kind, vocab_size=100), max_length=12)
    data.prepare()
    longest = max(int(data.splits[s].with_format("numpy")[:]["length"].max()) for s in data.splits)
    assert longest == 12
    meta = json.loads((data.prepared_dir / "meta.json").read_text())
    assert sum(meta["truncated"].values()) >= 1  # the long row; short generated rows may reach 12 tokens too
    assert len(data.tokenizer().encode(rows[0]["text"]).ids) == 12  # serving cuts the same way


def test_an_existing_tokenizer_file_is_used_as_it_is(tmp_path, tiny_csv):
    own = train_tokenizer(["alpha beta gamma delta"] * 3, TokenizerConfig(vocab_size=50))
    own.save(str(tmp_path / "tokenizer.json"))
    data = TextDataModule(train_file=str(tiny_csv), tokenizer=TokenizerConfig(file=str(tmp_path / "tokenizer.json")))
    data.prepare()
    assert data.tokenizer().get_vocab() == own.get_vocab()
    assert data.vocab_size == own.get_vocab_size()


def test_a_tokenizer_file_without_padding_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(UserError, match=r"has no \[PAD\] token"):
        load_tokenizer(tmp_path / "t.json")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_digits_makes_numbers_of_one_shape_one_token_sequence(kind):
    texts = ["call 0800 123 456 now", "win 500 pounds", "ring 0911 555 222"] * 20
    zeroed = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=200, zero_digits=True))
    kept = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=200))
    assert zeroed.encode("call 0711 987 654").ids == zeroed.encode("call 0800 123 456").ids
    assert kept.encode("call 0711 987 654").ids != kept.encode("call 0800 123 456").ids


def test_a_tokenizer_file_saved_with_padding_pads_nothing(tmp_path, tiny_csv):
    own = train_tokenizer(["alpha beta gamma delta"] * 3, TokenizerConfig(vocab_size=50))
    own.enable_padding(length=32, pad_id=own.token_to_id(PAD), pad_token=PAD)
    own.save(str(tmp_path / "tokenizer.json"))
    data = TextDataModule(train_file=str(tiny_csv), tokenizer=TokenizerConfig(file=str(tmp_path / "tokenizer.json")))
    data.prepare()
    lengths = [n for s in data.splits.values() for n in s["length"]]
    assert 4 <= min(lengths) and max(lengths) <= 10  # one token per word: texts hold 4 to 10 words, none padded
    assert not any(data.pad_id in ids for s in data.splits.values() for ids in s["input_ids"])
    assert json.loads(data.tokenizer_file.read_text())["padding"] is None  # what is saved pads nothing either
    assert data.tokenizer().encode("alpha beta").ids == own.encode("alpha beta").ids[:2]


def test_a_tokenizer_file_that_adds_special_tokens_cuts_texts_as_the_bundle_does(tmp_path):
    """[CLS] text [SEP]: a long text keeps its [SEP], in training as in serving, and is counted as cut."""
    from tokenizers import processors

    own = train_tokenizer(["alpha beta gamma delta"] * 3, TokenizerConfig(vocab_size=50))
    own.add_special_tokens(["[CLS]", "[SEP]"])
    own.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, own.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    own.save(str(tmp_path / "tokenizer.json"))
    rows = [{"text": "alpha beta gamma delta alpha beta", "label": "a"}, {"text": "alpha beta", "label": "b"}] * 4
    train = write_csv(tmp_path / "train.csv", rows)
    data = TextDataModule(train_file=str(train), validation_file=str(train), test_file=str(train), max_length=5,
                          tokenizer=TokenizerConfig(file=str(tmp_path / "tokenizer.json")))
    data.prepare()
    cls, sep = own.token_to_id("[CLS]"), own.token_to_id("[SEP]")
    long, short = data.splits["train"]["input_ids"][:2]
    assert long == data.tokenizer().encode(rows[0]["text"]).ids and long[0] == cls and long[-1] == sep
    assert len(long) == 5 and short == [cls, *own.encode("alpha beta").ids[1:-1], sep]
    assert json.loads((data.prepared_dir / "meta.json").read_text())["truncated"]["train"] == 4

