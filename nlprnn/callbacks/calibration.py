"""CalibrationReport: test-time ECE and NLL before and after the temperature, and a reliability diagram."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torchmetrics import Metric

from nlprnn.atomic import write_bytes
from nlprnn.calibration import expected_calibration_error, nll, reliability_diagram, temperature_of


class _Gathered(Metric):
    """The test split's (N, C) logits and (N,) labels, concatenated across batches and devices."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.logits.append(logits.float())
        self.labels.append(labels)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731 (a list until synced)
        return cat(self.logits), cat(self.labels)


class CalibrationReport(Callback):
    """At test time: test_ece, test_nll (with the temperature), their _uncalibrated twins, and `temperature`.

    The temperature is the data module's `calibration` entry, which the tested checkpoint carries (see
    nlprnn.fit); without one it is 1. The values land in metrics.json and the logger like other test
    metrics; the reliability diagram goes to `<run_dir>/reliability.png` and to W&B. Needs the model's
    test_step to return the batch's (B, C) logits.
    """

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self.gathered: _Gathered | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A temperature restored with a resumed checkpoint was fitted to that checkpoint's weights: the checkpoints
        # of this training carry none, until calibration fits one to the weights the run keeps.
        if getattr(trainer.datamodule, "calibration", None) is not None:
            trainer.datamodule.calibration = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.gathered = _Gathered().to(pl_module.device)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.gathered.update(outputs.detach(), batch["labels"])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logits, labels = self.gathered.compute()  # synced: every device holds the whole split
        self.gathered.reset()
        if logits.numel() == 0:
            return
        temperature = temperature_of(getattr(trainer.datamodule, "calibration", None))
        before, after = torch.softmax(logits.double(), -1), torch.softmax(logits.double() / temperature, -1)
        values = {
            "test_ece_uncalibrated": expected_calibration_error(before, labels),
            "test_ece": expected_calibration_error(after, labels),
            "test_nll_uncalibrated": nll(logits, labels),
            "test_nll": nll(logits, labels, temperature),
            "temperature": temperature,
        }
        for name, value in values.items():  # the same on every device: no further sync
            pl_module.log(name, value, on_step=False, on_epoch=True)
        if trainer.is_global_zero:
            png = reliability_diagram({"uncalibrated": before, f"temperature {temperature:.2f}": after}, labels)
            if self.run_dir is not None:
                write_bytes(self.run_dir / "reliability.png", png)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    import wandb
                    from PIL import Image

                    logger.experiment.log({"test_reliability": wandb.Image(Image.open(io.BytesIO(png)))})
