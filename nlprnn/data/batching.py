"""Length-bucketed, distributed batches and their collation into padded tensors."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from nlprnn.padding import pad_rows


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples, so little padding is computed.

    Each epoch: shuffle all indices, cut them into windows of `window_batches` batches, sort each
    window by length and cut it into batches of at most `batch_size`, then shuffle the batches.
    Batches never straddle two windows, so a long example is never padded next to a short one from
    elsewhere. Without shuffling (evaluation) the whole split is sorted by length once.

    Under distributed training every rank builds the same batch list from the same seed and epoch,
    then takes every `world_size`-th batch, so ranks see disjoint examples and the same number of
    batches. To make that count a multiple of `world_size` without repeating or dropping examples,
    the largest batches are halved until it is.

    A run resumed mid-epoch goes on where it stopped: `state_dict()` records the order's inputs (seed,
    epoch, batch size, world size, a fingerprint of the data) and the position in the epoch, and
    `load_state_dict()` makes the next pass over that epoch start after that position, so the batches
    already trained on are never read. A state whose order differs from this sampler's is refused
    (ResumeMismatch): the same position would then name other examples.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        window_batches: int = 50,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.window_batches = window_batches
        self.window = batch_size * window_batches
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.num_batches = self._count_batches()
        self.start = 0  # where the current pass over the epoch began (non-zero after a resume)
        # Batches of this epoch handed to training. Counted here as they are drawn; a DataLoader with
        # workers draws ahead of training, so ResumableLoader sets it from the batches it delivered.
        self.position = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, position) from load_state_dict

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch: a new epoch gets a new order."""
        self.epoch = epoch

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        """The example count and a hash of the lengths: the same data gives the same value on every rank."""
        digest = hashlib.sha256(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes()).hexdigest()
        return {"examples": len(self.lengths), "lengths_sha256": digest[:16]}

    def state_dict(self) -> dict[str, Any]:
        """The order's inputs and how many of this epoch's batches (per rank) training has received."""
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
            "world_size": self.world_size, "window_batches": self.window_batches, "shuffle": self.shuffle,
            "dataset": self.fingerprint,
        }

    def changes(self, state: dict[str, Any]) -> list[Change]:
        """What differs between a saved state and this sampler, among what decides the batches' order."""
        current = self.state_dict()
        return [
            Change(name, state.get(name), current[name])
            for name in ("batch_size", "world_size", "seed", "dataset", "window_batches", "shuffle")
            if state.get(name) != current[name]
        ]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue `state`'s epoch after its position; raise ResumeMismatch if its order is not this one's."""
        changes = self.changes(state)
        if changes:
            raise ResumeMismatch(changes)
        self.epoch = state["epoch"]
        self._resume_at = (state["epoch"], state["position"])

    def _window_sizes(self) -> list[int]:
        n = len(self.lengths)
        if not self.shuffle:
            return [n] if n else []
        return [min(self.window, n - start) for start in range(0, n, self.window)]

    def _count_batches(self) -> int:
        """Batches over all ranks: a fixed number, so every epoch and every rank agrees on it."""
        cut = sum(math.ceil(size / self.batch_size) for size in self._window_sizes())
        total = self.world_size * math.ceil(cut / self.world_size)
        if total > len(self.lengths):
            raise ValueError(
                f"{len(self.lengths)} examples cannot fill {total} batches, {total // self.world_size} for each of "
                f"{self.world_size} ranks, without repeating some"
            )
        return total

    def _all_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[np.ndarray] = []
        start = 0
        for size in self._window_sizes():
            window = order[start : start + size]
            start += size
            # a stable sort keeps the shuffled order among equal lengths
            window = window[np.argsort(self.lengths[window], kind="stable")]
            batches.extend(window[i : i + self.batch_size] for i in range(0, size, self.batch_size))
        while len(batches) < self.num_batches:  # halve the largest batch until the count is a multiple of world_size
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            big = batches.pop(largest)
            batches[largest:largest] = [big[: len(big) // 2], big[len(big) // 2 :]]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # The resume point applies once, and only if the epoch Lightning sets is the saved one: a saved
        # epoch that had ended is followed by a new epoch from its first batch.
        resume, self._resume_at = self._resume_at, None
        self.start = resume[1] if resume is not None and resume[0] == self.epoch else 0
        self.position = self.start
        for batch in self._all_batches()[self.rank :: self.world_size][self.start :]:
            self.position += 1
            yield batch.tolist()

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def padding_efficiency(self) -> float:
        """Real tokens / padded tokens over this rank's batches of the current epoch."""
        real = padded = 0
        for batch in self._all_batches()[self.rank :: self.world_size]:
            lengths = self.lengths[batch]
            real += int(lengths.sum())
            padded += int(lengths.max()) * len(batch)
        return real / max(padded, 1)


class Change(NamedTuple):
    """A setting that decides the batches' order, as saved and as it is now."""

    name: str
    saved: Any
    current: Any


class ResumeMismatch(ValueError):
    """A saved sampler state whose batches differ from this sampler's: its position would mean other examples."""

    def __init__(self, changes: list[Change]) -> None:
        super().__init__("; ".join(f"{c.name}: {c.saved} then, {c.current} now" for c in changes))
        self.changes = changes


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
        ids, lengths = pad_rows(batch["input_ids"], self.pad_id)
        return {
            "input_ids": torch.from_numpy(ids),
            "lengths": torch.from_numpy(lengths),
            "labels": torch.as_tensor(batch["label"], dtype=torch.long),
        }


class ResumableLoader:
    """A training DataLoader over a BucketBatchSampler that keeps the sampler's position exact.

    The position itself lives in the sampler (see BucketBatchSampler.state_dict); this wrapper sets it
    from the batches actually delivered, since DataLoader workers draw batches ahead of training. It is
    deliberately not stateful to Lightning: RestoreLoaderPosition saves and restores the sampler, the one
    place that does. Lightning looks for `set_epoch` on `loader.sampler`, which a batch sampler is not;
    this wrapper passes it on.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batch_sampler = loader.batch_sampler

    @property
    def sampler(self) -> ResumableLoader:
        return self  # Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)  # the whole epoch, also when resumed: Lightning counts the trained batches in

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A generator: its body, and so the epoch's order, starts at the first batch, after set_epoch.
        sampler = self.batch_sampler
        for delivered, batch in enumerate(self.loader, start=1):
            if isinstance(sampler, BucketBatchSampler):
                sampler.position = sampler.start + delivered
            yield batch
