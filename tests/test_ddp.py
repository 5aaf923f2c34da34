"""Two-process DDP on CPU (gloo): the run finishes, rank 0 alone writes, its synced test metrics are exact, and
a resume with another number of processes is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from nlprnn.callbacks.calibration import CalibrationReport
from nlprnn.callbacks.report import ConfusionMatrixReport
from nlprnn.data.datamodule import TextDataModule
from nlprnn.data.tokenizer import TokenizerConfig
from nlprnn.fit import main
from nlprnn.models.classifier import TextClassifier
from test_faults import stopped_at, tiny

EPOCHS = 2
TWO_PROCESSES = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
WORLD_SIZE_CHANGED = (
    "nlprnn.fit: error: cannot resume: the number of training processes changed from {} to {} since last.ckpt, so its "
    "place in the epoch would name other examples; resume with {} processes (--trainer.devices times "
    "--trainer.num_nodes), or start a new run"
)


def fit(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nlprnn.fit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_two_process_ddp_run_matches_a_single_process_evaluation(tmp_path, tiny_csv, capsys):
    out = tmp_path / "runs"
    args = ["--data.train_file", str(tiny_csv), "--data.batch_size", "16", "--model.embedding_dim", "16",
            "--model.encoder.hidden_size", "16", "--model.lr", "0.01", "--trainer.max_epochs", str(EPOCHS),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--output_dir", str(out),
            "--run_name", "ddp"]
    proc = fit(*args, *TWO_PROCESSES, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "ddp"

    # Rank 0 alone wrote: one run folder, one W&B run, one summary line, nothing elsewhere.
    assert [p.name for p in out.iterdir()] == ["ddp"]
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    assert proc.stdout.count("test accuracy") == 1
    assert not list(tmp_path.rglob("lightning_logs"))
    written = {p.name for p in run.iterdir()}
    assert {"best.ckpt", "last.ckpt", "metrics.json", "config.yaml", "confusion_matrix.png"} <= written
    # Each rank read half of the 10 batches of an epoch, so there were 5 optimizer steps per epoch.
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5 * EPOCHS

    # The test set was split across the two ranks; the synced metrics equal one process reading all of it.
    ddp_metrics = json.loads((run / "metrics.json").read_text())
    data_args = yaml.safe_load((run / "config.yaml").read_text())["data"]
    data_args["tokenizer"] = TokenizerConfig(**data_args["tokenizer"])
    model = TextClassifier.load_from_checkpoint(run / "best.ckpt", map_location="cpu")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[ConfusionMatrixReport(), CalibrationReport()],
                      enable_progress_bar=False, enable_model_summary=False)
    # From the checkpoint, so that the data module gets its temperature back, as in fit's test.
    (single,) = trainer.test(model, datamodule=TextDataModule(**data_args), ckpt_path=run / "best.ckpt", verbose=False)
    ddp_metrics = {name: value for name, value in ddp_metrics.items() if not name.startswith("baseline_")}
    assert set(single) == set(ddp_metrics)
    for name, value in single.items():
        if name in ("test_loss", "test_nll", "test_nll_uncalibrated"):  # means: only up to rounding
            assert ddp_metrics[name] == pytest.approx(value, rel=1e-5)
        else:  # counts-based: exact
            assert ddp_metrics[name] == value, name

    # Resuming the 2-process run in one process would deal its epochs out differently: refused, nothing written.
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--ckpt_path", "last", "--trainer.max_epochs", str(EPOCHS + 1)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [WORLD_SIZE_CHANGED.format(2, 1, 2)]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_resuming_a_one_process_run_with_two_processes_is_refused_in_one_line(tmp_path, tiny_csv):
    out = tmp_path / "runs"
    args = tiny(tiny_csv, out, "single", "--checkpoint_every_n_steps", "0")
    stopped_at(5, args)
    before = {p.name: p.read_bytes() for p in (out / "single").iterdir()}
    proc = fit(*args, "--ckpt_path", "last", *TWO_PROCESSES, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == WORLD_SIZE_CHANGED.format(1, 2, 1)
    assert "Traceback" not in proc.stderr and proc.stderr.count("nlprnn.fit: error") == 1  # refused before the launch
    assert {p.name: p.read_bytes() for p in (out / "single").iterdir()} == before
