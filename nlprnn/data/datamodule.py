"""TextDataModule: source -> tokenizer trained on train -> token ids cached as Arrow -> bucketed batches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import lightning as L
from filelock import FileLock
from torch.utils.data import DataLoader

from nlprnn.cache import atomic_dir, cache_dir
from nlprnn.data.batching import BucketBatchSampler, Collate, TokenizedSplit
from nlprnn.data.sources import SPLITS, SourceSpec, load_splits
from nlprnn.data.tokenizer import PAD, TokenizerConfig, batched, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)
PREPARED_FORMAT = 1  # bump when the prepared layout or tokenization changes


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
        max_length: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
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
            max_length: texts are cut to this many tokens.
            batch_size: examples per batch (per device).
            num_workers: data-loader worker processes; 0 loads in the training process.
            split_seed: seed of the stratified 80/10/10 split when validation/test are not given.
        """
        super().__init__()
        self.source = SourceSpec(dataset, train_file, validation_file, test_file, text_column, label_column, split_seed)
        self.tokenizer_config = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits: dict = {}
        self._meta: dict | None = None

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
    def meta(self) -> dict:
        """Vocabulary size, padding id, labels and counts of the prepared data (prepares it if needed)."""
        if self._meta is None:
            self.prepare_data()
            self._meta = json.loads((self.prepared_dir / "meta.json").read_text())
        return self._meta

    # --- the cache entry ---

    @property
    def prepared_dir(self) -> Path:
        """One cache entry per source, tokenizer and max_length."""
        key = {
            "format": PREPARED_FORMAT,
            "source": asdict(self.source),
            "files": {split: _file_identity(path) for split, path in self.source.files.items()},
            "tokenizer": asdict(self.tokenizer_config),
            "tokenizer_file": _file_identity(self.tokenizer_config.file) if self.tokenizer_config.file else None,
            "max_length": self.max_length,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = Path(self.source.train_file).stem if self.source.train_file else self.source.dataset.replace("/", "--")
        return cache_dir() / "prepared" / f"{name}-{digest}"

    @property
    def tokenizer_file(self) -> Path:
        return self.prepared_dir / "tokenizer.json"

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
            tokenizer = train_tokenizer(batched(splits["train"]["text"]), self.tokenizer_config)
            tokenizer.enable_truncation(self.max_length)
            pad_id = tokenizer.token_to_id(PAD)
            labels = splits["train"].features["label"].names

            def encode(batch: dict) -> dict:
                ids = [e.ids for e in tokenizer.encode_batch(batch["text"])]
                return {"input_ids": ids, "length": [len(x) for x in ids]}

            with atomic_dir(target) as scratch:
                tokenized = splits.map(encode, batched=True, num_proc=None, desc="Tokenizing")
                tokenized = tokenized.filter(lambda b: [n > 0 for n in b["length"]], batched=True)
                tokenized.save_to_disk(str(scratch / "splits"))
                tokenizer.save(str(scratch / "tokenizer.json"))
                meta = {
                    "vocab_size": tokenizer.get_vocab_size(),
                    "pad_id": pad_id,
                    "labels": labels,
                    "max_length": self.max_length,
                    "sizes": {s: len(tokenized[s]) for s in SPLITS},
                }
                (scratch / "meta.json").write_text(json.dumps(meta, indent=2))
            log.info("prepared %s: %s", target.name, meta["sizes"])

    def setup(self, stage: str | None = None) -> None:
        import datasets

        if self.splits:
            return
        self.meta  # prepares the data when this process has not
        loaded = datasets.load_from_disk(str(self.prepared_dir / "splits"))
        self.splits = {s: loaded[s].select_columns(["input_ids", "length", "label"]) for s in SPLITS}

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_file)

    # --- loaders ---

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        data = self.splits[split]
        sampler = BucketBatchSampler(
            data["length"], self.batch_size, shuffle=shuffle, seed=self.source.split_seed, rank=rank, world_size=world
        )
        return DataLoader(
            TokenizedSplit(data),
            batch_sampler=sampler,
            collate_fn=Collate(self.pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _file_identity(path: str) -> dict:
    """Path, size and modification time: a changed file gets a new cache entry."""
    p = Path(path)
    if not p.exists():
        return {"path": str(p)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
