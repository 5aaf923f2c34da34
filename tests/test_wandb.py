"""W&B: an offline run records per-step telemetry and the test report; read back from its .wandb file."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The protobuf records of a .wandb file, in order."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(path: Path) -> list[dict]:
    """Every logged row as {key: value}; nested keys joined with '/'."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def test_an_offline_run_holds_step_telemetry_and_the_test_report(tmp_path, tiny_csv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # WANDB_MODE is unset by the fixture: offline is fit's default
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "nlprnn.fit", "--data.train_file", str(tiny_csv), "--data.batch_size", "16",
         "--model.embedding_dim", "16", "--model.encoder.hidden_size", "16", "--trainer.max_epochs", "2",
         "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
         "--output_dir", str(tmp_path / "runs"), "--run_name", "logged"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "logged"
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(wandb_file)

    def series(key: str) -> list:
        return [row[key] for row in rows if key in row]

    # Per step, every 2 steps over 2 epochs of 10: loss, learning rate, gradient norm, throughput, padding.
    for key in ("train_loss_step", "lr-AdamW", "grad_norm", "tokens_per_sec", "padding_efficiency"):
        assert len(series(key)) == 10, key
    assert all(math.isfinite(v) and v > 0 for v in series("grad_norm") + series("tokens_per_sec"))
    assert all(0 < v <= 1 for v in series("padding_efficiency") + series("padding_efficiency_epoch"))
    assert len(series("padding_efficiency_epoch")) == 2
    rates = series("lr-AdamW")  # the default recipe warms up to lr 0.001 over 100 steps, logged every 2nd step
    assert rates[0] == pytest.approx(0.001 * 2 / 100) and rates == sorted(rates)

    # At test time: the metrics (per class too), the confusion-matrix chart and its image.
    metrics = json.loads((run / "metrics.json").read_text())
    (test_row,) = [row for row in rows if "test_acc" in row]
    for label in ("negative", "positive"):
        for name in ("precision", "recall", "f1"):
            key = f"test_{name}_{label}"
            assert 0 <= metrics[key] <= 1 and test_row[key] == metrics[key], key
    (chart_row,) = [row for row in rows if "test_confusion_matrix_table/_type" in row]  # the chart's table
    assert chart_row["test_confusion_matrix_table/nrows"] == 4  # (true, predicted) pairs of 2 classes
    assert chart_row["test_confusion_matrix_image/_type"] == "image-file"
    table = next(p for p in run.glob("wandb/offline-run-*/files/media/table/test_confusion_matrix*.table.json"))
    cells = json.loads(table.read_text())
    assert cells["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert sum(row[2] for row in cells["data"]) == 20  # every test example counted once
    hits = {row[0]: row[2] for row in cells["data"] if row[0] == row[1]}
    assert sum(hits.values()) / 20 == round(metrics["test_acc"], 6)
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def online_fit(tmp_path: Path, api_key: str | None) -> subprocess.CompletedProcess:
    """fit in W&B online mode, with no credentials but `api_key` and no network but the sandbox's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_BASE_URL="http://127.0.0.1:9", OMP_NUM_THREADS="1")  # port 9 (discard): nothing answers
    if api_key is not None:
        env["WANDB_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-m", "nlprnn.fit", "--data.train_file", str(tmp_path / "missing.csv"),
         "--output_dir", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )


def test_wandb_mode_disabled_makes_no_wandb_run(tmp_path, tiny_csv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "nlprnn.fit", "--data.train_file", str(tiny_csv), "--data.batch_size", "16",
         "--model.embedding_dim", "16", "--model.encoder.hidden_size", "16", "--trainer.max_epochs", "1",
         "--trainer.enable_progress_bar", "false", "--baseline", "false", "--output_dir", str(tmp_path / "runs"),
         "--run_name", "quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "quiet" / "metrics.json").exists()
    assert not (tmp_path / "runs" / "quiet" / "wandb").exists() and "W&B syncing" not in proc.stderr


def test_online_mode_without_a_key_is_one_line_before_anything_else(tmp_path):
    proc = online_fit(tmp_path, api_key=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "nlprnn.fit: error: WANDB_MODE=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # checked before the data (here a missing file) and the run folder


def test_online_mode_that_cannot_log_in_is_one_line(tmp_path):
    proc = online_fit(tmp_path, api_key="0" * 40)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nlprnn.fit: error: WANDB_MODE=online, but W&B login failed (")
    assert last.endswith("or unset WANDB_MODE to log offline and upload later with `wandb sync`")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
