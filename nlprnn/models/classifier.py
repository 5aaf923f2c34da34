"""TextClassifier: embedding -> recurrent encoder -> pooling -> linear head, with loss, metrics and schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from nlprnn.models.encoder import RNNEncoder
from nlprnn.models.pooling import Pooling, PoolingKind


class TextClassifier(L.LightningModule):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        pad_id: int = 0,
        embedding_dim: int = 128,
        embedding_dropout: float = 0.0,
        encoder: Callable[[int], RNNEncoder] = RNNEncoder,
        pooling: PoolingKind = "last",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_decay: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        """A recurrent text classifier.

        Args:
            vocab_size: embedding rows (linked from the data).
            num_classes: output classes (linked from the data).
            pad_id: the padding token id (linked from the data).
            embedding_dim: width of the token embeddings.
            embedding_dropout: dropout on the embedded tokens.
            encoder: the recurrent encoder; it is given embedding_dim as its input size.
            pooling: how token states become one vector: last, mean, max or attention.
            dropout: dropout before the output layer.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear learning-rate warm-up from 0.
            lr_decay: decay the learning rate to 0 along a cosine over the rest of training.
            label_smoothing: cross-entropy label smoothing.
        """
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.encoder = encoder(embedding_dim)
        self.pooling = Pooling(pooling, self.encoder.output_dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.output_dim, num_classes))
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = MetricCollection(
            {"acc": MulticlassAccuracy(num_classes, average="micro"), "f1_macro": MulticlassF1Score(num_classes, average="macro")}
        )
        self.metrics = nn.ModuleDict({f"{stage}_metrics": metrics.clone(prefix=f"{stage}_") for stage in ("train", "val", "test")})

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, real tokens first, and (B,) lengths -> (B, num_classes) logits."""
        x = self.embedding_dropout(self.embedding(input_ids))  # (B, T, E)
        encoded = self.encoder(x, lengths)
        return self.head(self.pooling(encoded, lengths))

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["lengths"])
        loss = self.loss(logits.float(), batch["labels"])
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits, batch["labels"])
        on_step = stage == "train"
        size = batch["labels"].numel()
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=not on_step)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, decay = self.hparams.warmup_steps, self.hparams.lr_decay
        if not warmup and not decay:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not decay:
                return 1.0
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
