"""NonFiniteLossGuard: stops a run whose loss turned NaN or infinite, naming the step, before a bad checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from nlprnn.errors import UserError


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Stops training once the loss has been NaN or infinite, naming the first such step.

    Each step only updates a flag on the device; the flag is read every `log_every_n_steps` steps,
    before validation, and by LastCheckpoint before it writes, so a diverged model is never saved
    and no step waits on the host.
    """

    NONE = torch.iinfo(torch.int64).max  # "no bad step yet"

    def __init__(self) -> None:
        self._first_bad: torch.Tensor | None = None  # () int64 on the device: first step with a non-finite loss

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if self._first_bad is None:
            self._first_bad = torch.tensor(self.NONE, device=loss.device)
        # global_step already counts this batch's optimizer step: the loss belongs to step `global_step`
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad, self._first_bad.clamp(max=trainer.global_step), self._first_bad)
        every = trainer.log_every_n_steps  # 0: no step logging, so the flag is read at validation and checkpoints
        if every and trainer.global_step % every == 0:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Raise NonFiniteLoss if any device has seen a non-finite loss (the one host sync, on every device)."""
        if self._first_bad is None:
            return
        first = int(trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        if first != self.NONE:
            raise NonFiniteLoss(
                f"the training loss became NaN or infinite at step {first}; stopped without saving that model "
                "(last.ckpt, if any, holds an earlier step). Lower --model.lr, set --trainer.gradient_clip_val, "
                "or use --trainer.precision 32-true or bf16-mixed instead of 16-mixed"
            )
