"""BestCheckpoint on scripted validation curves: which epoch is kept, when training stops."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from nlprnn.callbacks.last_checkpoint import LastCheckpoint
from nlprnn.callbacks.selection import BestCheckpoint


class ScriptedValidation(L.LightningModule):
    """Trains a throwaway weight; each epoch's validation logs the next (val_acc, val_loss) of a script."""

    def __init__(self, curve: list[tuple[float, float]]) -> None:
        super().__init__()
        self.curve = curve
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        acc, loss = self.curve[self.current_epoch]
        self.log("val_acc", acc)
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return [torch.zeros(1)]

    def val_dataloader(self):
        return [torch.zeros(1)]


def train(tmp_path, curve, patience=None, last=False):
    best = BestCheckpoint(tmp_path, patience)
    callbacks = [best, LastCheckpoint(tmp_path)] if last else [best]
    trainer = L.Trainer(max_epochs=len(curve), callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ScriptedValidation(curve))
    return best, trainer


def saved_epoch(best: BestCheckpoint) -> int:
    return torch.load(best.best_model_path, map_location="cpu", weights_only=False)["epoch"]


def test_a_tie_on_accuracy_goes_to_the_lower_loss_and_a_higher_accuracy_always_wins(tmp_path):
    curve = [(0.5, 0.9), (0.8, 0.5), (0.8, 0.4), (0.8, 0.45), (0.9, 0.6), (0.9, 0.6), (0.7, 0.1)]
    best, _ = train(tmp_path, curve)
    assert best.best_epoch == 4 and saved_epoch(best) == 4  # 0.9 beats 0.8 at any loss; an equal loss is no tie-break
    assert best.best_model_score == pytest.approx(0.9) and best.best_tie_break == pytest.approx(0.6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]  # one file, replaced in place


def test_the_last_checkpoint_of_an_epoch_holds_that_epochs_decision(tmp_path):
    """A resume from an epoch's last.ckpt must not forget that this epoch was the best one (or a stop)."""
    best, _ = train(tmp_path, [(0.5, 0.9), (0.6, 0.8), (0.7, 0.7)], last=True)
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    (saved,) = [s for k, s in state["callbacks"].items() if k.startswith("BestCheckpoint")]
    assert saved["best_epoch"] == 2 and saved["best_model_score"] == pytest.approx(0.7)
    _, trainer = train(tmp_path / "stop", [(0.5, 0.9), (0.4, 0.9), (0.4, 0.9), (0.9, 0.1)], patience=2, last=True)
    state = torch.load(tmp_path / "stop" / "last.ckpt", map_location="cpu", weights_only=False)
    (saved,) = [s for k, s in state["callbacks"].items() if k.startswith("BestCheckpoint")]
    assert saved["stopped_epoch"] == 2 == state["epoch"]


def test_training_stops_after_patience_epochs_without_a_better_one_and_a_tie_with_lower_loss_counts(tmp_path):
    # epoch 3 ties epoch 1 on accuracy with a lower loss: the wait starts again from it
    curve = [(0.5, 0.9), (0.8, 0.5), (0.7, 0.6), (0.8, 0.3), (0.8, 0.3), (0.6, 0.2), (0.9, 0.1), (0.95, 0.1)]
    best, trainer = train(tmp_path, curve, patience=2)
    assert best.best_epoch == 3 and best.stopped_epoch == 5  # two epochs past the best, before epoch 6's 0.9
    assert saved_epoch(best) == 3 and trainer.current_epoch == 6  # (counted once epoch 5 is done)


def test_the_best_epoch_and_its_loss_survive_a_resume(tmp_path):
    original = BestCheckpoint(tmp_path, patience=3)
    original.best_epoch, original.best_tie_break, original.stopped_epoch = 7, 0.25, 10
    resumed = BestCheckpoint(tmp_path, patience=3)
    resumed.load_state_dict(original.state_dict())
    assert (resumed.best_epoch, resumed.best_tie_break, resumed.stopped_epoch) == (7, 0.25, 10)


def test_without_patience_training_runs_its_whole_budget(tmp_path):
    best, trainer = train(tmp_path, [(0.9, 0.1)] + [(0.5, 0.9)] * 5)
    assert best.best_epoch == 0 and best.stopped_epoch == -1 and trainer.current_epoch == 6
