"""The best checkpoint and early stopping, decided by one rule: the highest validation accuracy and,
among epochs tied on it, the lowest validation loss.

Validation accuracy moves in steps of one example: on a few hundred of them many epochs tie, and keeping
the first of the tied ones keeps the least trained. The loss ranks tied epochs by how surely they are right.
Measured on validation data alone by scripts/selection_rules.py (an epoch chosen on a random 80% of the
validation split and scored on the other 20%, the same 300 splits for each rule, seeds 1-3 of the default
recipe), against keeping the first of the tied epochs: movie-snippets -0.04 points, trec6 +0.17, sms-spam +0.02,
bbc-news +0.16.

A model may name the two figures (`selection_metrics`): nlprnn's TextClassifier with a linear blend follows its
network's own, val_network_acc and val_network_loss, since the frozen linear model's share would mask them.
"""

from __future__ import annotations

import filecmp
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from nlprnn.atomic import copy_file
from nlprnn.errors import UserError

MONITOR, TIE_BREAK = "val_acc", "val_loss"


def selection_metrics(model: L.LightningModule) -> tuple[str, str]:
    """The validation accuracy and loss that choose `model`'s best epoch: its own `selection_metrics` if it names
    them (nlprnn's TextClassifier with a linear blend follows its network's), else val_acc and val_loss."""
    return getattr(model, "selection_metrics", (MONITOR, TIE_BREAK))


class BestCheckpoint(ModelCheckpoint):
    """`<dirpath>/best.ckpt`: the epoch with the highest val_acc, ties going to the lower val_loss.

    With `patience`, training also ends after that many epochs without a better epoch. The checkpoint decides
    both, so the epoch kept and the epochs waited never disagree.
    """

    def __init__(self, dirpath: Path, patience: int | None = None) -> None:
        # Saved when validation ends, before the epoch's last.ckpt (nlprnn.callbacks.last_checkpoint): a resume
        # then finds this epoch's decision in it. Lightning would otherwise save after last.ckpt is written.
        super().__init__(dirpath=dirpath, filename="best", monitor=MONITOR, mode="max", auto_insert_metric_name=False,
                         save_on_train_epoch_end=False)
        self.patience = patience
        self.tie_break = TIE_BREAK
        self.best_epoch = -1  # none yet
        self.best_tie_break = math.inf
        self.stopped_epoch = -1
        self.max_epochs: int | None = None  # saved with the patience: a resume must keep the length of training
        self.length: dict[str, Any] | None = None  # and the rest of what fixes it (training_length)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.monitor, self.tie_break = selection_metrics(pl_module)
        self.max_epochs, self.length = planned_epochs(trainer), training_length(trainer)
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_epoch >= 0:  # resumed from a run that had already stopped early: it stays stopped
            trainer.should_stop = True
            rank_zero_info(f"the run stopped early after epoch {self.stopped_epoch}; no further epoch is trained")

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        loss = float(trainer.callback_metrics.get(self.tie_break, math.inf))
        better = super().check_monitor_top_k(trainer, current)  # strictly higher accuracy, or the first epoch
        if not better and current is not None and self.best_model_score is not None:
            tied = bool(current == self.best_model_score) and loss < self.best_tie_break
            better = trainer.strategy.reduce_boolean_decision(tied)  # every process decides alike
        if better:
            self.best_epoch, self.best_tie_break = trainer.current_epoch, loss
        return better

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        best = self.best_epoch
        if (self.patience is None or best < 0 or trainer.sanity_checking or trainer.should_stop
                or trainer.current_epoch - best < self.patience):
            return
        trainer.should_stop = True
        self.stopped_epoch = trainer.current_epoch
        rank_zero_info(f"stopped early after epoch {trainer.current_epoch}: no better validation epoch in the "
                       f"last {self.patience} (best: epoch {best})")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_epoch": self.best_epoch, "best_tie_break": self.best_tie_break,
                "patience": self.patience, "stopped_epoch": self.stopped_epoch, "max_epochs": self.max_epochs,
                "length": self.length}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath", self.dirpath)
        if saved_dir == self.dirpath:
            super().load_state_dict(state_dict)
        else:
            # Resumed in another folder (a checkpoint of another run, or a moved or renamed run folder). Lightning
            # would forget the best score, so any next epoch would count as better, yet keep pointing at the old
            # folder's best.ckpt, which calibration would then rewrite. The decision goes on; the file is this folder's.
            self.adopt_best(state_dict, copy=rank_zero_only.rank == 0)
            here = str(Path(self.dirpath) / Path(state_dict["best_model_path"]).name) if state_dict.get(
                "best_model_path") else ""
            self.best_model_score = state_dict["best_model_score"]
            self.best_model_path = self.kth_best_model_path = here
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            self.best_k_models = {here: self.best_model_score} if here else {}
            self.current_score = state_dict.get("current_score")
        self.best_epoch = state_dict.get("best_epoch", -1)
        self.best_tie_break = state_dict.get("best_tie_break", math.inf)
        self.stopped_epoch = state_dict.get("stopped_epoch", -1)

    def adopt_best(self, state_dict: dict[str, Any], copy: bool = True) -> None:
        """Make this folder hold the best checkpoint that `state_dict` (saved in another folder) names.

        A folder whose best.ckpt is of that best epoch (moved or renamed along with its run) is used as it is;
        otherwise the old folder's file is copied here (with `copy`), so nothing is ever written to the other
        run's folder. Raises UserError when the file is in neither, or when this folder holds another best.ckpt,
        which a copy would overwrite.
        """
        saved = state_dict.get("best_model_path")
        if not saved:
            return
        source, target = Path(saved), Path(self.dirpath) / Path(saved).name
        if target.exists():
            # the same file as the other folder's, or, that one gone (a moved run), one of the same epoch
            if (filecmp.cmp(source, target, shallow=False) if source.exists()
                    else checkpoint_epoch(target) == state_dict.get("best_epoch", checkpoint_epoch(target))):
                return
            raise UserError(f"cannot resume into {self.dirpath}: its {target.name} is not the best epoch the "
                            "checkpoint names; resume into a new run folder (another --run_name)")
        if not source.exists():
            raise UserError(f"cannot resume: the checkpoint's best epoch was saved as {source}, which no longer "
                            f"exists, and {self.dirpath} holds no {target.name}; copy it there, or start a new run")
        if copy:
            copy_file(source, target)


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file was saved in; None if it cannot be read."""
    try:  # mmap: reads the small entries, not the weights
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("epoch")
    except Exception:
        return None


def planned_epochs(trainer: L.Trainer) -> int:
    """max_epochs as Lightning resolves it when fit starts: unset, 1000, or -1 (no limit) beside max_steps or max_time."""
    if trainer.max_epochs is not None:
        return trainer.max_epochs
    timed = any(isinstance(c, Timer) for c in trainer.callbacks)
    return 1000 if trainer.max_steps == -1 and not timed else -1


def training_length(trainer: L.Trainer) -> dict[str, Any]:
    """Besides max_epochs, what fixes the number of optimizer steps (Lightning's estimated_stepping_batches), which
    the learning-rate schedule spans."""
    return {"max_steps": trainer.max_steps, "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "limit_train_batches": trainer.limit_train_batches}
