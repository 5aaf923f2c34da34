"""TrainingMonitor: gradient norm, tokens/s and padding efficiency, without a host sync per step."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

class TrainingMonitor(Callback):
    """Logs grad_norm every step, tokens_per_sec and padding_efficiency every `log_every_n_steps` steps.

    Counts stay on the device between logging steps, so the only host sync is the one Lightning does
    when it logs. Tokens are real (non-padding) tokens over all devices; time spent in validation is
    left out. padding_efficiency_epoch is the length-bucketed sampler's plan for the whole epoch.
    """

    def __init__(self) -> None:
        self._real: torch.Tensor | None = None  # () real tokens in the current window, on the device
        self._padded = 0  # padded tokens (B * T summed) in the current window; known on the host
        self._window_start = 0.0
        self._validation_start = 0.0
        self._last_logged_step = -1

    def _reset_window(self) -> None:
        self._real, self._padded, self._window_start = None, 0, time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_window()  # a run resumed mid-epoch starts here, without on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "padding_efficiency"):
            efficiency = float(sampler.padding_efficiency())  # host-side: from the epoch's batch plan
            pl_module.log("padding_efficiency_epoch", efficiency, on_step=False, on_epoch=True, sync_dist=True)
        self._reset_window()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        real = batch["lengths"].sum()  # (), stays on the device
        self._real = real if self._real is None else self._real + real
        self._padded += batch["input_ids"].numel()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: Optimizer) -> None:
        # After the backward pass (and after unscaling under 16-mixed), before clipping: the raw norm.
        norms = [p.grad.detach().norm(2, dtype=torch.float32) for p in pl_module.parameters() if p.grad is not None]
        if norms:
            pl_module.log("grad_norm", torch.stack(norms).norm(2), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        every = trainer.log_every_n_steps  # 0: no step logging
        if self._real is None or not every or step % every or step == self._last_logged_step:
            return
        self._last_logged_step = step
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        window = torch.stack([self._real.float(), torch.tensor(float(self._padded), device=self._real.device)])
        real, padded = trainer.strategy.reduce(window, reduce_op="sum")  # all devices' tokens
        pl_module.log("tokens_per_sec", real / elapsed, on_step=True, on_epoch=False)
        pl_module.log("padding_efficiency", real / padded, on_step=True, on_epoch=False)
        self._reset_window()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start += time.perf_counter() - self._validation_start
