"""Resuming the same batches: a resumed epoch continues with the batch after the last one trained on.

RestoreLoaderPosition saves and restores the batch sampler's position; check_resumable and check_same_batches
refuse, before anything is written, a checkpoint that is unreadable or whose batches would differ (batch size,
world size, seed, data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from nlprnn.data.batching import BucketBatchSampler, Change, ResumableLoader, ResumeMismatch
from nlprnn.errors import UserError


class RestoreLoaderPosition(Callback):
    """Saves the training batch sampler's state in every checkpoint; restores it when a run resumes.

    The one place the data position is restored: ResumableLoader is not stateful to Lightning, which
    would restore it only when it creates the loader after loading the checkpoint (not so when
    configure_optimizers reads `trainer.estimated_stepping_batches` for an LR schedule). At train start
    the loader exists on every path and has not drawn a batch, so the sampler starts the resumed epoch
    after its saved position and the batches trained on are never read. A state whose batches differ
    (batch size, world size, seed, data) is refused with a UserError.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._resuming_from: str | None = None  # the checkpoint being resumed, once it is loaded
        self._state: dict[str, Any] | None = None  # its sampler state

    @staticmethod
    def saved_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """The training batch sampler's state in a checkpoint written with this callback; None if absent."""
        return checkpoint.get("callbacks", {}).get(RestoreLoaderPosition.__qualname__, {}).get("batch_sampler")

    @staticmethod
    def _sampler(trainer: L.Trainer | None) -> BucketBatchSampler | None:
        loader = trainer.train_dataloader if trainer is not None else None
        sampler = loader.batch_sampler if isinstance(loader, ResumableLoader) else None
        return sampler if isinstance(sampler, BucketBatchSampler) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() is called without it

    def state_dict(self) -> dict[str, Any]:
        sampler = self._sampler(self._trainer)
        return {"batch_sampler": sampler.state_dict()} if sampler is not None else {}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return
        self._resuming_from = Path(str(trainer.ckpt_path)).name
        self._state = self.saved_state(checkpoint)
        if self._state is None:  # refused here, before Lightning meets an older checkpoint's loader state
            raise no_saved_position(self._resuming_from)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name, state = self._resuming_from, self._state
        self._resuming_from = self._state = None
        sampler = self._sampler(trainer)
        if name is None or state is None or sampler is None:
            return
        try:
            sampler.load_state_dict(state)
        except ResumeMismatch as err:
            raise resume_refusal(name, err.changes) from None


def check_resumable(path: Path) -> dict[str, Any]:
    """The checkpoint at `path` (its tensors memory-mapped); UserError unless it is complete, with training state."""
    if not path.is_file():
        raise UserError(f"cannot resume: there is no checkpoint at {path}")
    try:
        # mmap reads the archive's index and metadata, not the tensor data: cheap, and catches truncation
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise UserError(
            f"cannot resume: {path} is not a readable checkpoint ({type(err).__name__}); it is probably truncated "
            "or corrupt. Resume from another checkpoint (e.g. best.ckpt) or start a new run"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "optimizer_states", "loops"} <= checkpoint.keys():
        raise UserError(f"cannot resume: {path} holds no training state (model, optimizer and loop positions)")
    return checkpoint


def check_same_batches(checkpoint: dict[str, Any], sampler: BucketBatchSampler, checkpoint_name: str) -> None:
    """UserError unless `checkpoint`'s training batches are those `sampler` (this run's) makes, so that a position
    in its epoch means the same examples here."""
    saved = RestoreLoaderPosition.saved_state(checkpoint)
    if saved is None:
        raise no_saved_position(checkpoint_name)
    if changes := sampler.changes(saved):
        raise resume_refusal(checkpoint_name, changes)


def no_saved_position(checkpoint_name: str) -> UserError:
    """One line: the checkpoint records no batch order or position to resume from."""
    return UserError(
        f"cannot resume: {checkpoint_name} does not record the order of its training batches and its place in "
        "the epoch (it was written by an earlier nlprnn or without RestoreLoaderPosition); start a new run"
    )


def resume_refusal(checkpoint_name: str, changes: list[Change]) -> UserError:
    """One line: what changed since the checkpoint, and the options that resume it."""
    what, how = [], []
    for change in changes:
        if change.name == "batch_size":
            what.append(f"the batch size changed from {change.saved} to {change.current}")
            how.append(f"--data.batch_size {change.saved}")
        elif change.name == "world_size":
            what.append(f"the number of training processes changed from {change.saved} to {change.current}")
            how.append(f"{change.saved} processes (--trainer.devices times --trainer.num_nodes)")
        elif change.name == "seed":
            what.append(f"the data seed changed from {change.saved} to {change.current}")
            how.append(f"--data.split_seed {change.saved}")
        elif change.name == "dataset":
            saved, current = (change.saved or {}).get("examples"), change.current["examples"]
            counts = f"{saved} examples then, {current} now" if saved != current else "other lengths"
            what.append(f"the training data changed ({counts})")
            how.append("the data it was trained on")
        else:
            what.append(f"the batching changed ({change.name} {change.saved} then, {change.current} now)")
            how.append("the nlprnn version that wrote it")
    return UserError(
        f"cannot resume: {' and '.join(what)} since {checkpoint_name}, so its place in the epoch would name other "
        f"examples; resume with {', '.join(how)}, or start a new run"
    )
