"""python -m nlprnn.fit: train a text classifier, then test its best checkpoint.

A LightningCLI: `--config FILE`, `--print_config`, `--help` and dotted overrides such as
`--model.encoder.hidden_size 256` work as in any LightningCLI. Without `--config` it starts
from configs/default.yaml.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from nlprnn.data.datamodule import TextDataModule
from nlprnn.errors import UserError, exit_on_user_error
from nlprnn.models.classifier import TextClassifier
from nlprnn.run_dir import RUN_NAME_ENV, claim_run_dir, copy_file, new_run_name, write_json, write_text

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run folder under output_dir (default: time, dataset and a random tag).")
        parser.add_argument("--output_dir", type=str, default="checkpoints", help="Where run folders go.")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume training: 'last' (of --run_name) or a checkpoint path.")
        parser.add_argument("--wandb_project", type=str, default="nlprnn", help="W&B project of the run.")
        for attribute in ("vocab_size", "num_classes", "pad_id"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # The data is prepared by now (the links above read it), so bad input has already been reported.
        self.claim_run_dir()
        trainer_config = self.config_init.trainer
        callbacks = list(trainer_config.get("callbacks") or [])
        callbacks.append(ModelCheckpoint(
            dirpath=self.run_dir, filename="best", monitor="val_acc", mode="max",
            save_last=True, auto_insert_metric_name=False,
        ))
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            logger = wandb_logger(self.config.wandb_project, self.run_name, self.run_dir)
        if logger:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return super().instantiate_trainer(
            callbacks=callbacks, logger=logger, default_root_dir=str(self.run_dir), use_distributed_sampler=False, **kwargs
        )


    def claim_run_dir(self) -> None:
        """Choose and create the run folder; DDP workers started by the launcher reuse the launcher's."""
        config = self.config
        inherited = os.environ.get(RUN_NAME_ENV)
        if config.ckpt_path == "last" and not (config.run_name or inherited):
            raise UserError("--ckpt_path last needs --run_name: the run to resume")
        self.run_name = inherited or config.run_name or new_run_name(config.data.train_file or config.data.dataset)
        self.run_dir = Path(config.output_dir) / self.run_name
        self.created_run_dir = False
        if rank_zero_only.rank == 0 and not inherited:
            self.created_run_dir = not self.run_dir.exists()
            claim_run_dir(Path(config.output_dir), self.run_name, resuming=config.ckpt_path is not None)
        os.environ[RUN_NAME_ENV] = self.run_name

    def discard_run_dir(self) -> None:
        """Remove the run folder this process made, so a failed run leaves nothing half-written."""
        if self.created_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def wandb_logger(project: str, run_name: str, run_dir: Path) -> WandbLogger:
    """W&B, offline unless WANDB_MODE says otherwise: no account or network needed; `wandb sync` uploads later."""
    mode = os.environ.get("WANDB_MODE", "offline")
    return WandbLogger(project=project, name=run_name, save_dir=str(run_dir), offline=mode == "offline")


def fit_and_test(cli: FitCLI) -> dict[str, float]:
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if trainer.is_global_zero:
        write_text(cli.run_dir / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
        copy_file(data.tokenizer_file, cli.run_dir / "tokenizer.json")
        write_json(cli.run_dir / "labels.json", data.labels)
    ckpt_path = cli.config.ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(cli.run_dir / "last.ckpt")
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    best = "best" if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path else None
    results = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
    metrics = {name: float(value) for name, value in results[0].items()}
    if trainer.is_global_zero:
        write_json(cli.run_dir / "metrics.json", metrics)
        print(f"test accuracy {metrics['test_acc']:.4f}, macro-F1 {metrics['test_f1_macro']:.4f}; run folder {cli.run_dir}")
    return metrics


def with_default_config(args: list[str]) -> list[str]:
    """configs/default.yaml is the starting point unless the user names a config of their own."""
    named = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    return args if named or not DEFAULT_CONFIG.exists() else ["--config", str(DEFAULT_CONFIG), *args]


def main(args: list[str] | None = None) -> dict[str, float]:
    args = with_default_config(sys.argv[1:] if args is None else list(args))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass sys.argv on, amended
    with exit_on_user_error("nlprnn.fit"):
        cli = FitCLI(
            TextClassifier,
            TextDataModule,
            run=False,
            args=args,
            seed_everything_default=42,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )
        try:
            return fit_and_test(cli)
        except UserError:
            cli.discard_run_dir()
            raise


if __name__ == "__main__":
    main()
