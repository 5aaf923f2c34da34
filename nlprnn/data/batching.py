"""Length-bucketed, distributed batches and their collation into padded tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples, so little padding is computed.

    Each epoch: shuffle all indices, sort them by length inside windows of `window_batches` batches,
    cut every window into batches, shuffle the batches. Under distributed training every rank builds
    the same batch list from the same seed and epoch, then takes every `world_size`-th batch, so ranks
    see disjoint examples and the same number of batches. To make that count equal without repeating
    or dropping examples, the examples are spread over a multiple of `world_size` batches, each of at
    most `batch_size`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        window_batches: int = 50,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(lengths) < world_size:
            raise ValueError(f"{len(lengths)} examples cannot be shared among {world_size} ranks")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.window = batch_size * window_batches
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch: a new epoch gets a new order."""
        self.epoch = epoch

    def _all_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch))
            order = rng.permutation(n)
            windows = [order[i : i + self.window] for i in range(0, n, self.window)]
            # stable sort keeps the shuffled order among equal lengths
            order = np.concatenate([w[np.argsort(self.lengths[w], kind="stable")] for w in windows])
        else:
            order = np.argsort(self.lengths, kind="stable")
        num_batches = self.world_size * math.ceil(n / (self.batch_size * self.world_size))
        batches = np.array_split(order, num_batches)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(num_batches)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._all_batches()[self.rank :: self.world_size]:
            yield batch.tolist()

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / (self.batch_size * self.world_size))

    def padding_efficiency(self) -> float:
        """Real tokens / padded tokens over this rank's batches of the current epoch."""
        real = padded = 0
        for batch in self._all_batches()[self.rank :: self.world_size]:
            lengths = self.lengths[batch]
            real += int(lengths.sum())
            padded += int(lengths.max()) * len(batch)
        return real / max(padded, 1)


class TokenizedSplit(torch.utils.data.Dataset):
    """An Arrow-backed split that hands out whole batches with one columnar read."""

    def __init__(self, arrow_split) -> None:
        self.split = arrow_split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return self.split[index]

    def __getitems__(self, indices: list[int]) -> dict:
        return self.split[indices]  # {column: [values]}


class Collate:
    """Pad a columnar batch to its longest sequence: input_ids (B, T), lengths (B,), labels (B,)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        sequences = batch["input_ids"]
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        ids = np.full((len(sequences), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
        return {
            "input_ids": torch.from_numpy(ids),
            "lengths": torch.from_numpy(lengths),
            "labels": torch.as_tensor(batch["label"], dtype=torch.long),
        }
