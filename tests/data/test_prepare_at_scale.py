"""Preparation stays columnar: parallel tokenization agrees with in-process, and no column becomes a Python list."""

from __future__ import annotations

import json

import datasets
import pytest

from conftest import make_examples, write_csv
from nlprnn.data.datamodule import TextDataModule
from nlprnn.errors import UserError


def prepared_rows(data: TextDataModule) -> dict[str, list]:
    data.prepare()
    return {s: data.splits[s].with_format("arrow")[:].to_pylist() for s in data.splits}


def test_tokenizing_in_worker_processes_gives_the_same_data(tmp_path, monkeypatch, isolated_cache):
    path = write_csv(tmp_path / "rows.csv", make_examples(300))
    serial = prepared_rows(TextDataModule(train_file=str(path)))
    monkeypatch.setenv("NLPRNN_CACHE", str(isolated_cache / "parallel"))
    parallel = TextDataModule(train_file=str(path), num_proc=2)
    assert prepared_rows(parallel) == serial


def test_preparing_and_loading_never_read_a_whole_column_into_python(tmp_path, monkeypatch):
    """`ds["text"]` builds a Python list of the whole column: fine for 300 rows, not for 10 million."""
    path = write_csv(tmp_path / "rows.csv", make_examples(300))
    columns_read = []
    getitem = datasets.Dataset.__getitem__

    def watched(self, key):
        if isinstance(key, str):
            columns_read.append(key)
        return getitem(self, key)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", watched)
    data = TextDataModule(train_file=str(path), batch_size=16)
    data.prepare_data()
    data.setup()
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        next(iter(loader))
    assert columns_read == []


def test_meta_records_class_counts_of_the_training_split(tiny_csv):
    data = TextDataModule(train_file=str(tiny_csv))
    data.prepare()
    assert data.class_counts == [80, 80]  # 160 training rows, half of each label
    assert json.loads((data.prepared_dir / "meta.json").read_text())["class_counts"] == [80, 80]
    assert data.vocabulary[:2] == ["[PAD]", "[UNK]"] and len(data.vocabulary) == data.vocab_size


@pytest.mark.parametrize("batch_size", [1, 7])
def test_loaders_cover_each_split_once(tiny_csv, batch_size):
    data = TextDataModule(train_file=str(tiny_csv), batch_size=batch_size)
    data.prepare()
    sizes = json.loads((data.prepared_dir / "meta.json").read_text())["sizes"]
    for split, loader in [("train", data.train_dataloader()), ("test", data.test_dataloader())]:
        assert sum(len(batch["labels"]) for batch in loader) == sizes[split]


def test_a_split_too_small_for_its_devices_is_refused_by_name(tiny_csv):
    data = TextDataModule(train_file=str(tiny_csv))  # 20 test examples
    data.prepare()
    with pytest.raises(UserError, match=r"^the test split is too small for 32 devices: 20 examples cannot fill 32 "
                                        r"batches, 1 for each of 32 ranks, without repeating some; give it more"):
        data.batch_sampler("test", False, rank=0, world_size=32)
    assert len(data.batch_sampler("test", False, rank=0, world_size=20)) == 1
