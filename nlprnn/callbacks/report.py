"""ConfusionMatrixReport: the test confusion matrix (W&B chart + PNG) and per-class precision and recall."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassPrecision, MulticlassRecall

from nlprnn.atomic import write_bytes


class ConfusionMatrixReport(Callback):
    """At test time: a confusion matrix and per-class precision and recall.

    The scores are logged as test_precision_<label> and test_recall_<label> (so they land in
    metrics.json beside the model's test_f1_<label>); the matrix goes to W&B as a confusion-matrix
    chart and image, and to `<run_dir>/confusion_matrix.png`. Counts are summed over all devices
    before anything is derived; classes are named by the datamodule's labels (else 0, 1, ...). Needs the
    model's test_step to return the batch's (B, C) logits.
    """

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self.matrix: MulticlassConfusionMatrix | None = None
        self.scores: MetricCollection | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        num_classes = pl_module.hparams.num_classes
        self.matrix = MulticlassConfusionMatrix(num_classes).to(pl_module.device)
        # One compute group: precision and recall share a single per-class tp/fp/fn state. A class never
        # predicted (or never seen) scores 0, not NaN, so metrics.json stays valid JSON.
        self.scores = MetricCollection({
            "precision": MulticlassPrecision(num_classes, average="none", zero_division=0),
            "recall": MulticlassRecall(num_classes, average="none", zero_division=0),
        }).to(pl_module.device)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = outputs.detach()  # (B, C)
        self.matrix.update(logits, batch["labels"])
        self.scores.update(logits, batch["labels"])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self.matrix.compute()  # (C, C): rows true class, columns predicted; synced across devices
        labels = getattr(trainer.datamodule, "labels", None) or [str(i) for i in range(len(counts))]
        for name, values in self.scores.compute().items():  # each (C,), synced across devices
            for label, value in zip(labels, values):
                pl_module.log(f"test_{name}_{label}", value, on_step=False, on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            self._publish(trainer, counts.cpu().numpy(), labels)

    def _publish(self, trainer: L.Trainer, counts: np.ndarray, labels: list[str]) -> None:
        png = plot_confusion_matrix(counts, labels)
        if self.run_dir is not None:
            write_bytes(self.run_dir / "confusion_matrix.png", png)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb
                from PIL import Image

                classes = range(len(labels))
                rows = [[labels[i], labels[j], int(counts[i, j])] for i in classes for j in classes]
                table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
                chart = wandb.plot_table(
                    "wandb/confusion_matrix/v1", table,
                    {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                    {"title": "Test confusion matrix"},
                )
                image = wandb.Image(Image.open(io.BytesIO(png)), caption="rows: true class, columns: predicted")
                logger.experiment.log({"test_confusion_matrix": chart, "test_confusion_matrix_image": image})


def plot_confusion_matrix(counts: np.ndarray, labels: list[str]) -> bytes:
    """A PNG of the (C, C) matrix: counts in each cell, shaded by each true class's share.

    Not torchmetrics' MulticlassConfusionMatrix.plot(): that shades by the printed value, so with counts
    a minority class's errors look as pale as no errors, and with normalize="true" the counts are gone.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    size = 1.5 + 0.6 * len(labels)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()
