"""Two-process DDP on CPU (gloo): the run finishes, rank 0 alone writes, and its synced test metrics are exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from nlprnn.callbacks import ConfusionMatrixReport
from nlprnn.data.datamodule import TextDataModule
from nlprnn.data.tokenizer import TokenizerConfig
from nlprnn.models.classifier import TextClassifier

EPOCHS = 2


def test_two_process_ddp_run_matches_a_single_process_evaluation(tmp_path, tiny_csv):
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nlprnn.fit", "--data.train_file", str(tiny_csv), "--data.batch_size", "16",
         "--model.embedding_dim", "16", "--model.encoder.hidden_size", "16", "--model.lr", "0.01",
         "--trainer.max_epochs", str(EPOCHS), "--trainer.log_every_n_steps", "1",
         "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.enable_progress_bar", "false", "--output_dir", str(out), "--run_name", "ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
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
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[ConfusionMatrixReport()],
                      enable_progress_bar=False, enable_model_summary=False)
    (single,) = trainer.test(model, datamodule=TextDataModule(**data_args), verbose=False)
    ddp_metrics = {name: value for name, value in ddp_metrics.items() if not name.startswith("baseline_")}
    assert set(single) == set(ddp_metrics)
    for name, value in single.items():
        if name == "test_loss":  # a mean of per-batch means: the batches differ, so only up to rounding
            assert ddp_metrics[name] == pytest.approx(value, rel=1e-5)
        else:  # counts-based: exact
            assert ddp_metrics[name] == value, name
