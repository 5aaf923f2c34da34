"""scripts/accuracy_table.py on a tiny local recipe: the table is the mean of the runs, and it resumes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "accuracy_table.py"


def table(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def tiny_recipe(path: Path, train_file: Path) -> Path:
    path.write_text(f"""\
trainer:
  max_epochs: 1
  enable_model_summary: false
model:
  embedding_dim: 16
  encoder:
    class_path: nlprnn.models.encoder.RNNEncoder
    init_args:
      cell: gru
      hidden_size: 16
data:
  train_file: {train_file}
  batch_size: 16
""")
    return path


def test_table_is_the_mean_over_seeds_and_a_second_invocation_only_runs_what_is_missing(tmp_path, tiny_csv):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_csv)
    args = ["--datasets", "", "--recipes", str(recipe), "--seeds", "1", "2", "--out", str(tmp_path / "docs"),
            "--runs_dir", str(tmp_path / "runs"), "--extra=--trainer.max_epochs 2"]
    proc = table(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = [tmp_path / "runs" / f"recipe-tiny-seed{seed}" for seed in (1, 2)]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    for seed, run in zip((1, 2), runs):  # the seed and --extra reached fit, after the recipe
        config = (run / "config.yaml").read_text()
        assert f"seed_everything: {seed}" in config and "max_epochs: 2" in config and "logger: false" in config
    report = json.loads((tmp_path / "docs" / "accuracy.json").read_text())
    assert [r["metrics"] for r in report["runs"]] == metrics
    assert all(r["wall_s"] > 0 for r in report["runs"])
    (row,) = report["rows"]
    acc = [m["test_acc"] for m in metrics]
    assert row["row"] == "tiny.yaml" and row["seeds"] == [1, 2]
    assert row["test_acc_mean"] == statistics.fmean(acc) and row["test_acc_std"] == statistics.stdev(acc)
    assert row["test_f1_macro_mean"] == statistics.fmean(m["test_f1_macro"] for m in metrics)
    assert row["baseline_test_acc_mean"] == statistics.fmean(m["baseline_test_acc"] for m in metrics)
    assert 0.9 <= row["baseline_test_acc_mean"] <= 1.0

    markdown = (tmp_path / "docs" / "accuracy.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| tiny.yaml |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[1] == "2"
    assert cells[2] == f"{100 * statistics.fmean(acc):.1f} ± {100 * statistics.stdev(acc):.1f}%"
    assert cells[3] == f"{statistics.fmean(m['test_f1_macro'] for m in metrics):.3f}"
    assert cells[4] == f"{100 * row['baseline_test_acc_mean']:.1f}%"
    days = sorted({f"{datetime.fromtimestamp((run / 'metrics.json').stat().st_mtime, timezone.utc):%Y-%m-%d}"
                   for run in runs})  # the day each run wrote its test metrics
    assert row["trained"] == days and cells[7] == (days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}")
    assert "the test split is read once per run, at the end" in markdown and cells[2] in proc.stdout

    # A generation stopped during seed 2: seed 1 is kept as it is, seed 2 starts over.
    kept = (runs[0] / "metrics.json").stat().st_mtime_ns
    (runs[1] / "metrics.json").unlink()
    proc = table(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (runs[0] / "metrics.json").stat().st_mtime_ns == kept
    assert "recipe-tiny-seed2 has no metrics.json" in proc.stdout and (runs[1] / "metrics.json").exists()
    assert "seed 1: test accuracy" in proc.stdout and "(already done)" in proc.stdout
    again = json.loads((tmp_path / "docs" / "accuracy.json").read_text())["runs"]
    assert again[0]["metrics"] == metrics[0] and again[0]["wall_s"] == report["runs"][0]["wall_s"]
    assert [r["reused"] for r in again] == [True, False]
    code = {r["code"] for r in again}
    assert len(code) == 1 and code <= {r["code"] for r in report["runs"]}  # the commit both were trained at
    assert cells[8] == report["runs"][0]["code"] and "code: the commit the runs were trained at" in markdown

    # Another command's run is never read back as this one's, nor a run with no record of its command.
    proc = table(*args, "--", "--model.dropout", "0.1", cwd=tmp_path)
    assert proc.returncode != 0 and "recipe-tiny-seed1 was trained by another command" in proc.stderr
    (runs[0] / "accuracy_run.json").unlink()
    proc = table(*args, cwd=tmp_path)
    assert proc.returncode != 0 and "recipe-tiny-seed1 was trained by an unrecorded command" in proc.stderr


def test_a_failed_run_stops_the_script_with_its_error(tmp_path):
    recipe = tiny_recipe(tmp_path / "broken.yaml", tmp_path / "missing.csv")
    proc = table("--datasets", "", "--recipes", str(recipe), "--seeds", "1", "2", "--out", str(tmp_path / "docs"),
                 "--runs_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "nlprnn.fit: error: file not found" in proc.stderr and "failed with status 2" in proc.stderr
    assert "seed 2" not in proc.stdout and not (tmp_path / "docs").exists()


def test_a_seed_given_twice_ends_with_one_line_and_runs_nothing(tmp_path):
    proc = table("--datasets", "trec6", "--seeds", "1", "1", "--out", str(tmp_path / "docs"),
                 "--runs_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("--seeds holds a seed twice")
    assert "Traceback" not in proc.stderr and not (tmp_path / "docs").exists() and not (tmp_path / "runs").exists()
