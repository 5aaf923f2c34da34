"""Hugging Face Hub ids: the Hub's own splits and columns, and a fast, clear failure without a network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nlprnn.data import sources
from nlprnn.data.sources import SourceSpec, load_splits
from nlprnn.errors import UserError


def no_hub_download(*args, **kwargs):
    raise AssertionError("load_dataset was called although the Hub is unreachable")


def test_unreachable_network_fails_in_seconds_naming_the_alternatives(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources.socket, "create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", no_hub_download)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_splits(SourceSpec(dataset="imdb"))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "'imdb' is not built in and the Hugging Face Hub cannot be reached" in message
    assert all(name in message for name in ("movie-snippets", "trec6", "sms-spam", "--data.train_file"))


def test_a_name_lookup_that_hangs_is_cut_short(monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    released = threading.Event()

    def hanging_lookup(*args, **kwargs):
        released.wait(60)
        raise OSError("Temporary failure in name resolution")  # how the lookup ends, once the test is over

    monkeypatch.setattr(sources.socket, "create_connection", hanging_lookup)
    monkeypatch.setattr(datasets, "load_dataset", no_hub_download)
    start = time.monotonic()
    try:
        with pytest.raises(UserError, match="cannot be reached"):
            load_splits(SourceSpec(dataset="ag_news"))
        assert time.monotonic() - start < sources.HUB_PROBE_TIMEOUT_S + 2
    finally:
        released.set()


def test_offline_mode_with_an_empty_cache_fails_in_seconds(tmp_path):
    """As a user would run it: HF_HUB_OFFLINE=1 set before start-up, nothing in the Hugging Face cache."""
    script = textwrap.dedent(
        """
        import time
        from nlprnn.data.sources import SourceSpec, load_splits
        from nlprnn.errors import UserError
        start = time.monotonic()
        try:
            load_splits(SourceSpec(dataset="imdb"))
        except UserError as err:
            print(f"{time.monotonic() - start:.2f}")
            print(err)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    seconds, message = out.stdout.split("\n", 1)
    assert float(seconds) < 10
    assert "'imdb' is not built in and cannot be loaded from the Hugging Face Hub" in message
    assert "movie-snippets" in message and "--data.train_file" in message


@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable Hub whose load_dataset returns what the test puts in `served`."""
    import datasets

    served = {}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kwargs: served[name])
    return served


def test_hub_splits_and_columns_are_used(fake_hub):
    import datasets

    labels = datasets.ClassLabel(names=["neg", "pos"])
    features = datasets.Features({"sentence": datasets.Value("string"), "stars": labels, "idx": datasets.Value("int32")})
    rows = lambda n, label: {"sentence": [f"text {i}" for i in range(n)], "stars": [label(i) for i in range(n)], "idx": list(range(n))}  # noqa: E731
    fake_hub["someone/reviews"] = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(40, lambda i: i % 2), features=features),
            "validation": datasets.Dataset.from_dict(rows(6, lambda i: i % 2), features=features),
            "test": datasets.Dataset.from_dict(rows(8, lambda i: -1), features=features),  # unlabeled, as on the Hub
        }
    )
    splits = load_splits(SourceSpec(dataset="someone/reviews", text_column="sentence", label_column="stars"))
    assert splits["train"].column_names == ["text", "label"]
    assert splits["train"].features["label"].names == ["neg", "pos"]
    assert len(splits["validation"]) == 6  # the Hub's own validation split
    assert len(splits["train"]) + len(splits["test"]) == 40  # an unlabeled test split is carved from train instead


def test_hub_string_labels_are_encoded_and_missing_columns_named(fake_hub):
    import datasets

    fake_hub["someone/topics"] = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": [f"t {i}" for i in range(30)], "topic": ["b", "a", "c"] * 10})}
    )
    splits = load_splits(SourceSpec(dataset="someone/topics", label_column="topic"))
    assert splits["train"].features["label"].names == ["a", "b", "c"]
    with pytest.raises(UserError, match="has no column 'label'; its columns are text, topic"):
        load_splits(SourceSpec(dataset="someone/topics"))
