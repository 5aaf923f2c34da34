"""LastCheckpoint: last.ckpt every N steps, at each epoch end and on SIGTERM, never from a diverged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nlprnn.callbacks.nonfinite import NonFiniteLoss, NonFiniteLossGuard


class LastCheckpoint(Callback):
    """Keeps `<dirpath>/last.ckpt` current.

    Writes it every `every_n_steps` optimizer steps (0: not within epochs), at each epoch end (after
    validation) and when SIGTERM stops the run; `guard` is checked before every write. A SIGTERM that comes
    during an epoch's validation waits for the validation to end: stopped in the middle, last.ckpt would hold
    the epoch's training but not its validation, which a resume never runs.
    """

    def __init__(self, dirpath: Path, every_n_steps: int = 0, guard: NonFiniteLossGuard | None = None) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.guard = guard
        self._saved_step = -1
        self._deferred_sigterm = False

    def save(self, trainer: L.Trainer) -> None:
        if self.guard is not None:
            self.guard.check(trainer)
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state, said so: no log line
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            if validation_follows(trainer):
                return  # a resume from here would skip that validation: the save after it (epoch end) covers it
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        connector = trainer._signal_connector  # Lightning reads its flag right after this hook, to stop validating
        if trainer.state.fn == "fit" and not trainer.sanity_checking and connector.received_sigterm:
            connector.received_sigterm, self._deferred_sigterm = False, True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferred_sigterm:  # the fit loop stops once the epoch is complete, after last.ckpt is written
            trainer._signal_connector.received_sigterm, self._deferred_sigterm = True, False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException between two batches, so the state is consistent.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            try:
                self.save(trainer)
            except NonFiniteLoss:
                pass  # keep the earlier, finite last.ckpt


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after this training batch (epoch end, or a val_check_interval).

    A checkpoint written on this batch's end would restart past that validation: Lightning resumes a run saved
    at a batch's end after the validation that followed it."""
    loop = trainer.fit_loop
    return loop._data_fetcher is not None and loop.epoch_loop._should_check_val_fx(loop._data_fetcher)
