"""TrainingMonitor: padding efficiency and throughput over a logging window."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nlprnn.callbacks.telemetry import TrainingMonitor


class Recorder:
    """Stands in for a LightningModule: collects what is logged."""

    def __init__(self) -> None:
        self.logged: dict[str, list[float]] = {}

    def log(self, name: str, value: torch.Tensor | float, **_) -> None:
        self.logged.setdefault(name, []).append(float(value))


def test_training_monitor_logs_padding_efficiency_and_throughput_per_window():
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=2, strategy=SimpleNamespace(reduce=lambda t, **_: t),
                              train_dataloader=None)
    module, monitor = Recorder(), TrainingMonitor()
    monitor.on_train_epoch_start(trainer, module)
    batches = [(torch.zeros(2, 3), torch.tensor([3, 1])), (torch.zeros(3, 2), torch.tensor([2, 2, 1]))]
    for step, (ids, lengths) in enumerate(batches, start=1):
        monitor.on_train_batch_start(trainer, module, {"input_ids": ids, "lengths": lengths}, step - 1)
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, step - 1)
    # One window of two steps: 4 + 5 real tokens in 6 + 6 padded positions.
    assert module.logged["padding_efficiency"] == [pytest.approx(9 / 12)]
    assert len(module.logged["tokens_per_sec"]) == 1 and module.logged["tokens_per_sec"][0] > 0
