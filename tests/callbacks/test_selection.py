"""BestCheckpoint on scripted validation curves: which epoch is kept, when training stops."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from nlprnn.callbacks.last_checkpoint import LastCheckpoint
from nlprnn.callbacks.selection import BestCheckpoint
from nlprnn.errors import UserError


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


def test_a_run_resumed_after_it_stopped_early_trains_no_further_epoch(tmp_path):
    curve = [(0.5, 0.9), (0.4, 0.9), (0.4, 0.9), (0.9, 0.1), (0.95, 0.1)]
    _, stopped = train(tmp_path, curve, patience=2, last=True)
    assert stopped.current_epoch == 3  # stopped after epoch 2, before epoch 3's 0.9
    best = BestCheckpoint(tmp_path, patience=2)
    trainer = L.Trainer(max_epochs=len(curve), callbacks=[best, LastCheckpoint(tmp_path)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ScriptedValidation(curve), ckpt_path=tmp_path / "last.ckpt")  # a requeue, or a crash in the test
    assert trainer.current_epoch == 3 and best.best_epoch == 0 and best.stopped_epoch == 2


def test_without_patience_training_runs_its_whole_budget(tmp_path):
    best, trainer = train(tmp_path, [(0.9, 0.1)] + [(0.5, 0.9)] * 5)
    assert best.best_epoch == 0 and best.stopped_epoch == -1 and trainer.current_epoch == 6


def resume(tmp_path, run_dir, checkpoint, curve):
    """Continue the scripted run from `checkpoint` with a BestCheckpoint in `run_dir`."""
    best = BestCheckpoint(run_dir)
    trainer = L.Trainer(max_epochs=len(curve), callbacks=[best, LastCheckpoint(run_dir)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ScriptedValidation(curve), ckpt_path=checkpoint)
    return best


CURVE = [(0.5, 0.9), (0.6, 0.8), (0.7, 0.7)]  # the best epoch is the last one, 2
WORSE = [(0.6, 0.5), (0.65, 0.4)]  # the epochs after the resume: none of them better


def test_a_resume_into_another_folder_keeps_the_best_epoch_and_copies_its_checkpoint(tmp_path):
    train(tmp_path / "a", CURVE, last=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    best = resume(tmp_path, tmp_path / "b", tmp_path / "a" / "last.ckpt", CURVE + WORSE)
    # the score came along, so the worse epochs after the resume did not count as better
    assert best.best_epoch == 2 and best.best_model_score == pytest.approx(0.7)
    assert best.best_model_path == str((tmp_path / "b" / "best.ckpt").resolve()) and saved_epoch(best) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # the other run's folder untouched


def test_a_renamed_run_folder_resumes_with_its_own_best_checkpoint(tmp_path):
    train(tmp_path / "a", CURVE, last=True)
    (tmp_path / "a").rename(tmp_path / "renamed")
    best = resume(tmp_path, tmp_path / "renamed", tmp_path / "renamed" / "last.ckpt", CURVE + WORSE)
    assert best.best_epoch == 2 and best.best_model_score == pytest.approx(0.7)
    assert best.best_model_path == str((tmp_path / "renamed" / "best.ckpt").resolve()) and saved_epoch(best) == 2
    assert not (tmp_path / "a").exists()


def test_a_resume_whose_best_checkpoint_is_gone_or_would_be_overwritten_is_refused(tmp_path):
    train(tmp_path / "a", CURVE, last=True)
    state = torch.load(tmp_path / "a" / "last.ckpt", map_location="cpu", weights_only=False)
    (saved,) = [s for k, s in state["callbacks"].items() if k.startswith("BestCheckpoint")]
    train(tmp_path / "other", [(0.9, 0.1)])  # a best.ckpt of epoch 0, not the checkpoint's epoch 2
    with pytest.raises(UserError, match="its best.ckpt is not the best epoch the checkpoint names"):
        BestCheckpoint(tmp_path / "other").load_state_dict(saved)
    train(tmp_path / "same-epoch", CURVE, last=True)  # another run whose best is of the same epoch, 2
    before = (tmp_path / "same-epoch" / "best.ckpt").read_bytes()
    with pytest.raises(UserError, match="its best.ckpt is not the best epoch the checkpoint names"):
        BestCheckpoint(tmp_path / "same-epoch").load_state_dict(saved)
    assert (tmp_path / "same-epoch" / "best.ckpt").read_bytes() == before
    (tmp_path / "a" / "best.ckpt").unlink()
    with pytest.raises(UserError, match=r"a/best.ckpt, which no longer exists, and .*/b holds no best.ckpt"):
        BestCheckpoint(tmp_path / "b").load_state_dict(saved)
    assert not (tmp_path / "b").exists()
