"""Trainer callbacks and plug-ins: training telemetry, the test report, and fault tolerance.

- TrainingMonitor: gradient norm, tokens/s and padding efficiency, without a host sync per step.
- ConfusionMatrixReport: confusion matrix (W&B chart + PNG) and per-class precision and recall.
- NonFiniteLossGuard: stops a run whose loss turned NaN/inf, naming the step, before a bad checkpoint is written.
- LastCheckpoint + AtomicCheckpointIO: last.ckpt every N steps, at each epoch end and on SIGTERM, never half-written.
- RestoreLoaderPosition + check_resumable: a resumed epoch continues with the batch after the last one trained on,
  and a resume whose batches would differ (batch size, world size, seed, data) is refused.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassConfusionMatrix

from nlprnn.atomic import replacing, write_bytes
from nlprnn.data.batching import BucketBatchSampler, Change, ResumableLoader, ResumeMismatch
from nlprnn.errors import UserError

# --- telemetry ------------------------------------------------------------------------------------


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

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # After the backward pass (and after unscaling under 16-mixed), before clipping: the raw norm.
        norms = [p.grad.detach().norm(2, dtype=torch.float32) for p in pl_module.parameters() if p.grad is not None]
        if norms:
            pl_module.log("grad_norm", torch.stack(norms).norm(2), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._real is None or step % trainer.log_every_n_steps or step == self._last_logged_step:
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


class ConfusionMatrixReport(Callback):
    """At test time: a confusion matrix and per-class precision and recall.

    The scores are logged as test_precision_<label> and test_recall_<label> (so they land in
    metrics.json beside the model's test_f1_<label>); the matrix goes to W&B as a confusion-matrix
    chart and image, and to `<run_dir>/confusion_matrix.png`. Counts are summed over all devices
    before anything is derived. Needs the model's test_step to return the batch's (B, C) logits.
    """

    def __init__(self, run_dir: Path | None = None, labels: list[str] | None = None) -> None:
        self.run_dir = run_dir
        self.labels = labels
        self.matrix: MulticlassConfusionMatrix | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.matrix = MulticlassConfusionMatrix(pl_module.hparams.num_classes).to(pl_module.device)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.matrix.update(outputs.detach(), batch["labels"])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self.matrix.compute()  # (C, C): rows true class, columns predicted; synced across devices
        labels = self.labels or getattr(trainer.datamodule, "labels", None) or [str(i) for i in range(len(counts))]
        scores = per_class_scores(counts.double())
        for name in ("precision", "recall"):
            for label, value in zip(labels, scores[name]):
                pl_module.log(f"test_{name}_{label}", value.float(), on_step=False, on_epoch=True, sync_dist=True)
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


def per_class_scores(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """(C, C) confusion counts (rows true, columns predicted) -> precision, recall, f1, each (C,); 0 where undefined."""
    hits = counts.diagonal()
    predicted, actual = counts.sum(0), counts.sum(1)
    precision = hits / predicted.clamp(min=1)
    recall = hits / actual.clamp(min=1)
    f1 = 2 * hits / (predicted + actual).clamp(min=1)  # = 2PR / (P + R), and 0 when both are 0
    return {"precision": precision, "recall": recall, "f1": f1}


def plot_confusion_matrix(counts: np.ndarray, labels: list[str]) -> bytes:
    """A PNG of the (C, C) matrix: counts in each cell, shaded by each true class's share."""
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


# --- faults -----------------------------------------------------------------------------------------


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
        if trainer.global_step % trainer.log_every_n_steps == 0:
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


class LastCheckpoint(Callback):
    """Keeps `<dirpath>/last.ckpt` current.

    Writes it every `every_n_steps` optimizer steps (0: not within epochs), at each epoch end (after
    validation) and when SIGTERM stops the run; `guard` is checked before every write.
    """

    def __init__(self, dirpath: Path, every_n_steps: int = 0, guard: NonFiniteLossGuard | None = None) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.guard = guard
        self._saved_step = -1

    def save(self, trainer: L.Trainer) -> None:
        if self.guard is not None:
            self.guard.check(trainer)
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state, said so: no log line
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException between two batches, so the state is consistent.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            try:
                self.save(trainer)
            except NonFiniteLoss:
                pass  # keep the earlier, finite last.ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, flushes it to disk, then renames it.

    Lightning's own writer stages the file in the system temp directory, and when that is another
    file system the final move is a copy that a kill can leave half-done.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic write there
            return super().save_checkpoint(checkpoint, path, storage_options)
        with replacing(Path(path)) as f:
            torch.save(checkpoint, f)


def check_resumable(path: Path, sampler: BucketBatchSampler | None = None) -> None:
    """Raise UserError unless `path` is a complete checkpoint with training state.

    With `sampler` (the training batches this run would make), also unless the checkpoint's batches
    are the same ones, so a position in its epoch means the same examples here.
    """
    if not path.is_file():
        raise UserError(f"cannot resume: there is no checkpoint at {path}")
    try:
        # mmap reads the archive's index and metadata, not the tensor data: cheap, and catches truncation
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise UserError(
            f"cannot resume: {path} is not a readable checkpoint ({type(err).__name__}); it is probably truncated "
            "or corrupt. Resume from another checkpoint (e.g. best.ckpt) or start a new run"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "optimizer_states", "loops"} <= checkpoint.keys():
        raise UserError(f"cannot resume: {path} holds no training state (model, optimizer and loop positions)")
    if sampler is not None:
        saved = RestoreLoaderPosition.saved_state(checkpoint)
        if saved is None:
            raise no_saved_position(path.name)
        if changes := sampler.changes(saved):
            raise resume_refusal(path.name, changes)


def no_saved_position(checkpoint_name: str) -> UserError:
    return UserError(
        f"cannot resume: {checkpoint_name} does not record the order of its training batches and its place in "
        "the epoch (it was written by an earlier nlprnn or without RestoreLoaderPosition); start a new run"
    )


def resume_refusal(checkpoint_name: str, changes: list[Change]) -> UserError:
    """One line: what changed since the checkpoint, and the options that resume it."""
    what, how = [], []
    for change in changes:
        if change.name == "batch_size":
            what.append(f"the batch size changed from {change.saved} to {change.current}")
            how.append(f"--data.batch_size {change.saved}")
        elif change.name == "world_size":
            what.append(f"the number of training processes changed from {change.saved} to {change.current}")
            how.append(f"{change.saved} processes (--trainer.devices times --trainer.num_nodes)")
        elif change.name == "seed":
            what.append(f"the data seed changed from {change.saved} to {change.current}")
            how.append(f"--data.split_seed {change.saved}")
        elif change.name == "dataset":
            saved, current = (change.saved or {}).get("examples"), change.current["examples"]
            counts = f"{saved} examples then, {current} now" if saved != current else "other lengths"
            what.append(f"the training data changed ({counts})")
            how.append("the data it was trained on")
        else:
            what.append(f"the batching changed ({change.name} {change.saved} then, {change.current} now)")
            how.append("the nlprnn version that wrote it")
    return UserError(
        f"cannot resume: {' and '.join(what)} since {checkpoint_name}, so its place in the epoch would name other "
        f"examples; resume with {', '.join(how)}, or start a new run"
    )


# --- resumable data order -------------------------------------------------------------------------


class RestoreLoaderPosition(Callback):
    """Saves the training batch sampler's state in every checkpoint; restores it when a run resumes.

    The one place the data position is restored: ResumableLoader is not stateful to Lightning, which
    would restore it only when it creates the loader after loading the checkpoint (not so when
    configure_optimizers reads `trainer.estimated_stepping_batches` for an LR schedule). At train start
    the loader exists on every path and has not drawn a batch, so the sampler starts the resumed epoch
    after its saved position and the batches trained on are never read. A state whose batches differ
    (batch size, world size, seed, data) is refused with a UserError.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._resuming_from: str | None = None  # the checkpoint being resumed, once it is loaded
        self._state: dict[str, Any] | None = None  # its sampler state

    @staticmethod
    def saved_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """The training batch sampler's state in a checkpoint written with this callback; None if absent."""
        return checkpoint.get("callbacks", {}).get(RestoreLoaderPosition.__qualname__, {}).get("batch_sampler")

    @staticmethod
    def _sampler(trainer: L.Trainer | None) -> BucketBatchSampler | None:
        loader = trainer.train_dataloader if trainer is not None else None
        sampler = loader.batch_sampler if isinstance(loader, ResumableLoader) else None
        return sampler if isinstance(sampler, BucketBatchSampler) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() is called without it

    def state_dict(self) -> dict[str, Any]:
        sampler = self._sampler(self._trainer)
        return {"batch_sampler": sampler.state_dict()} if sampler is not None else {}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return
        self._resuming_from = Path(str(trainer.ckpt_path)).name
        self._state = self.saved_state(checkpoint)
        if self._state is None:  # refused here, before Lightning meets an older checkpoint's loader state
            raise no_saved_position(self._resuming_from)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name, state = self._resuming_from, self._state
        self._resuming_from = self._state = None
        sampler = self._sampler(trainer)
        if name is None or state is None or sampler is None:
            return
        try:
            sampler.load_state_dict(state)
        except ResumeMismatch as err:
            raise resume_refusal(name, err.changes) from None
