"""Loggers other than W&B: TensorBoard through its extra, and one line when a logger's package is missing."""

from __future__ import annotations

import importlib.util

import pytest

from nlprnn.fit import missing_package
from test_fit import TINY_MODEL, fit

TINY_RUN = [*TINY_MODEL, "--trainer.max_epochs", "2", "--baseline", "false", "--trainer.log_every_n_steps", "1"]


def test_tensorboard_logger_writes_the_training_curves(tmp_path, tiny_csv):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = fit("--data.train_file", str(tiny_csv), *TINY_RUN, "--output_dir", str(tmp_path / "runs"),
               "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
               "--trainer.logger.save_dir", str(tmp_path / "tb"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (version,) = (tmp_path / "tb" / "lightning_logs").iterdir()
    scalars = set()
    for events in version.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"val_acc", "test_acc"} <= scalars and any(tag.startswith("train_loss") for tag in scalars), scalars


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, tiny_csv):
    proc = fit("--data.train_file", str(tiny_csv), *TINY_RUN, "--output_dir", str(tmp_path / "runs"),
               "--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("nlprnn.fit: error:")]
    assert "lightning.pytorch.loggers.MLFlowLogger needs a package that is not installed" in error and "mlflow" in error
    assert not (tmp_path / "runs").exists()


def test_a_missing_package_that_an_extra_installs_names_the_extra():
    # How jsonargparse reports a logger class whose import fails: ValueErrors caused by the ImportError.
    try:
        try:
            raise ModuleNotFoundError("Neither `tensorboard` nor `tensorboardX` is available.")
        except ModuleNotFoundError as err:
            raise ValueError("Problem with given class_path 'lightning.pytorch.loggers.TensorBoardLogger':") from err
    except ValueError as err:
        message = str(missing_package(err))
    assert message == (
        "lightning.pytorch.loggers.TensorBoardLogger needs a package that is not installed: Neither `tensorboard` nor "
        '`tensorboardX` is available; install it with: pip install "nlprnn[tensorboard]"'
    )
    assert missing_package(ValueError("a plain mistake")) is None
