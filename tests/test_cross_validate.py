"""scripts/cross_validate.py: stratified folds of training and validation only, the comparison read from the runs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SCRIPTS, load_script
from nlprnn.data.sources import SourceSpec, load_splits

SCRIPT = SCRIPTS / "cross_validate.py"


@pytest.fixture
def cross_validate(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # it shares accuracy_table's run handling
    return load_script("cross_validate")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_folds_are_even_in_size_and_in_every_class_and_the_same_each_time(cross_validate):
    labels = np.array([0] * 53 + [1] * 31 + [2] * 7 + [3] * 2)
    folds = cross_validate.stratified_folds(labels, 5)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.sum() == len(labels) and sizes.max() - sizes.min() <= 1
    for label in np.unique(labels):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(folds, cross_validate.stratified_folds(labels, 5))
    assert not np.array_equal(folds, cross_validate.stratified_folds(labels, 5, seed=7))


def test_the_summary_pools_each_seeds_folds_and_spreads_over_seeds(cross_validate):
    def run(seed: int, fold: int, model: int, baseline: int) -> dict:
        return {"seed": seed, "fold": fold, "held_out": 100, "wall_s": 60.0, "trained": f"2026-11-{27 + seed}",
                "metrics": {"test_acc": model / 100, "baseline_test_acc": baseline / 100}}

    runs = [run(1, 1, 97, 96), run(1, 2, 95, 95), run(2, 1, 98, 96), run(2, 2, 96, 95), run(3, 1, 96, 96),
            run(3, 2, 94, 95)]
    summary = cross_validate.summarize("data", runs)
    assert (summary["folds"], summary["seeds"], summary["held_out"]) == (2, [1, 2, 3], 200)
    assert (summary["model_correct"], summary["baseline_correct"]) == ([192, 194, 190], [191, 191, 191])
    assert summary["model_acc"] == pytest.approx([0.96, 0.01])
    assert summary["baseline_acc"] == pytest.approx([0.955, 0.0])
    assert summary["runs_ahead_level_behind"] == [3, 2, 1]
    table = cross_validate.markdown_table([summary])
    assert "| data | 2 | 1, 2, 3 | 200 | 96.0 ± 1.0% (192 / 194 / 190) | 95.5% (191) | +0.5 pt | 3 / 2 / 1 | 1.0 " \
           "| 2026-11-28 to 2026-11-30 |" in table


def rows(path: Path) -> Counter:
    table = pq.read_table(path)
    return Counter(zip(table.column("text").to_pylist(), table.column("label").to_pylist()))


def test_each_pooled_example_is_held_out_once_the_test_split_never_and_the_table_sums_the_folds(tmp_path, tiny_csv):
    args = ["--datasets", "", "--train_files", str(tiny_csv), "--folds", "3", "--seeds", "1", "2",
            "--out", str(tmp_path / "docs"), "--runs_dir", str(tmp_path / "runs"), "--", "--trainer.max_epochs", "1",
            "--model.embedding_dim", "16", "--model.pretrained_vectors", "null", "--data.batch_size", "16"]
    proc = run_script(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    splits = load_splits(SourceSpec(train_file=str(tiny_csv)))  # what fit makes of the file
    names = splits["train"].features["label"].names

    def examples(split: str) -> Counter:
        return Counter((row["text"], names[row["label"]]) for row in splits[split])

    (folds,) = (tmp_path / "runs" / "folds").glob("tiny-*-3folds")  # named by the file's stem and contents
    held_out = [rows(folds / f"fold{i}-test.parquet") for i in (1, 2, 3)]
    assert sum(held_out, Counter()) == examples("train") + examples("validation")  # and nothing of the test split
    for i in (1, 2, 3):  # a fold trains on exactly the examples it does not hold out
        assert rows(folds / f"fold{i}-train.parquet") + held_out[i - 1] == sum(held_out, Counter())

    report = json.loads((tmp_path / "docs" / "cross_validation.json").read_text())
    runs = report["runs"]
    assert [(r["seed"], r["fold"]) for r in runs] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert [r["held_out"] for r in runs] == [sum(c.values()) for c in held_out] * 2 == [60] * 6
    for run in runs:  # fit read this fold's files with this seed, and the arguments after --
        config = (Path(run["run_dir"]) / "config.yaml").read_text()
        assert f"fold{run['fold']}-test.parquet" in config and f"seed_everything: {run['seed']}" in config
        assert "max_epochs: 1" in config
        assert run["metrics"] == json.loads((Path(run["run_dir"]) / "metrics.json").read_text())

    def right(key: str, seed: int) -> int:
        return sum(round(r["metrics"][key] * 60) for r in runs if r["seed"] == seed)

    (row,) = report["rows"]
    model = [right("test_acc", seed) for seed in (1, 2)]
    baseline = [right("baseline_test_acc", seed) for seed in (1, 2)]
    assert (row["held_out"], row["model_correct"], row["baseline_correct"]) == (180, model, baseline)
    assert baseline[0] == baseline[1] >= 170  # the words give the label away, whatever the model's seed
    assert row["model_acc"][0] == pytest.approx(sum(model) / 360)
    markdown = (tmp_path / "docs" / "cross_validation.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| tiny.csv |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[1:4] == ["3", "1, 2", "180"]
    model_cell = (f"{100 * model[0] / 180:.1f}% ({model[0]})" if model[0] == model[1] else
                  f"{100 * sum(model) / 360:.1f} ± {100 * statistics.stdev(m / 180 for m in model):.1f}% "
                  f"({model[0]} / {model[1]})")
    assert cells[4:6] == [model_cell, f"{100 * baseline[0] / 180:.1f}% ({baseline[0]})"]
    days = sorted({r["trained"] for r in runs})  # the days the runs wrote their metrics
    assert cells[-1] == (days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}")

    # Run again: the folds and the runs are read back, nothing is trained.
    kept = [(Path(r["run_dir"]) / "metrics.json").stat().st_mtime_ns for r in runs]
    proc = run_script(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(Path(r["run_dir"]) / "metrics.json").stat().st_mtime_ns for r in runs] == kept
    assert json.loads((tmp_path / "docs" / "cross_validation.json").read_text())["rows"] == [row]


def test_a_local_file_is_named_by_its_contents_and_columns_not_by_its_name_alone(cross_validate, tmp_path, tiny_csv):
    columns = {"text_column": "text", "label_column": "label"}
    slug = cross_validate.file_slug(tiny_csv, columns)
    assert slug.startswith("tiny-")
    copy = tmp_path / "elsewhere" / "tiny.csv"
    copy.parent.mkdir()
    copy.write_bytes(tiny_csv.read_bytes())
    assert cross_validate.file_slug(copy, columns) == slug  # the same data: the same folds and runs
    copy.write_text(tiny_csv.read_text() + "one more line,pos\n")
    assert cross_validate.file_slug(copy, columns) != slug  # edited, or another file of that name
    assert cross_validate.file_slug(tiny_csv, {**columns, "text_column": "other"}) != slug


@pytest.mark.parametrize("args, message", [
    (["--folds", "1"], "--folds must be at least 2"),
    (["--train_files", "missing.csv"], "file not found: missing.csv"),
    (["--folds", "200"], "too few for 200 folds"),
    (["--text_column", "review"], "has no column 'review'"),
    (["--", "--baseline", "false"], "the script sets --baseline for each run"),
    (["--", "--data.test_file=test.csv"], "the script sets --data.test_file for each run"),
    (["--", "--seed_everything", "7"], "the script sets --seed_everything for each run"),
    (["--datasets", "trec6", "trec6"], "given twice"),
    (["--seeds", "1", "1"], "a seed twice"),
])
def test_bad_input_ends_with_one_line_and_writes_nothing(tmp_path, tiny_csv, args, message):
    if "--train_files" not in args and "--datasets" not in args:
        args = ["--train_files", str(tiny_csv), *args]
    proc = run_script("--datasets", "", "--out", str(tmp_path / "docs"), "--runs_dir", str(tmp_path / "runs"), *args,
                      cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "docs").exists() and not list((tmp_path / "runs").glob("folds/*"))
