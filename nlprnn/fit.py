"""python -m nlprnn.fit: train a text classifier, then test its best checkpoint.

A LightningCLI: `--config FILE`, `--print_config`, `--help` and dotted overrides such as
`--model.encoder.hidden_size 256` work as in any LightningCLI. Without `--config` it starts
from configs/default.yaml.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar, Timer, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from nlprnn import slurm, tracking
from nlprnn.atomic import write_json, write_text
from nlprnn.callbacks.calibration import CalibrationReport
from nlprnn.callbacks.checkpoint_io import AtomicCheckpointIO
from nlprnn.callbacks.last_checkpoint import LastCheckpoint
from nlprnn.callbacks.nonfinite import NonFiniteLossGuard
from nlprnn.callbacks.report import ConfusionMatrixReport
from nlprnn.callbacks.resume import RestoreLoaderPosition, check_resumable, check_same_batches
from nlprnn.callbacks.selection import BestCheckpoint, planned_epochs, training_length
from nlprnn.callbacks.telemetry import TrainingMonitor
from nlprnn.data.datamodule import TextDataModule
from nlprnn.derived import Derived, epoch_budget, patience_for
from nlprnn.errors import UserError, exit_on_reported_error, first_line
from nlprnn.models.classifier import TextClassifier
from nlprnn.run_dir import (RUN_NAME_ENV, claim_run_dir, dataset_stem, new_run_name, releasing_run_dirs,
                            run_name_handover)
from nlprnn.threads import fit_threads_to_machine

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, as a shell reports a process the signal ended: the run is not finished


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run folder under output_dir (default: time, dataset and a random tag; "
                                 "under SLURM: dataset, job id and step, the same after a requeue).")
        parser.add_argument("--output_dir", type=str, default="checkpoints", help="Where run folders go.")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume training: 'last' (of --run_name) or a checkpoint path.")
        parser.add_argument("--wandb_project", type=str, default="nlprnn", help="W&B project of the run.")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=500,
                            help="Also write last.ckpt every this many optimizer steps (0: only at epoch ends).")
        parser.add_argument("--export", type=bool, default=False,
                            help="At the end, export the best checkpoint to <run folder>/bundle (see nlprnn.export).")
        parser.add_argument("--baseline", type=bool, default=True,
                            help="Also train TF-IDF + logistic regression on the same training split and report its "
                                 "test accuracy and macro-F1 beside the model's.")
        parser.add_argument("--calibrate", type=bool, default=True,
                            help="After training, fit a temperature on the validation split that calibrates the "
                                 "model's probabilities (it changes no prediction); false keeps temperature 1.")
        for attribute in ("vocab_size", "num_classes", "pad_id", "typical_length"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        if self.config.trainer.get("logger") in (None, True) and tracking.online() and rank_zero_only.rank == 0:
            tracking.check_online_login()  # before the data is prepared: a missing key or network fails in seconds
        self.derived_here = self.vector_words_follow_the_model()

    def vector_words_follow_the_model(self) -> dict[str, Derived]:
        """data.tokenizer.vector_words auto adds the words of the vectors the model starts from: none when the
        model starts from none (model.pretrained_vectors null, or no vectors of its embedding_dim installed)."""
        from nlprnn.models.embedding import installed_vectors

        tokenizer, model = self.config.data.tokenizer, self.config.model
        if tokenizer.vector_words != "auto":
            return {}
        vectors = model.pretrained_vectors
        if vectors == "auto":
            vectors = installed_vectors(model.embedding_dim)
        if vectors is not None:
            return {}  # the data module resolves auto to the same installed vectors
        tokenizer.vector_words = None
        why = ("model.pretrained_vectors is null" if model.pretrained_vectors is None
               else f"no {model.embedding_dim}-d word vectors are installed")
        return {"data.tokenizer.vector_words": Derived(
            "none", f"the model starts from no word vectors ({why}): words unseen in training stay unknown")}

    def instantiate_classes(self) -> None:
        # jsonargparse makes the data, applies the links that read its sizes, then makes the model: the data
        # is prepared in between, as it is made (prepared_data), so preparation is a step of its own here.
        self.config_init = self.parser.instantiate(self.config, instantiators=[(prepared_data, TextDataModule, True)])
        self.datamodule, self.model = self.config_init.data, self.config_init.model
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # The data is prepared by now (instantiate_classes), so bad input has already been reported.
        self.claim_run_dir()
        try:
            return self._make_trainer(**kwargs)
        except BaseException:
            self.discard_run_dir()  # nothing has been written to it yet
            raise

    def _make_trainer(self, **kwargs) -> Trainer:
        trainer_config = self.config_init.trainer
        callbacks = list(trainer_config.get("callbacks") or [])
        derived = {**self.derived_here, **self.datamodule.derived, **self.model.derived}
        check_trainer_counts(trainer_config)
        patience = None
        if self.budget_left_open(trainer_config):
            examples, batch_size = self.datamodule.train_size, self.datamodule.batch_size
            accumulate = trainer_config.get("accumulate_grad_batches") or 1
            budget = epoch_budget(examples, batch_size, accumulate)
            floor = trainer_config.get("min_epochs") or 0
            if floor > budget.value:  # an explicit setting wins over a derived one
                budget = Derived(floor, f"trainer.min_epochs is {floor}, above the {budget.value} epochs of "
                                        f"{budget.reason}")
            derived["trainer.max_epochs"] = budget
            derived["early stopping patience"] = patience_for(examples, batch_size, accumulate)
            kwargs["max_epochs"] = derived["trainer.max_epochs"].value
            patience = derived["early stopping patience"].value
        callbacks.append(BestCheckpoint(self.run_dir, patience))
        for name, choice in derived.items():
            rank_zero_info(f"{name} = {choice.value} (derived: {choice.reason})")
        guard = NonFiniteLossGuard()  # checked before last.ckpt is written, so it comes first
        callbacks += [guard, LastCheckpoint(self.run_dir, self.config.checkpoint_every_n_steps, guard),
                      RestoreLoaderPosition(), ConfusionMatrixReport(self.run_dir), CalibrationReport(self.run_dir)]
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        self.slurm_requeue = None
        if slurm.in_slurm_job() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            self.slurm_requeue = slurm.RequeueOnSignal()
            callbacks.append(self.slurm_requeue)
            plugins.append(slurm.cluster_environment())
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            logger = False if tracking.disabled() else tracking.wandb_logger(self.config.wandb_project, self.run_name,
                                                                             self.run_dir)
        if logger:
            callbacks += [LearningRateMonitor(logging_interval="step"), TrainingMonitor()]
        bar_wanted = trainer_config.get("enable_progress_bar") is not False
        if bar_wanted and not any(isinstance(c, ProgressBar) for c in callbacks):
            # Each refresh reads the logged loss (a host sync on a GPU): refresh when the logger writes, not every step.
            callbacks.append(TQDMProgressBar(refresh_rate=trainer_config.get("log_every_n_steps") or 50))
        try:
            return super().instantiate_trainer(
                callbacks=callbacks, logger=logger, plugins=plugins, default_root_dir=str(self.run_dir),
                use_distributed_sampler=False, **kwargs
            )
        except (MisconfigurationException, ValueError) as err:  # e.g. --trainer.accelerator gpu without a GPU
            raise UserError(f"the trainer settings cannot be used: {first_line(err)}") from None

    # The values that leave each length unset, per key: max_steps=-1 is the Trainer's "unset", while an explicit
    # max_epochs of -1 (no limit) or 0 is a choice. max_time is not a length but a cap beside the derived one
    # (the run stops at whichever comes first): it bounds a run on a slow machine and keeps early stopping.
    OPEN_BUDGET = {"max_epochs": (None,), "max_steps": (None, -1), "fast_dev_run": (None, False)}

    @classmethod
    def budget_left_open(cls, trainer_config) -> bool:
        """Whether the recipe and command line leave the length of training to be derived from the data."""
        return all(trainer_config.get(key) in open_values for key, open_values in cls.OPEN_BUDGET.items())

    def claim_run_dir(self) -> None:
        """Choose and create the run folder, and the checkpoint to resume from.

        DDP workers started by Lightning reuse the launcher's folder. The tasks of a SLURM job step agree
        on one named after the job, which the job finds again, and resumes, when it is requeued.
        """
        config = self.config
        inherited = os.environ.get(RUN_NAME_ENV)
        if config.ckpt_path == "last" and not (config.run_name or inherited):
            raise UserError("--ckpt_path last needs --run_name: the run to resume")
        self.run_name = inherited or config.run_name or self.default_run_name()
        self.run_dir = Path(config.output_dir) / self.run_name
        last = self.run_dir / "last.ckpt"
        requeued = slurm.in_slurm_job() and slurm.was_requeued() and self.run_dir.is_dir()
        self.resume_from = str(last) if config.ckpt_path == "last" or (requeued and last.exists()) else config.ckpt_path
        self.created_dir: Path | None = None  # the outermost folder this process created for the run
        if rank_zero_only.rank == 0 and not inherited:
            missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            # a checkpoint path may start a new run folder; 'last' always continues an existing one
            resuming = requeued or config.ckpt_path == "last" or (config.ckpt_path is not None and self.run_dir.is_dir())
            claim_run_dir(Path(config.output_dir), self.run_name, resuming=resuming)
            self.created_dir = missing[-1] if missing else None
        os.environ[RUN_NAME_ENV] = self.run_name

    def default_run_name(self) -> str:
        dataset = dataset_stem(self.config.data.train_file or self.config.data.dataset)
        if slurm.in_slurm_job():
            return slurm.default_run_name(dataset)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: a name made here would differ in every process
            raise UserError("processes started by torchrun need --run_name, so that they share one run folder")
        return new_run_name(dataset)

    def discard_run_dir(self) -> None:
        """Remove the run folder this process made (and the --output_dir it made for it, if left empty), so a run
        that fails before training leaves nothing half-written. Called only before training starts."""
        if getattr(self, "created_dir", None) is None:
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for parent in self.run_dir.parents:
            if not parent.is_relative_to(self.created_dir):
                break
            try:
                parent.rmdir()  # only if empty: another run may have started in it meanwhile
            except OSError:
                break


def refused_setting(err: Exception) -> UserError | None:
    """One line for a setting Lightning refuses as training starts (a val_check_interval longer than an epoch...)."""
    frames = traceback.extract_tb(err.__traceback__)
    in_lightning = bool(frames) and f"{os.sep}lightning{os.sep}" in frames[-1].filename
    if isinstance(err, MisconfigurationException) or (isinstance(err, ValueError) and in_lightning):
        return UserError(f"the trainer settings cannot be used: {first_line(err)}")
    return None


def check_trainer_counts(trainer_config) -> None:
    """Counts Lightning takes unchecked, and fails on mid-run with a ZeroDivisionError."""
    for key, least in (("accumulate_grad_batches", 1), ("check_val_every_n_epoch", 1), ("log_every_n_steps", 0)):
        value = trainer_config.get(key)
        if isinstance(value, int) and value < least:
            raise UserError(f"trainer.{key} must be at least {least}: got {value}")


def prepared_data(class_type: type[TextDataModule], *args: Any, **kwargs: Any) -> TextDataModule:
    """Make the datamodule and prepare its data: download, tokenizer, tokenization, then load.

    Every process of a run calls it; a file lock lets one per machine prepare while the others wait and
    load. Bad input ends here with a UserError, before a run folder exists, leaving no half-written cache.
    """
    data = class_type(*args, **kwargs)
    if data.batch_size < 1:  # checked before the data is prepared and a run folder made
        raise UserError(f"data.batch_size is the number of examples in a batch, at least 1: got {data.batch_size}")
    if data.num_workers < 0:
        raise UserError(f"data.num_workers is a number of loader processes, 0 or more: got {data.num_workers}")
    data.prepare()
    return data


def fit_and_test(cli: FitCLI, test: bool = True) -> dict[str, float]:
    """Train, then test the best checkpoint; with test=False only train and return {"best_val_acc": ...}."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    ckpt_path = cli.resume_from
    try:
        if ckpt_path:
            # before anything is written: a resume whose batches or model would differ is refused, not run
            name = Path(ckpt_path).name
            checkpoint = check_resumable(Path(ckpt_path))
            check_same_data(checkpoint, data, name)  # first: a changed setting is named, not its effect on batches
            sampler = data.batch_sampler("train", shuffle=True, world_size=trainer.world_size)
            check_same_batches(checkpoint, sampler, name)
            check_same_model(checkpoint, model, name)
            best = next((c for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)
            states = checkpoint.get("callbacks", {})
            state = next((s for k, s in states.items() if k.startswith(BestCheckpoint.__qualname__)), None)
            check_same_budget(state or {}, trainer, best.patience if best else None, name)
            if best is not None and state is not None and state.get("dirpath") != best.dirpath:
                best.adopt_best(state, copy=trainer.is_global_zero)  # resumed into another folder
            del checkpoint, states, state
        if trainer.is_global_zero:
            for leftover in cli.run_dir.glob(".*.tmp"):  # what a kill -9 during a write left (see nlprnn.atomic)
                leftover.unlink(missing_ok=True)
            cli.config.run_name = cli.run_name  # chosen when not given: the folder's config.yaml resumes this run
            write_text(cli.run_dir / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
            saved = data.state_dict()  # what every checkpoint carries: the run folder's copies come from it too
            write_text(cli.run_dir / "tokenizer.json", saved["tokenizer"])
            write_json(cli.run_dir / "labels.json", saved["labels"])
    except BaseException:
        cli.discard_run_dir()  # training has not started: nothing in a folder this run made is worth keeping
        raise
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except Exception as err:
        if trainer.global_step == 0 and not any(cli.run_dir.glob("*.ckpt")):
            cli.discard_run_dir()  # it failed before its first step: a new folder holds nothing worth keeping
            refused = refused_setting(err)
            if refused is not None:
                raise refused from None
        raise
    if not test:  # nlprnn.tune selects on validation only: no test split, no baseline
        score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        return {"best_val_acc": float("nan") if score is None else float(score)}
    with stoppable_after_training(requeue_signal=cli.slurm_requeue is not None):
        return test_and_report(cli)


class StoppedAfterTraining(BaseException):  # not an Exception: the baseline's broad fallback must not catch it
    """SIGTERM, or SLURM's SIGUSR1, while the finished training was calibrated, tested or compared."""

    def __init__(self, requeue: bool) -> None:
        super().__init__(requeue)
        self.requeue = requeue


@contextmanager
def stoppable_after_training(requeue_signal: bool) -> Iterator[None]:
    """After trainer.fit, Lightning's signal handlers are gone: a signal would end the process silently. last.ckpt
    holds the whole training by then, so a signal stops the run at once, to be resumed (or requeued) for its test."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise StoppedAfterTraining(requeue=signum == slurm.REQUEUE_SIGNAL)

    signals = [signal.SIGTERM, *([slurm.REQUEUE_SIGNAL] if requeue_signal else [])]
    previous = {signum: signal.signal(signum, stop) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_and_report(cli: FitCLI) -> dict[str, float]:
    """Test the best checkpoint (calibrated first), beside the baseline; write metrics.json and the summary line."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    best = "best" if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path else None
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if best is None and timer is not None and timer.time_remaining() <= 0:  # else weights never validated are tested
        raise UserError(f"--trainer.max_time {cli.config_init.trainer.get('max_time')} ended training before its first "
                        "validation: there is no checkpoint to test; allow at least one epoch")
    if cli.config.calibrate:
        calibrate(cli, trainer.checkpoint_callback.best_model_path if best else None)
    results = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
    metrics = {name: float(value) for name, value in results[0].items()}
    if trainer.is_global_zero:
        summary = f"test accuracy {metrics['test_acc']:.4f}, macro-F1 {metrics['test_f1_macro']:.4f}"
        if "test_network_acc" in metrics:  # a linear blend: what the network alone got
            summary += f" (the network alone: {metrics['test_network_acc']:.4f})"
        if "test_ece" in metrics:
            summary += (f", ECE {metrics['test_ece_uncalibrated']:.4f} -> {metrics['test_ece']:.4f} "
                        f"(temperature {metrics['temperature']:.3f})")
        baseline = run_baseline(data) if cli.config.baseline else None
        if baseline is not None:
            metrics.update(baseline)
            if trainer.logger:
                trainer.logger.log_metrics(baseline)
            summary += (f" (TF-IDF + logistic regression: {baseline['baseline_test_acc']:.4f}, "
                        f"{baseline['baseline_test_f1_macro']:.4f})")
        write_json(cli.run_dir / "metrics.json", metrics)
        print(f"{summary}; run folder {cli.run_dir}")
    return metrics


def run_baseline(data: TextDataModule) -> dict[str, float] | None:
    """The TF-IDF + logistic-regression baseline's metrics; None, after a one-line warning, if it fails.

    It re-reads the source (the prepared data keeps token ids, not texts), which may have moved, changed or gone
    offline since training began: the trained model's results matter more than the baseline beside them.
    """
    try:
        from nlprnn.baseline import fit_baseline  # scikit-learn only when the baseline runs
        from nlprnn.data.sources import load_splits

        if not data.source_unchanged():  # the baseline would learn from other data than the model
            raise UserError("the data files changed or moved since they were prepared")
        return fit_baseline(load_splits(data.source))  # the same splits the model saw
    except Exception as err:
        print(f"nlprnn.fit: warning: the TF-IDF + logistic-regression baseline was left out: {first_line(err)}",
              file=sys.stderr, flush=True)
        return None


MODEL_CHANGES_SHOWN = 3  # of the model settings that differ from a resumed checkpoint's


def check_same_data(checkpoint: dict[str, Any], data: TextDataModule, checkpoint_name: str) -> None:
    """UserError if the data settings, or the tokenizer trained on the data, differ from the checkpoint's.

    The tokenizer is compared whole: trained on the training split, it changes with its words, which the
    batch sampler's fingerprint (counts and lengths) does not see; token ids would name other words.
    """
    saved = checkpoint.get(TextDataModule.__qualname__) or {}
    current = data.state_dict()
    then, now = saved.get("data") or {}, current["data"]

    def same(key: str) -> bool:  # a file named relatively or absolutely is the same file
        if key.endswith("_file") and then[key] and now[key]:
            return Path(then[key]).resolve() == Path(now[key]).resolve()
        return then[key] == now[key]

    changed = [key for key in sorted(then.keys() & now.keys()) if not same(key)]
    if changed:
        shown = ", ".join(f"data.{key} {then[key]!r} then, {now[key]!r} now" for key in changed[:MODEL_CHANGES_SHOWN])
        raise UserError(f"cannot resume: the data settings differ from {checkpoint_name}'s ({shown}); resume with "
                        "the settings it was trained with (in the run folder's config.yaml), or start a new run")
    if saved.get("tokenizer") is not None and saved["tokenizer"] != current["tokenizer"]:
        raise UserError(f"cannot resume: the tokenizer differs from {checkpoint_name}'s (the training data's words or "
                        "the data.tokenizer settings changed, or the data cache was rebuilt: a wordpiece or unigram "
                        "tokenizer trains differently each time), so token ids would name other words; resume with "
                        "the data, settings and cache it was trained with, or start a new run")


def check_same_budget(saved: dict[str, Any], trainer: Trainer, patience: int | None, checkpoint_name: str) -> None:
    """UserError if the length of training differs from the checkpoint's: the learning-rate schedule spans it, and
    early stopping would change. A budget derived from the same data is derived alike, so only an explicit
    --trainer.max_epochs given then and not now (or the reverse) or another value is refused; so are another
    max_steps, accumulate_grad_batches or limit_train_batches."""
    if "max_epochs" not in saved:  # written before checkpoints recorded it
        return
    max_epochs = planned_epochs(trainer)
    if (saved["max_epochs"], saved.get("patience")) == (max_epochs, patience):
        length, then = training_length(trainer), saved.get("length") or {}
        changed = [key for key in length if key in then and then[key] != length[key]]
        if changed:
            shown = ", ".join(f"trainer.{key} {then[key]} then, {length[key]} now" for key in changed)
            how = " ".join(f"--trainer.{key} {then[key]}" for key in changed)
            raise UserError(f"cannot resume: the length of training differs from {checkpoint_name}'s ({shown}), "
                            f"which would reshape the learning-rate schedule; resume with {how}, or start a new run")
        return

    def plan(epochs: int | None, stop: int | None) -> str:
        return f"{epochs} epochs, " + (f"early stopping after {stop}" if stop is not None else "no early stopping")

    how = (f"--trainer.max_epochs {saved['max_epochs']}" if saved.get("patience") is None
           else "the derived budget (no --trainer.max_epochs)")
    raise UserError(f"cannot resume: training was planned for {plan(saved['max_epochs'], saved.get('patience'))} in "
                    f"{checkpoint_name}, and for {plan(max_epochs, patience)} now, which would reshape the "
                    f"learning-rate schedule; resume with {how}, or start a new run")


def check_same_model(checkpoint: dict[str, Any], model: TextClassifier, checkpoint_name: str) -> None:
    """UserError if the model settings differ from those `checkpoint` was trained with.

    Raised before the run folder is written to: a resume would otherwise fail on mismatched weight shapes, or
    quietly train a model other than the one configured, with config.yaml already describing it.
    """
    saved, current = flat_settings(checkpoint.get("hyper_parameters") or {}), flat_settings(dict(model.hparams))
    # Settings added since the checkpoint was written are not compared: the model loads such checkpoints with the
    # values they were trained with (see nlprnn.models.classifier).
    changed = [name for name in sorted(saved.keys() & current.keys()) if saved[name] != current[name]]
    if not changed:
        return
    shown = ", ".join(f"{name} {saved[name]!r} then, {current[name]!r} now"
                      for name in changed[:MODEL_CHANGES_SHOWN])
    more = f" and {len(changed) - MODEL_CHANGES_SHOWN} more" if len(changed) > MODEL_CHANGES_SHOWN else ""
    raise UserError(f"cannot resume: the model settings differ from {checkpoint_name}'s ({shown}{more}); resume with "
                    "the settings it was trained with (in the run folder's config.yaml), or start a new run")


def flat_settings(hparams: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """Hyperparameters as the options that set them: {"model.encoder.hidden_size": 128, ...}."""
    flat = {}
    for name, value in hparams.items():
        if name.startswith("_"):  # Lightning's own entries (_instantiator), no settings
            continue
        if isinstance(value, dict) and "class_path" in value:  # a class given by path, and its arguments
            flat[f"{prefix}{name}.class_path"] = value["class_path"]
            value = value.get("init_args") or {}
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def calibrate(cli: FitCLI, checkpoint: str | None) -> None:
    """Fit the temperature on the validation logits of `checkpoint` (None: the model as it is) and keep it.

    It goes into the data module's checkpoint state ("calibration"), beside the labels and tokenizer an
    export reads, and into `checkpoint` itself, so that the test below and nlprnn.export both use it.
    One process fits it on the whole validation split; the others receive it.
    """
    from nlprnn.calibration import collect_logits, fit_temperature, store_calibration

    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    temperature = 1.0
    if trainer.is_global_zero:
        if checkpoint:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
        loader = data.whole_split_loader("validation")
        device = trainer.strategy.root_device
        logits, labels = collect_logits(model.to(device), loader, device)
        model.cpu()  # where Lightning leaves a model after fit; the test moves it again
        temperature = fit_temperature(logits, labels)
    temperature = float(trainer.strategy.broadcast(temperature, src=0))
    data.calibration = {"method": "temperature", "temperature": temperature}
    if checkpoint and trainer.is_global_zero:
        store_calibration(Path(checkpoint), type(data).__qualname__, data.calibration)
    trainer.strategy.barrier()  # the test reloads the checkpoint on every process


def report_stop_after_training(cli: FitCLI, stop: StoppedAfterTraining, resume_hint: bool) -> None:
    """The run was stopped after its training, before its test ended: last.ckpt holds the training to test."""
    if stop.requeue:
        problem = slurm.requeue()
        if problem is None:
            print(f"nlprnn.fit: stopped after training, before the time limit; requeuing SLURM job {slurm.job_id()}, "
                  "which tests last.ckpt's training", file=sys.stderr, flush=True)
            return
        raise UserError(f"last.ckpt holds the whole training, but `scontrol requeue {slurm.job_id()}` failed "
                        f"({problem}); test it with {resume_command(cli)}")
    hint = f"; test it with {resume_command(cli)}" if resume_hint else ""
    print(f"nlprnn.fit: stopped by SIGTERM after training, before its test ended (last.ckpt holds the whole "
          f"training){hint}", file=sys.stderr, flush=True)


def report_stop(cli: FitCLI, resume_hint: bool) -> None:
    """After SIGTERM (or SLURM's time-limit signal) saved last.ckpt: say how the run goes on."""
    step = cli.trainer.global_step
    if cli.slurm_requeue is not None and cli.slurm_requeue.requested:
        print(f"nlprnn.fit: stopped at step {step} before the time limit; requeuing SLURM job {slurm.job_id()}, "
              "which resumes from last.ckpt", file=sys.stderr, flush=True)
        if isinstance(cli.trainer.logger, WandbLogger):
            cli.trainer.logger.experiment.finish()  # the requeue ends this process before exit handlers run
        problem = slurm.requeue()
        if problem:
            raise UserError(f"last.ckpt is saved, but `scontrol requeue {slurm.job_id()}` failed ({problem}); "
                            f"continue with {resume_command(cli)}")
    else:
        hint = f"; resume with {resume_command(cli)}" if resume_hint else ""
        print(f"nlprnn.fit: stopped by SIGTERM at step {step}{hint}", file=sys.stderr)


def resume_command(cli: FitCLI) -> str:
    """The command that continues this run: its own config.yaml holds every setting it was started with (derived
    ones left open, to be derived alike), so no option can be forgotten or changed on the way."""
    return f"python -m nlprnn.fit --config {cli.run_dir / 'config.yaml'} --ckpt_path last"


EXTRAS = {"tensorboard": "nlprnn[tensorboard]"}  # packages an extra of nlprnn installs


def missing_package(err: BaseException) -> UserError | None:
    """One line for a class in the configuration whose package is not installed; None for other errors."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    cause = next((e for e in chain if isinstance(e, ImportError)), None)
    if cause is None:
        return None
    class_path = next((m.group(1) for e in chain if (m := re.search(r"class_path '([\w.]+)'", str(e)))), None)
    needs = first_line(cause).rstrip(".")
    extra = next((extra for package, extra in EXTRAS.items() if package in needs.lower()), None)
    hint = f'; install it with: pip install "{extra}"' if extra else ""
    return UserError(f"{class_path or 'the configuration'} needs a package that is not installed: {needs}{hint}")


def with_default_config(args: list[str]) -> list[str]:
    """configs/default.yaml is the starting point unless the user names a config of their own."""
    named = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    if named:
        return args
    if not DEFAULT_CONFIG.exists():  # configs/ is not part of the wheel: it lives in the source tree
        print(f"nlprnn.fit: warning: {DEFAULT_CONFIG} is not there (nlprnn is installed without its source tree), so "
              "the classes' own defaults apply instead of the default recipe; pass --config RECIPE.yaml",
              file=sys.stderr)
        return args
    return ["--config", str(DEFAULT_CONFIG), *args]


def main(args: list[str] | None = None, callbacks: Sequence[Callback] = (), test: bool = True) -> dict[str, float]:
    """Train and test; a mistake ends the process with one line on stderr and exit status 2.

    `callbacks` join the Trainer's. test=False trains and validates only (see fit_and_test).
    """
    with exit_on_reported_error("nlprnn.fit"):
        return run(args, callbacks, test)


def run(args: list[str] | None = None, callbacks: Sequence[Callback] = (), test: bool = True,
        resume_hint: bool = True) -> dict[str, float]:
    """main() without the one-line report: a ReportedError reaches the caller (nlprnn.tune runs trials with it).

    resume_hint: after SIGTERM, print the command that resumes this run.
    """
    with run_name_handover(), releasing_run_dirs():
        return _run(args, callbacks, test, resume_hint)


def _run(args: list[str] | None, callbacks: Sequence[Callback], test: bool, resume_hint: bool) -> dict[str, float]:
    args = with_default_config(sys.argv[1:] if args is None else list(args))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass sys.argv on, amended
    # torch deprecates a class that Lightning's own code uses: nothing a user of nlprnn can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # nlprnn restores the place in the epoch itself (nlprnn.callbacks.resume), which Lightning cannot see
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    fit_threads_to_machine()
    try:
        cli = FitCLI(
            TextClassifier,
            TextDataModule,
            run=False,
            args=args,
            seed_everything_default=42,
            save_config_callback=None,
            auto_configure_optimizers=False,
            trainer_defaults={"callbacks": list(callbacks)},  # appended to the configured ones; not part of the config
        )
    except (ImportError, ValueError) as err:  # jsonargparse wraps a class's failed import in ValueErrors
        missing = missing_package(err)
        if missing is None:
            raise
        raise missing from None
    try:
        metrics = fit_and_test(cli, test)
    except SIGTERMException:
        if cli.trainer.is_global_zero:
            report_stop(cli, resume_hint)
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    except StoppedAfterTraining as stop:
        if cli.trainer.is_global_zero:
            report_stop_after_training(cli, stop, resume_hint)
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    if cli.config.export and cli.trainer.is_global_zero:
        from nlprnn.export import export_after_fit  # onnx and onnxruntime only when asked for

        checkpoint = cli.trainer.checkpoint_callback
        export_after_fit(checkpoint.best_model_path if checkpoint else "", cli.run_dir)
    return metrics


if __name__ == "__main__":
    main()
