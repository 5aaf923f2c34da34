"""Where examples come from: a built-in catalog name, a Hugging Face Hub id, or local files.

Whatever the source, the result is a `DatasetDict` with `train`, `validation` and `test` splits and
two columns, `text` (string) and `label` (a `ClassLabel` whose names are fixed by the training split).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlprnn.data.catalog import CATALOG, load_builtin
from nlprnn.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # of all examples, for each of validation and test when not given
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 3.0

# file suffix -> (datasets builder, its options)
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass(frozen=True)
class SourceSpec:
    """Everything that decides which examples land in which split."""

    dataset: str = "movie-snippets"
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    split_seed: int = 1234

    @property
    def files(self) -> dict[str, str]:
        given = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in given.items() if path}


def load_splits(spec: SourceSpec):
    """The `DatasetDict(train, validation, test)` that `spec` describes, with clean texts and fixed labels."""
    import datasets

    if spec.files:
        if not spec.train_file:
            raise UserError("--data.validation_file/--data.test_file need --data.train_file too")
        raw = {split: _read_file(Path(path), spec) for split, path in spec.files.items()}
        splits = _label_from_train(raw, spec.label_column)
    elif spec.dataset in CATALOG:
        splits = {"train": load_builtin(spec.dataset)}
    else:
        splits = _load_hub(spec)
    splits = {split: _drop_empty_texts(ds, split) for split, ds in splits.items()}
    splits = _fill_missing_splits(splits, spec.split_seed)
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UserError(f"the {split} split is empty; give it some examples or leave its file out to split it from train")
    return datasets.DatasetDict(splits)


def _read_file(path: Path, spec: SourceSpec):
    import datasets

    if not path.is_file():
        raise UserError(f"file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot read {path}: use one of {', '.join(FILE_FORMATS)}")
    builder, options = fmt
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # the builders raise many types for a malformed file
        raise UserError(f"cannot read {path} as {builder}: {str(err).splitlines()[0]}") from None
    missing = [c for c in (spec.text_column, spec.label_column) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"{path} has no column {', '.join(map(repr, missing))}; its columns are {', '.join(ds.column_names)} "
            "(choose them with --data.text_column / --data.label_column)"
        )
    ds = ds.select_columns([spec.text_column, spec.label_column])
    ds = ds.rename_columns({spec.text_column: "text", spec.label_column: "label"})
    unlabeled = [i for i, label in enumerate(ds["label"]) if label is None]
    if unlabeled:
        rows = ", ".join(str(i + 1) for i in unlabeled[:5])
        raise UserError(f"{path} has {len(unlabeled)} row(s) with no label, the first at data row(s) {rows}")
    return ds.cast_column("text", datasets.Value("string"))


def _label_from_train(raw: dict, label_column: str) -> dict:
    """Fix the label list from the training split and encode every split with it."""
    import datasets

    values = set(raw["train"]["label"])
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    names = [str(v) for v in sorted(values)] if numeric else sorted(str(v) for v in values)
    index = {name: i for i, name in enumerate(names)}
    encoded = {}
    for split, ds in raw.items():
        unseen = sorted({str(v) for v in ds["label"]} - index.keys())
        if unseen:
            raise UserError(
                f"the {split} split has label(s) {', '.join(map(repr, unseen[:5]))} that the training split never has "
                f"(training labels: {', '.join(names[:20])})"
            )
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        encoded[split] = ds.map(
            lambda batch: {"label": [index[str(v)] for v in batch["label"]]}, batched=True, features=features
        )
    return encoded


def _drop_empty_texts(ds, split: str):
    keep = [i for i, text in enumerate(ds["text"]) if text is not None and text.strip()]
    dropped = len(ds) - len(keep)
    if dropped:
        log.warning("dropped %d empty or whitespace-only text(s) from the %s split", dropped, split)
        ds = ds.select(keep)
    return ds


def _fill_missing_splits(splits: dict, seed: int) -> dict:
    """Carve validation and test out of train when they are not given: 80/10/10, stratified, seeded."""
    train = splits["train"]
    missing = [s for s in ("validation", "test") if s not in splits]
    if len(missing) == 2:
        train, held = _split_off(train, 2 * HELD_OUT_FRACTION, seed)
        validation, test = _split_off(held, 0.5, seed)
        return {"train": train, "validation": validation, "test": test}
    for split in missing:
        train, splits[split] = _split_off(train, HELD_OUT_FRACTION, seed)
    return {"train": train, **{s: splits[s] for s in ("validation", "test")}}


def _split_off(ds, fraction: float, seed: int):
    """(rest, held-out): stratified by label where every class has enough examples."""
    if len(ds) < 2:
        raise UserError(f"only {len(ds)} training example(s): too few to split off validation and test data")
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError:  # a class too rare to stratify
        parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def _load_hub(spec: SourceSpec) -> dict:
    """A dataset from the Hugging Face Hub, with the Hub's own splits. Fails in seconds when offline."""
    import datasets

    builtins = ", ".join(CATALOG)
    hint = f"use a built-in dataset ({builtins}) or local files (--data.train_file)"
    if not _hub_reachable():
        raise UserError(f"dataset {spec.dataset!r} is not built in and the Hugging Face Hub cannot be reached; {hint}")
    try:
        hub = datasets.load_dataset(spec.dataset)
    except Exception as err:  # unknown id, gated repo, network: all end the same way for the user
        raise UserError(f"cannot load {spec.dataset!r} from the Hugging Face Hub ({str(err).splitlines()[0]}); {hint}") from None
    if "train" not in hub:
        raise UserError(f"{spec.dataset!r} on the Hub has no train split (it has {', '.join(hub)})")
    splits = {}
    for split in SPLITS:
        if split not in hub:
            continue
        ds = hub[split]
        missing = [c for c in (spec.text_column, spec.label_column) if c not in ds.column_names]
        if missing:
            raise UserError(
                f"{spec.dataset!r} has no column {', '.join(map(repr, missing))}; its columns are "
                f"{', '.join(ds.column_names)} (choose them with --data.text_column / --data.label_column)"
            )
        ds = ds.select_columns([spec.text_column, spec.label_column])
        splits[split] = ds.rename_columns({spec.text_column: "text", spec.label_column: "label"})
    label = splits["train"].features["label"]
    if not isinstance(label, datasets.ClassLabel):
        return _label_from_train(splits, spec.label_column)
    # Hub test splits are sometimes unlabeled (label -1): those cannot be scored, so carve our own.
    return {s: ds for s, ds in splits.items() if s == "train" or min(ds["label"], default=0) >= 0}


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
