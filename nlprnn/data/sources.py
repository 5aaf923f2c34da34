"""Where examples come from: a built-in catalog name, a Hugging Face Hub id, or local files.

Whatever the source, the result is a `DatasetDict` with `train`, `validation` and `test` splits and
two columns, `text` (string) and `label` (a `ClassLabel` whose names are fixed by the training split).
Everything stays in Arrow: no step reads a whole column into Python objects.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nlprnn.cache import cache_dir, digest, file_identity
from nlprnn.data.catalog import CATALOG, load_builtin
from nlprnn.data.cleaning import check_labels, drop_empty_texts, repair_utf8
from nlprnn.errors import UserError, first_line

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # of all examples, for each of validation and test when not given
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 3.0

# pandas would guess: "NA", "None" or "null" as missing, "007" as the number 7, and a first row with one field too
# many as the index column. Only an empty field is missing; every column is read as written (see _read_file).
CSV_OPTIONS = {"keep_default_na": False, "na_values": [""], "index_col": False}
# file suffix -> (datasets builder, its options)
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", CSV_OPTIONS),
    # TSV has no quoting: a quote is part of the text, and quoting on would merge rows at a stray quote.
    ".tsv": ("csv", {**CSV_OPTIONS, "delimiter": "\t", "quoting": csv.QUOTE_NONE}),
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
        splits = _label_from_train(raw)
    elif spec.dataset in CATALOG:
        splits = {"train": load_builtin(spec.dataset)}
    else:
        splits = _load_hub(spec)
    splits = {split: drop_empty_texts(ds, split) for split, ds in splits.items()}
    _check_two_labels(splits["train"])
    splits = _fill_missing_splits(splits, spec.split_seed)
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UserError(f"the {split} split is empty; give it some examples or leave its file out to split it from train")
    _check_every_label_is_trained(splits, labels_from_train=bool(spec.files))
    if spec.files:  # the built-in datasets are documented with their repeats (see the catalog)
        _warn_of_texts_also_in_training(splits)
    return datasets.DatasetDict(splits)


def _warn_of_texts_also_in_training(splits: dict) -> None:
    """A warning that counts the validation and test texts that training has word for word: a score on them
    measures memory, not generalisation."""
    import pyarrow.compute as pc

    trained = pc.unique(splits["train"].with_format("arrow", columns=["text"])[:]["text"])  # once, for both splits
    for split in ("validation", "test"):
        held = splits[split].with_format("arrow", columns=["text"])[:]["text"]
        repeated = pc.sum(pc.is_in(held, value_set=trained)).as_py() or 0
        if repeated:
            log.warning("%d of the %d %s texts also appear in the training split, word for word; remove repeated "
                        "texts from the data to score what the model has not seen", repeated, len(held), split)


def _read_file(path: Path, spec: SourceSpec):
    import datasets

    if not path.is_file():
        raise UserError(f"file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot read {path}: use one of {', '.join(FILE_FORMATS)}")
    builder, options = fmt
    readable = path
    if builder != "parquet":  # Parquet holds its strings already decoded
        readable, replaced = repair_utf8(path)
        if replaced:
            log.warning("replaced %d invalid UTF-8 byte sequence(s) in %s with U+FFFD", replaced, path)
    if builder == "csv":  # every column as text: pandas types a column by chunk, and "NA" in a later one fails it
        options = {**options, "converters": dict.fromkeys(_csv_header(readable, options), str)}
    try:
        # a cache of its own per file version: `datasets` tells versions apart by path and modification time
        # alone, and `unzip`, `cp -p` or `rsync -a` can leave other contents with the old time
        version = cache_dir() / "files" / digest(file_identity(readable))
        ds = datasets.load_dataset(builder, data_files=str(readable), split="train", cache_dir=str(version), **options)
    except Exception as err:  # the builders raise many types for a malformed file
        raise UserError(f"cannot read {path} as {builder}: {_reason(err)}") from None
    ds = _text_and_label(ds, spec, str(path))
    _check_column_types(ds, str(path))
    check_labels(ds, str(path))
    return ds.cast_column("text", datasets.Value("string"))


def _csv_header(path: Path, options: dict[str, Any]) -> list[str]:
    """The column names in the first row of a CSV or TSV file (none for an empty file)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f, delimiter=options.get("delimiter", ","), quoting=options.get("quoting", csv.QUOTE_MINIMAL)), [])


def _reason(err: BaseException) -> str:
    """What a builder's error says at its root ("An error occurred while generating the dataset" says nothing)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    reason = first_line(err)
    if isinstance(err, StopIteration) or "corresponds to no data" in reason or not reason:
        return "it holds no rows"
    return reason


def _check_column_types(ds, where: str) -> None:
    """One line for a text or label column that does not hold one value per row: a text must be a string (or a
    number, read as its digits); a label one string or number. JSON would otherwise be cast to its own spelling."""
    import datasets

    for column, what in (("text", "text"), ("label", "a label")):
        feature = ds.features[column]
        if not isinstance(feature, (datasets.Value, datasets.ClassLabel)):  # a list, a struct, or JSON of mixed types
            kinds = sorted({type(v).__name__ for v in ds.select(range(min(len(ds), 1000)))[column] if v is not None})
            raise UserError(f"the {column} column of {where} holds {' and '.join(kinds) or feature}, not {what} on "
                            "every row; give each row one string")


def _text_and_label(ds, spec: SourceSpec, where: str):
    """`ds` cut to its text and label columns, renamed `text` and `label`."""
    missing = [c for c in (spec.text_column, spec.label_column) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"{where} has no column {', '.join(map(repr, missing))}; its columns are {', '.join(ds.column_names)} "
            "(choose them with --data.text_column / --data.label_column)"
        )
    if spec.text_column == spec.label_column:
        raise UserError(f"--data.text_column and --data.label_column both name {spec.text_column!r}; a text cannot "
                        "be its own label")
    ds = ds.select_columns([spec.text_column, spec.label_column])
    return ds.rename_columns({spec.text_column: "text", spec.label_column: "label"})


def _label_from_train(raw: dict) -> dict:
    """Fix the label list from the training split and encode every split with it, column-wise in Arrow."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    def as_text(ds) -> pa.Array:
        # Labels are matched as Arrow renders them as strings, so 1 and 1.0 in different files agree, and without
        # the spaces around them, which no one means as another class.
        column = ds.with_format("arrow", columns=["label"])[:]["label"]  # one column, not the text
        return pc.utf8_trim_whitespace(column.cast(pa.string())).combine_chunks()

    names = sorted(pc.unique(as_text(raw["train"])).to_pylist(), key=_label_order)
    value_set = pa.array(names)
    encoded = {}
    for split, ds in raw.items():
        column = as_text(ds)
        ids = pc.index_in(column, value_set=value_set)  # null where the label is not a training label
        if ids.null_count:
            unseen = sorted(str(v) for v in pc.unique(pc.filter(column, pc.is_null(ids))).to_pylist())
            raise UserError(
                f"the {split} split has label(s) {', '.join(map(repr, unseen[:5]))} that the training split never has "
                f"(training labels: {', '.join(names[:20])})"
            )
        ds = ds.remove_columns("label").add_column("label", ids.to_numpy(zero_copy_only=False).astype("int64"))
        encoded[split] = ds.cast_column("label", datasets.ClassLabel(names=names))
    return encoded


def _label_order(name: str) -> tuple:
    """Labels that are all numbers sort as numbers (2 before 10), others as text; numbers before text."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _check_every_label_is_trained(splits: dict, labels_from_train: bool) -> None:
    """Every label must have training examples: one whose rows all had empty texts (when the labels come from the
    training rows), or that only the held-out splits have, would be a class the model never learns (and that a
    test can never fairly score)."""
    import pyarrow.compute as pc

    def present(split: str) -> set[int]:  # the label column alone: Dataset.unique would rewrite the texts too
        return set(pc.unique(splits[split].with_format("arrow", columns=["label"])[:]["label"]).to_pylist())

    names = splits["train"].features["label"].names
    trained = present("train")
    for split in ("train", "validation", "test") if labels_from_train else ("validation", "test"):
        untrained = sorted(set(range(len(names))) - trained if split == "train" else present(split) - trained)
        if untrained:
            shown = ", ".join(repr(names[i]) for i in untrained[:5])
            where = "only in rows with empty texts" if split == "train" else f"in the {split} split"
            raise UserError(f"label(s) {shown} appear {where} but in no training example with text; give them "
                            "training examples or remove their rows")


def _check_two_labels(train) -> None:
    """Refuse training data of one class: a one-output model would learn nothing and fail later."""
    if len(train) == 0:
        return  # the split checks say so
    present = train.unique("label")
    if len(present) < 2:
        names = train.features["label"].names
        raise UserError(
            f"the training data has only one label, {names[present[0]]!r}, in all its {len(train)} example(s); "
            "a classifier needs examples of at least 2 labels"
        )


def _held_out_size(n: int, fraction: float) -> int:
    """How many of `n` examples `_split_off` holds out (at least one always stays)."""
    return min(math.ceil(fraction * n), n - 1) if n else 0


def _split_sizes(n: int, missing: list[str]) -> dict[str, int]:
    """How many of `n` training examples each split gets when `missing` are carved out of them."""
    if len(missing) == 2:
        held = _held_out_size(n, 2 * HELD_OUT_FRACTION)
        test = _held_out_size(held, 0.5)
        return {"train": n - held, "validation": held - test, "test": test}
    held = _held_out_size(n, HELD_OUT_FRACTION)
    return {"train": n - held, missing[0]: held}


def _check_splittable(n: int, missing: list[str]) -> None:
    """Refuse, with what each split would get, training data too small to carve the missing splits from."""
    sizes = _split_sizes(n, missing)
    if min(sizes.values()) > 0:
        return
    enough = next(m for m in itertools.count(n + 1) if min(_split_sizes(m, missing).values()) > 0)
    would = ", ".join(f"{split} {size}" for split, size in sizes.items())
    files = " and ".join(f"--data.{split}_file" for split in missing)
    raise UserError(
        f"only {n} training example(s): too few to split off {' and '.join(missing)} data "
        f"(the splits would get {would}); give at least {enough} examples, or give {files}"
    )


def _fill_missing_splits(splits: dict, seed: int) -> dict:
    """Carve validation and test out of train when they are not given: 80/10/10, stratified, seeded."""
    train = splits["train"]
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        _check_splittable(len(train), missing)
    if len(missing) == 2:
        train, held = _split_off(train, 2 * HELD_OUT_FRACTION, seed)
        validation, test = _split_off(held, 0.5, seed, rest_is_training=False)
        return {"train": train, "validation": validation, "test": test}
    for split in missing:
        train, splits[split] = _split_off(train, HELD_OUT_FRACTION, seed)
    return {"train": train, **{s: splits[s] for s in ("validation", "test")}}


def _split_off(ds, fraction: float, seed: int, rest_is_training: bool = True):
    """(rest, held-out): a seeded split, stratified by label, that only reads the label column.

    Each class gives its share of the `ceil(fraction * n)` held-out examples (largest remainders
    round up), so class balance is kept even for rare classes. Where the rest is training data, a
    class's last example stays in it; dealing held-out data into validation and test, it need not.
    """
    labels = ds.with_format("arrow", columns=["label"])[:]["label"].to_numpy()  # (N,)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    wanted = counts * _held_out_size(len(ds), fraction) / len(ds)
    take = np.floor(wanted).astype(int)
    shortfall = int(round(wanted.sum())) - int(take.sum())
    take[np.argsort(take - wanted, kind="stable")[:shortfall]] += 1  # largest remainders first
    if rest_is_training:
        take = np.minimum(take, counts - 1)  # a class of one example stays in training, where it can be learned
    held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    rest = np.setdiff1d(np.arange(len(ds)), held, assume_unique=True)
    return ds.select(rng.permutation(rest)), ds.select(rng.permutation(held))


def _load_hub(spec: SourceSpec) -> dict:
    """A dataset from the Hugging Face Hub, with the Hub's own splits. Fails in seconds when offline."""
    import datasets
    import pyarrow.compute as pc

    hint = (
        f"use a built-in dataset ({', '.join(CATALOG)}; see python -m nlprnn.data list) "
        "or local files (--data.train_file, --data.validation_file, --data.test_file)"
    )
    if _offline_by_choice():
        # Set before start-up, the variable makes `datasets` read its local cache and never the network.
        if not datasets.config.HF_HUB_OFFLINE:
            raise UserError(f"dataset {spec.dataset!r} is not built in and HF_HUB_OFFLINE forbids the Hub; {hint}")
    elif not _hub_reachable():
        raise UserError(
            f"dataset {spec.dataset!r} is not built in and the Hugging Face Hub cannot be reached "
            f"(with HF_HUB_OFFLINE=1 the local Hugging Face cache is used); {hint}"
        )
    try:
        hub = datasets.load_dataset(spec.dataset)
    except Exception as err:  # unknown id, gated repo, network, offline and not cached: all end the same way
        raise UserError(
            f"dataset {spec.dataset!r} is not built in and cannot be loaded from the Hugging Face Hub ({first_line(err)}); {hint}"
        ) from None
    if "train" not in hub:
        raise UserError(f"{spec.dataset!r} on the Hub has no train split (it has {', '.join(hub)})")
    splits = {split: _text_and_label(hub[split], spec, repr(spec.dataset)) for split in SPLITS if split in hub}
    splits = {split: ds.cast_column("text", datasets.Value("string")) for split, ds in splits.items()}
    if not isinstance(splits["train"].features["label"], datasets.ClassLabel):
        for split, ds in splits.items():
            check_labels(ds, f"the {split} split of {spec.dataset!r}")
        return _label_from_train(splits)
    # Hub test splits are sometimes unlabeled (label -1): those cannot be scored, so carve our own.
    labeled = {}
    for split, ds in splits.items():
        lowest = pc.min(ds.with_format("arrow", columns=["label"])[:]["label"]).as_py()
        if split == "train" or lowest is None or lowest >= 0:
            labeled[split] = ds
    return labeled


def _offline_by_choice() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.lower() in ("1", "true", "yes", "on") for flag in flags)


def _hub_reachable() -> bool:
    """Whether a TCP connection to the Hub opens within HUB_PROBE_TIMEOUT_S, name lookup included.

    The probe runs in a daemon thread because a name lookup has no timeout of its own.
    """
    reached, done = [], threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection(HUB_HOST, timeout=HUB_PROBE_TIMEOUT_S):
                reached.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    done.wait(HUB_PROBE_TIMEOUT_S)
    return bool(reached)
