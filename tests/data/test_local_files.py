"""Local CSV/TSV/JSON/Parquet files: deterministic stratified splits, label lists fixed by train, bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import make_examples, write_csv
from nlprnn.data.datamodule import TextDataModule
from nlprnn.data.sources import SourceSpec, load_splits
from nlprnn.errors import UserError


def test_split_is_80_10_10_stratified_and_deterministic(tiny_csv):
    spec = SourceSpec(train_file=str(tiny_csv))
    a, b = load_splits(spec), load_splits(spec)
    assert {s: len(a[s]) for s in a} == {"train": 160, "validation": 20, "test": 20}
    for split in a:
        assert a[split]["text"] == b[split]["text"]
        assert Counter(a[split]["label"]) == {0: len(a[split]) // 2, 1: len(a[split]) // 2}
    seen = set(a["train"]["text"])
    assert not seen & set(a["test"]["text"]) or len(seen) < 160  # duplicates only where the generator repeats
    other = load_splits(SourceSpec(train_file=str(tiny_csv), split_seed=7))
    assert other["test"]["text"] != a["test"]["text"]


def test_labels_come_from_train_in_sorted_order(tmp_path):
    rows = [{"text": f"text {i}", "label": str(label)} for i, label in enumerate([10, 2, 2, 10, 3, 3] * 5)]
    path = write_csv(tmp_path / "ints.csv", rows)
    splits = load_splits(SourceSpec(train_file=str(path)))
    names = splits["train"].features["label"].names
    assert names == ["2", "3", "10"]  # integer labels sort numerically
    row = splits["train"][0]
    assert row["text"] in {r["text"] for r in rows}
    original = {r["text"]: r["label"] for r in rows}
    for split in splits.values():
        for text, label in zip(split["text"], split["label"]):
            assert names[label] == original[text]


@pytest.mark.parametrize("suffix", [".tsv", ".json", ".jsonl", ".parquet"])
def test_every_file_format_reads_the_same(tmp_path, suffix):
    import pandas as pd

    rows = make_examples(40)
    frame = pd.DataFrame(rows).rename(columns={"text": "body", "label": "stars"})
    path = tmp_path / f"data{suffix}"
    {".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".json": lambda: frame.to_json(path, orient="records"),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    splits = load_splits(SourceSpec(train_file=str(path), text_column="body", label_column="stars"))
    assert sum(len(s) for s in splits.values()) == 40
    assert splits["train"].features["label"].names == ["negative", "positive"]


def test_given_validation_and_test_files_are_used_as_they_are(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_examples(60))
    val = write_csv(tmp_path / "val.csv", make_examples(8, seed=1))
    splits = load_splits(SourceSpec(train_file=str(train), validation_file=str(val)))
    assert len(splits["validation"]) == 8
    assert len(splits["train"]) + len(splits["test"]) == 60


def test_data_module_caches_tokenized_splits_and_links_what_the_data_knows(tiny_csv):
    data = TextDataModule(train_file=str(tiny_csv), batch_size=16)
    data.prepare()
    assert (data.num_classes, data.pad_id, data.labels) == (2, 0, ["negative", "positive"])
    assert 20 < data.vocab_size < 60
    prepared = data.prepared_dir
    stamp = (prepared / "meta.json").stat().st_mtime_ns
    again = TextDataModule(train_file=str(tiny_csv), batch_size=16)
    again.prepare_data()
    assert (prepared / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert json.loads((prepared / "meta.json").read_text())["sizes"] == {"train": 160, "validation": 20, "test": 20}
    batch = next(iter(again.train_dataloader()))
    assert batch["input_ids"].shape[0] == batch["lengths"].shape[0] == batch["labels"].shape[0] <= 16
    assert int(batch["lengths"].max()) == batch["input_ids"].shape[1]
    for row, length in zip(batch["input_ids"], batch["lengths"]):
        assert (row[length:] == 0).all() and (row[:length] != 0).all()


def test_reading_the_data_before_preparing_it_is_an_error(tiny_csv):
    data = TextDataModule(train_file=str(tiny_csv))
    with pytest.raises(RuntimeError, match=r"call prepare\(\) first"):
        data.vocab_size  # noqa: B018
    with pytest.raises(RuntimeError, match=r"call prepare\(\) first"):
        data.setup()
    assert not data.prepared_dir.exists()  # reading prepared nothing
    data.prepare()
    assert data.num_classes == 2 and data.vocab_size > 2


def test_tokenizer_is_trained_on_train_only(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_examples(60))
    test_rows = [{"text": "zyzzyva unseenword", "label": "positive"}] * 4
    test = write_csv(tmp_path / "test.csv", test_rows)
    data = TextDataModule(train_file=str(train), test_file=str(test))
    data.prepare()
    vocab = data.tokenizer().get_vocab()
    assert "zyzzyva" not in vocab and "unseenword" not in vocab


def bad(tmp_path, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        load_splits(SourceSpec(**kwargs))
    return str(err.value)


def test_missing_file(tmp_path):
    assert "file not found" in bad(tmp_path, train_file=str(tmp_path / "nope.csv"))


def test_missing_column_names_the_columns_there(tmp_path, tiny_csv):
    message = bad(tmp_path, train_file=str(tiny_csv), text_column="review")
    assert "no column 'review'" in message and "columns are text, label" in message


def test_unseen_label_in_test(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_examples(40))
    test = write_csv(tmp_path / "test.csv", [{"text": "meh", "label": "neutral"}])
    message = bad(tmp_path, train_file=str(train), test_file=str(test))
    assert "test split has label(s) 'neutral'" in message


def test_empty_split(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_examples(40))
    empty = write_csv(tmp_path / "val.csv", [{"text": "   ", "label": "positive"}])
    assert "validation split is empty" in bad(tmp_path, train_file=str(train), validation_file=str(empty))


def test_unknown_dataset_name_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = bad(tmp_path, dataset="no-such-dataset")
    assert "'no-such-dataset' is not built in" in message and "movie-snippets" in message


def test_training_data_with_one_label_is_refused(tmp_path):
    path = write_csv(tmp_path / "pos.csv", [{"text": f"fine film {i}", "label": "pos"} for i in range(30)])
    message = bad(tmp_path, train_file=str(path))
    assert "only one label, 'pos'" in message and "30 example(s)" in message and "at least 2" in message


def test_one_label_in_train_is_refused_when_test_data_is_given(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": f"fine film {i}", "label": "pos"} for i in range(30)])
    test = write_csv(tmp_path / "test.csv", [{"text": "nice", "label": "pos"}])
    assert "only one label, 'pos'" in bad(tmp_path, train_file=str(train), test_file=str(test))


@pytest.mark.parametrize("quoted", [
    ['"Great film', 'he said "ok" twice', 'ends with a quote"', '"quoted whole"'],  # rows merged between quotes
    ['"an unclosed quote, the only one'],  # the rest of the file merged into one text
], ids=["merged-rows", "unclosed"])
def test_tsv_quotes_are_text_not_quoting(tmp_path, quoted):
    texts = quoted + [f"plain text number {i}" for i in range(83 - len(quoted))]
    rows = [(text, "pos" if i % 2 == 0 else "neg") for i, text in enumerate(texts)]
    path = tmp_path / "quotes.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    splits = load_splits(SourceSpec(train_file=str(path)))
    names = splits["train"].features["label"].names
    read = sorted((t, names[y]) for s in splits.values() for t, y in zip(s["text"], s["label"]))
    assert read == sorted(rows)  # all 83 rows, each quote kept verbatim


def test_too_few_rows_to_split_names_the_real_counts(tmp_path):
    path = write_csv(tmp_path / "five.csv", make_examples(5))
    message = bad(tmp_path, train_file=str(path))
    assert "only 5 training example(s)" in message
    assert "train 4, validation 1, test 0" in message
    assert "at least 6" in message


def labelled(split) -> list[tuple[str, str]]:
    names = split.features["label"].names
    return [(text, names[label]) for text, label in zip(split["text"], split["label"])]


def test_csv_texts_and_labels_are_read_as_written(tmp_path):
    """pandas would read "NA" and "None" as missing and "007" as 7; a label's surrounding spaces are not a class."""
    rows = [{"text": text, "label": label} for text, label in
            [("NA", "None"), ("null", "007"), ("fine film", "010"), ("dull film", " None ")] * 10]
    path = write_csv(tmp_path / "codes.csv", rows)
    splits = load_splits(SourceSpec(train_file=str(path)))
    assert splits["train"].features["label"].names == ["007", "010", "None"]  # numbers as numbers, before text
    read = Counter(pair for split in splits.values() for pair in labelled(split))
    assert read == Counter({("NA", "None"): 10, ("null", "007"): 10, ("fine film", "010"): 10, ("dull film", "None"): 10})


def test_a_first_tsv_row_with_a_field_too_many_does_not_shift_the_columns(tmp_path):
    path = tmp_path / "shifted.tsv"
    path.write_text("text\tlabel\n" + "".join(f"text {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    rows = path.read_text().splitlines()
    rows[2] = "text 1\twith a tab\tpos"  # the second data row: pandas reports where
    path.write_text("\n".join(rows) + "\n")
    message = bad(tmp_path, train_file=str(path))
    assert message == f"cannot read {path} as csv: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"


@pytest.mark.parametrize("content, reason", [
    ("", "No columns to parse from file"), ("text,label\n", "it holds no rows")], ids=["empty", "header only"])
def test_a_file_without_rows_says_so(tmp_path, content, reason):
    path = tmp_path / "none.csv"
    path.write_text(content)
    assert bad(tmp_path, train_file=str(path)) == f"cannot read {path} as csv: {reason}"


@pytest.mark.parametrize("values, message", [
    ([("good film", "pos"), (7, "neg")], "the text column of {path} holds int and str, not text on every row"),
    ([("good film", "pos"), ("bad film", 1)], "the label column of {path} holds int and str, not a label on every row"),
    ([("good film", ["pos"]), ("bad film", ["neg"])], "the label column of {path} holds list, not a label on every row"),
], ids=["text-number", "label-mixed", "label-list"])
def test_json_columns_that_do_not_hold_one_string_per_row_are_one_line(tmp_path, values, message):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in values * 10))
    assert bad(tmp_path, train_file=str(path)).startswith(message.format(path=path))


def test_the_text_cannot_be_its_own_label(tmp_path, tiny_csv):
    message = bad(tmp_path, train_file=str(tiny_csv), text_column="label")
    assert message == "--data.text_column and --data.label_column both name 'label'; a text cannot be its own label"


def test_a_nan_label_in_parquet_is_a_missing_label(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"text": [f"film {i}" for i in range(40)],
                             "label": [float("nan") if i == 3 else float(i % 2) for i in range(40)]}), path)
    assert "has 1 row(s) with no label, the first at data row(s) 4" in bad(tmp_path, train_file=str(path))


def test_a_class_of_one_example_stays_in_training(tmp_path):
    rows = make_examples(100) + [{"text": f"rare thing {i}", "label": f"rare{i}"} for i in range(4)]
    splits = load_splits(SourceSpec(train_file=str(write_csv(tmp_path / "rare.csv", rows))))
    names = splits["train"].features["label"].names
    assert {names[y] for y in splits["train"]["label"]} == set(names)
    assert not {names[y] for split in ("validation", "test") for y in splits[split]["label"]} & {"rare0", "rare3"}


def test_a_label_only_on_empty_texts_or_only_in_held_out_data_is_refused(tmp_path):
    rows = make_examples(40) + [{"text": "  ", "label": "ghost"}]
    message = bad(tmp_path, train_file=str(write_csv(tmp_path / "ghost.csv", rows)))
    assert message.startswith("label(s) 'ghost' appear only in rows with empty texts but in no training example")
    train = write_csv(tmp_path / "train.csv", make_examples(40) + [{"text": "  ", "label": "neutral"}])
    test = write_csv(tmp_path / "test.csv", [{"text": "meh", "label": "neutral"}, {"text": "great", "label": "positive"}])
    assert bad(tmp_path, train_file=str(train), test_file=str(test)).startswith("label(s) 'neutral' appear")


def test_held_out_texts_that_training_has_word_for_word_are_counted(tmp_path, caplog):
    rows = make_examples(100)
    path = write_csv(tmp_path / "repeats.csv", rows + rows[:50])  # 50 texts twice
    splits = load_splits(SourceSpec(train_file=str(path)))
    train = set(splits["train"]["text"])
    for split in ("validation", "test"):
        repeated = sum(text in train for text in splits[split]["text"])
        assert repeated > 0
        assert (f"{repeated} of the {len(splits[split])} {split} texts also appear in the training split, word for "
                "word") in caplog.text
    caplog.clear()
    load_splits(SourceSpec(train_file=str(write_csv(tmp_path / "once.csv", rows))))
    assert "also appear in the training split" not in caplog.text


def test_other_csv_columns_are_read_as_text_whatever_their_later_rows_hold(tmp_path):
    rows = [{"text": f"film number {i}", "label": "pos" if i % 2 else "neg", "score": "NA" if i == 11_000 else str(i)}
            for i in range(12_000)]  # pandas reads in chunks of 10,000 rows: the first would type the column a number
    path = write_csv(tmp_path / "scores.csv", rows, fieldnames=("text", "label", "score"))
    assert sum(len(split) for split in load_splits(SourceSpec(train_file=str(path))).values()) == 12_000


def test_a_parquet_file_written_by_datasets_with_a_class_label_is_read(tmp_path):
    import datasets

    rows = make_examples(40)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    path = tmp_path / "exported.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    splits = load_splits(SourceSpec(train_file=str(path)))
    assert sum(len(split) for split in splits.values()) == 40 and len(splits["train"].features["label"].names) == 2


def test_rare_classes_are_dealt_to_test_as_well_as_validation(tmp_path):
    """Forty classes of five: each gives one example to the held-out fifth, and half of those go to test."""
    rows = [{"text": f"intent {c} example {i}", "label": f"intent{c:02d}"} for c in range(40) for i in range(5)]
    splits = load_splits(SourceSpec(train_file=str(write_csv(tmp_path / "intents.csv", rows))))
    assert {s: len(splits[s]) for s in splits} == {"train": 160, "validation": 20, "test": 20}
    assert len(set(splits["validation"]["label"])) == 20 and len(set(splits["test"]["label"])) == 20
    assert len(set(splits["train"]["label"])) == 40  # every class keeps most of its examples for training


def test_a_file_rewritten_with_its_old_modification_time_is_read_anew(tmp_path):
    """As `unzip`, `tar x`, `cp -p` or `rsync -a` leave it: other contents, the same path and modification time."""
    import os

    path = write_csv(tmp_path / "train.csv", [{"text": f"first version {i}", "label": i % 2} for i in range(40)])
    stamp = path.stat().st_mtime_ns
    assert all(t.startswith("first") for t in load_splits(SourceSpec(train_file=str(path)))["train"]["text"])
    write_csv(path, [{"text": f"second, longer version {i}", "label": i % 2} for i in range(40)])
    os.utime(path, ns=(stamp, stamp))
    assert all(t.startswith("second") for t in load_splits(SourceSpec(train_file=str(path)))["train"]["text"])


def test_a_relative_and_an_absolute_path_to_one_file_share_a_cache_entry(tiny_csv, monkeypatch):
    monkeypatch.chdir(tiny_csv.parent)
    relative = TextDataModule(train_file=f"./{tiny_csv.name}")
    assert relative.prepared_dir == TextDataModule(train_file=str(tiny_csv)).prepared_dir
