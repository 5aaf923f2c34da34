"""TextDataModule: source -> tokenizer trained on train -> token ids cached as Arrow -> bucketed batches."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from filelock import FileLock
from torch.utils.data import DataLoader

from nlprnn.atomic import publishing
from nlprnn.cache import cache_dir, digest, file_identity
from nlprnn.data.batching import BucketBatchSampler, Collate, ResumableLoader, TokenizedSplit
from nlprnn.data.sources import FILE_FORMATS, SPLITS, SourceSpec, load_splits
from nlprnn.data.tokenizer import (
    PAD, TokenizerConfig, load_tokenizer, resolve_auto, text_batches, train_tokenizer,
)
from nlprnn.derived import LENGTH_SAMPLE, MAX_LENGTH_RULE, Derived, max_length_from, typical_length
from nlprnn.errors import UserError

log = logging.getLogger(__name__)
PREPARED_FORMAT = 5  # bump when the prepared layout, the reading of files or the tokenization changes
CHECKPOINT_FORMAT = 1  # of state_dict(); bump only when a reader of an older layout would misread it
MAP_BATCH = 1000  # texts per tokenizer call while preparing


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str = "movie-snippets",
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: TokenizerConfig = TokenizerConfig(),
        max_length: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        num_proc: int | None = None,
        split_seed: int = 1234,
    ) -> None:
        """Text classification data, tokenized once and cached.

        Args:
            dataset: a built-in dataset name (see `python -m nlprnn.data list`) or a Hugging Face Hub id.
                Ignored when train_file is given.
            train_file: a local CSV, TSV, JSON, JSONL or Parquet file of training examples.
            validation_file: local validation examples; split from train_file when left out.
            test_file: local test examples; split from train_file when left out.
            text_column: the column that holds the text.
            label_column: the column that holds the label (strings or integers).
            tokenizer: how to build the tokenizer (trained on the training split only).
            max_length: texts are cut to this many tokens; None derives it from the training texts' lengths
                (their 95th percentile, see nlprnn.derived) and logs why.
            batch_size: examples per batch (per device).
            num_workers: data-loader worker processes; 0 loads in the training process.
            num_proc: processes that tokenize while preparing the data; None tokenizes in this process
                (with the tokenizer's own threads).
            split_seed: seed of the stratified 80/10/10 split when validation/test are not given.
        """
        super().__init__()
        if max_length is not None and max_length < 1:  # 0 would read as "derive it", -3 fail deep in tokenizing
            raise UserError(f"data.max_length is a number of tokens, at least 1 (or null to derive it): got {max_length}")
        self.source = SourceSpec(dataset, train_file, validation_file, test_file, text_column, label_column, split_seed)
        self.tokenizer_config = tokenizer  # as given; resolve_auto(...) is what the tokenizer is built from
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.splits: dict = {}
        self._meta: dict | None = None
        self._prepared_dir: Path | None = None
        self.calibration: dict | None = None  # of the model's probabilities; set after training (nlprnn.fit)

    # --- what the data tells the model (read by LightningCLI.link_arguments) ---

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["labels"])

    @property
    def pad_id(self) -> int:
        return self.meta["pad_id"]

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @property
    def derived(self) -> dict[str, Derived]:
        """The data settings derived from the training split, by their dotted config path."""
        return {name: Derived(**choice) for name, choice in self.meta.get("derived", {}).items()}

    @property
    def typical_length(self) -> int:
        """The median token count of the training texts (the model derives its open settings from it)."""
        return self.meta["typical_length"]

    @property
    def train_size(self) -> int:
        """Training examples (for budgets derived from the data)."""
        return self.meta["sizes"]["train"]

    @property
    def class_counts(self) -> list[int]:
        """Training examples of each class, in label order (for class-weighted losses)."""
        return self.meta["class_counts"]

    @property
    def training_tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training texts' token ids end to end, where each text starts (N + 1 offsets) and their label ids
        (for a model part fitted in closed form; see nlprnn.models.linear)."""
        self.setup()
        table = self.splits["train"].with_format("arrow", columns=["input_ids", "label"])[:]
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        return ids.flatten().to_numpy(), offsets - offsets[0], table.column("label").to_numpy()

    @property
    def vocabulary(self) -> list[str]:
        """The tokenizer's tokens in id order (for initialising embeddings from pretrained vectors)."""
        by_id = sorted(self.tokenizer().get_vocab().items(), key=lambda item: item[1])
        return [token for token, _ in by_id]

    @property
    def meta(self) -> dict:
        """Vocabulary size, padding id, labels and counts of the prepared data (after prepare() or setup())."""
        if self._meta is None:
            # Preparing here would hide a download and tokenization behind an attribute read.
            raise RuntimeError(f"{type(self).__name__}: its data is read before it was prepared; call prepare() first")
        return self._meta

    # --- the cache entry ---

    @property
    def prepared_dir(self) -> Path:
        """One cache entry per source, tokenizer and max_length, fixed at its first use: a data file edited or
        moved while the model trains does not move it (every checkpoint reads the tokenizer there)."""
        if self._prepared_dir is None:
            self._prepared_dir = self._cache_entry()
        return self._prepared_dir

    def source_unchanged(self) -> bool:
        """Whether the data files are still the ones prepared (same paths, sizes and modification times)."""
        try:
            return self._cache_entry() == self.prepared_dir
        except OSError:  # a file gone
            return False

    def _cache_entry(self) -> Path:
        key = {
            "format": PREPARED_FORMAT,
            "source": _spelled_out(self.source),
            "files": {split: {**file_identity(path), **_reading(path)} for split, path in self.source.files.items()},
            "tokenizer": asdict(resolve_auto(self.tokenizer_config)),
            # the file is used with its padding off (see train_tokenizer), and cuts a text before the special tokens
            # its post-processor adds (see tokenize_splits): no entry tokenized otherwise is reused
            "tokenizer_file": {**file_identity(self.tokenizer_config.file), "padding": None, "cut": "before specials"}
            if self.tokenizer_config.file else None,
            "max_length": self.max_length or MAX_LENGTH_RULE,  # a changed rule derives anew
        }
        name = Path(self.source.train_file).stem if self.source.train_file else self.source.dataset.replace("/", "--")
        return cache_dir() / "prepared" / f"{name}-{digest(key)}"

    @property
    def tokenizer_file(self) -> Path:
        return self.prepared_dir / "tokenizer.json"

    def prepare(self) -> None:
        """Prepare the data (at most once per machine) and load it; call it before reading what the data tells.

        The same as Lightning's prepare_data() then setup(), for code that has no Trainer yet (nlprnn.fit
        calls it as it makes the datamodule, before the model is sized from it).
        """
        self.prepare_data()
        self.setup()

    def prepare_data(self) -> None:
        """Fetch, split, train the tokenizer on train, tokenize every split; all cached, all at most once."""
        target = self.prepared_dir
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):  # several processes (DDP ranks) may get here at once
            if target.exists():
                return
            splits = load_splits(self.source)
            config = resolve_auto(self.tokenizer_config)
            tokenizer = train_tokenizer(text_batches(splits["train"]), config)
            lengths = sample_lengths(splits["train"], tokenizer)
            derived = {} if self.max_length else {"data.max_length": max_length_from(lengths)}
            if self.tokenizer_config.vector_words == "auto":
                derived["data.tokenizer.vector_words"] = Derived(
                    config.vector_words or "none",
                    "the words of the installed word vectors join the vocabulary, so words unseen in training "
                    "keep their vectors" if config.vector_words else "no word vectors are installed (or the "
                    "tokenizer is not word-level)")
            max_length = self.max_length or derived["data.max_length"].value
            with publishing(target) as scratch:
                tokenized, counts = tokenize_splits(splits, tokenizer, max_length, self.num_proc)
                tokenized.save_to_disk(str(scratch / "splits"))
                tokenizer.enable_truncation(max_length)  # what serving the model will do too
                tokenizer.save(str(scratch / "tokenizer.json"))
                label_ids = tokenized["train"].with_format("numpy", columns=["label"])[:]["label"]
                labels = splits["train"].features["label"].names
                meta = {
                    "vocab_size": tokenizer.get_vocab_size(),
                    "pad_id": tokenizer.token_to_id(PAD),
                    "labels": labels,
                    "class_counts": np.bincount(label_ids, minlength=len(labels)).tolist(),
                    "max_length": max_length,
                    "typical_length": typical_length(lengths),
                    "derived": {name: asdict(choice) for name, choice in derived.items()},
                    "sizes": {s: len(tokenized[s]) for s in SPLITS},
                    **counts,
                }
                (scratch / "meta.json").write_text(json.dumps(meta, indent=2))
            log.info("prepared %s: %s", target.name, meta["sizes"])

    def setup(self, stage: str | None = None) -> None:
        import datasets

        if self.splits:
            return
        # Lightning runs prepare_data() on one process per machine and setup() on all: this only loads.
        meta = self.prepared_dir / "meta.json"
        if not meta.exists():
            raise RuntimeError(f"{type(self).__name__}.setup() found no prepared data; call prepare() first")
        self._meta = json.loads(meta.read_text())
        loaded = datasets.load_from_disk(str(self.prepared_dir / "splits"))
        self.splits = {s: loaded[s].select_columns(["input_ids", "length", "label"]) for s in SPLITS}

    def tokenizer(self):
        """The tokenizer trained on this data's training split."""
        self.meta  # noqa: B018 (raises unless the data is prepared)
        return load_tokenizer(self.tokenizer_file)

    # --- what every checkpoint carries ---

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to be used without this data: labels, tokenizer and data settings.

        Lightning saves it in every checkpoint under the class name ("TextDataModule"); nlprnn.export
        reads it there, and the run folder's labels.json and tokenizer.json are written from it.
        "calibration" holds the model's probability calibration ({"method": "temperature", "temperature": T},
        see nlprnn.calibration); None until one is fitted.
        """
        return {
            "format": CHECKPOINT_FORMAT,
            "labels": list(self.labels),
            "tokenizer": self.tokenizer_file.read_bytes().decode("utf-8"),  # truncates at max_length
            "data": {**asdict(self.source), "max_length": int(self.meta["max_length"])},  # named as data.* options
            "calibration": self.calibration,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed (or tested) checkpoint's classes must be this data's, in the same order: a model
        # with the same number of classes would otherwise load and silently mislabel.
        saved = state_dict.get("labels")
        if saved is not None and list(saved) != self.labels:
            raise UserError(f"the checkpoint was trained on the labels {list(saved)}, but this data has {self.labels}")
        self.calibration = state_dict.get("calibration")  # a tested checkpoint's probabilities use its own

    # --- loaders ---

    def batch_sampler(self, split: str, shuffle: bool, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        """One rank's batches of a split (a resumed run checks its checkpoint against the training ones)."""
        self.setup()
        lengths = self.splits[split].with_format("numpy", columns=["length"])[:]["length"]  # (N,), not a Python list
        try:
            return BucketBatchSampler(
                lengths, self.batch_size, shuffle=shuffle, seed=self.source.split_seed, rank=rank, world_size=world_size
            )
        except ValueError as err:  # every rank needs a batch of its own: a small split on many devices
            raise UserError(f"the {split} split is too small for {world_size} devices: {err}; give it more examples "
                            "or train on fewer devices") from None

    def whole_split_loader(self, split: str) -> DataLoader:
        """All of a split for one process, in length order (the trainer's loaders deal it out among ranks)."""
        return self._loader(split, shuffle=False, ranks=(0, 1))

    def _loader(self, split: str, shuffle: bool, ranks: tuple[int, int] | None = None) -> DataLoader:
        if ranks is None:
            ranks = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = self.batch_sampler(split, shuffle, *ranks)
        return DataLoader(
            TokenizedSplit(self.splits[split]),
            batch_sampler=sampler,
            collate_fn=Collate(self.pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableLoader:
        # Resumable: a run resumed mid-epoch skips the batches it has already trained on.
        return ResumableLoader(self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def sample_lengths(train, tokenizer) -> np.ndarray:
    """(N,) untruncated token counts of a seeded sample of at most LENGTH_SAMPLE training texts."""
    rows = np.random.default_rng(0).permutation(len(train))[:LENGTH_SAMPLE]
    texts = train.select(np.sort(rows)).with_format("arrow", columns=["text"])[:]["text"].to_pylist()  # bounded
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    tokenizer.no_truncation()
    tokenizer.no_padding()  # padding would count as text
    return np.fromiter((len(e.ids) for e in encode_batch(texts)), dtype=np.int64, count=len(texts))


def tokenize_splits(splits, tokenizer, max_length: int, num_proc: int | None = None):
    """(`DatasetDict` of input_ids, length, label; counts of truncated and dropped texts).

    Tokenization runs through `datasets.map`, batch by batch into memory-mapped Arrow files, so memory
    stays flat however large the corpus. Texts longer than `max_length` tokens are cut (and counted);
    texts that yield no token at all are dropped (and counted).
    """
    import datasets
    import pyarrow as pa

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "label": splits["train"].features["label"],
        }
    )

    # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which are not needed here
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    # A tokenizer whose post-processor adds tokens ([CLS] text [SEP]) cuts the text before them, as the exported
    # bundle's does; any other is cut here, where its full lengths count the cut texts at no cost.
    cuts_itself = bool(tokenizer.post_processor and tokenizer.post_processor.num_special_tokens_to_add(False))

    def encode(batch: pa.Table) -> pa.Table:
        # Arrow in, Arrow out: columns built whole from numpy, since Python lists of lists would be
        # converted and cast row by row, which costs more than the tokenizer itself.
        encodings = encode_batch(batch.column("text").to_pylist())
        ids = [e.ids for e in encodings]
        if cuts_itself:
            kept = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (N,)
            truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(ids))
        else:
            full = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (N,) untruncated lengths
            kept, truncated = np.minimum(full, max_length), full > max_length
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)  # (N + 1,) row starts in `flat`
        np.cumsum(kept, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(x[:max_length] for x in ids), dtype=np.int32,
                           count=int(offsets[-1]))
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, flat),
            "length": kept.astype(np.int32),
            "truncated": truncated,
            "label": batch.column("label"),
        })

    if cuts_itself:
        tokenizer.enable_truncation(max_length)
    else:
        tokenizer.no_truncation()  # cut in `encode`, so the cut texts can be counted
    tokenizer.no_padding()  # batches are padded when loaded, to their own longest text
    tokenized = splits.with_format("arrow").map(
        encode, batched=True, batch_size=MAP_BATCH, num_proc=num_proc, remove_columns=["text"],
        features=features, desc="Tokenizing",
    ).with_format(None)  # saved with the splits: they load as plain Python rows
    counts = {"truncated": {}, "no_tokens": {}}
    for split, ds in tokenized.items():
        columns = ds.with_format("numpy", columns=["length", "truncated"])[:]
        counts["truncated"][split] = int(columns["truncated"].sum())
        empty = np.flatnonzero(columns["length"] == 0)
        counts["no_tokens"][split] = len(empty)
        if len(empty):
            tokenized[split] = ds.select(np.setdiff1d(np.arange(len(ds)), empty, assume_unique=True))
        tokenized[split] = tokenized[split].remove_columns("truncated")
    for split in SPLITS:
        if counts["truncated"][split]:
            log.warning("cut %d %s text(s) to max_length=%d tokens", counts["truncated"][split], split, max_length)
        if counts["no_tokens"][split]:
            log.warning("dropped %d %s text(s) that yield no token", counts["no_tokens"][split], split)
    return tokenized, counts


def _spelled_out(source: SourceSpec) -> dict:
    """The source's options with its files' resolved paths: `./train.csv` and its absolute path are one entry."""
    options = asdict(source)
    return {k: str(Path(v).resolve()) if k.endswith("_file") and v else v for k, v in options.items()}


def _reading(path: str) -> dict:
    """The reader options of a file format that has some (TSV), so that changing them prepares the file anew."""
    options = FILE_FORMATS.get(Path(path).suffix.lower(), (None, {}))[1]
    return {"reader": options} if options else {}

