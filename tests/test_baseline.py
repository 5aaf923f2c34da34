"""The TF-IDF + logistic-regression baseline: on its own, and reported by every `python -m nlprnn.fit` run."""

from __future__ import annotations

import json

from conftest import make_examples, write_csv
from nlprnn.baseline import fit_baseline
from nlprnn.data.sources import SourceSpec, load_splits
from test_fit import TINY_MODEL, fit

TINY_RUN = [*TINY_MODEL, "--trainer.logger", "false",
            "--trainer.max_epochs", "2"]  # explicit: the default recipe's budget is derived from the data


def test_baseline_learns_the_tiny_set(tmp_path):
    splits = load_splits(SourceSpec(train_file=str(write_csv(tmp_path / "tiny.csv", make_examples(400)))))
    scores = fit_baseline(splits)
    assert set(scores) == {"baseline_val_acc", "baseline_test_acc", "baseline_test_f1_macro"}
    assert all(isinstance(v, float) for v in scores.values())
    # the label follows from two sentiment words per text: a bag of words gets it; chance is 0.5
    assert scores["baseline_test_acc"] >= 0.95 and scores["baseline_test_f1_macro"] >= 0.95
    assert scores["baseline_val_acc"] >= 0.95


def test_fit_reports_the_baseline_beside_the_model_unless_turned_off(tmp_path, tiny_csv):
    runs = tmp_path / "runs"
    proc = fit("--data.train_file", str(tiny_csv), *TINY_RUN, "--output_dir", str(runs), "--run_name", "with",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((runs / "with" / "metrics.json").read_text())
    assert 0.9 <= metrics["baseline_test_acc"] <= 1.0 and 0.9 <= metrics["baseline_test_f1_macro"] <= 1.0
    assert f"test accuracy {metrics['test_acc']:.4f}" in proc.stdout
    assert (f"(TF-IDF + logistic regression: {metrics['baseline_test_acc']:.4f}, "
            f"{metrics['baseline_test_f1_macro']:.4f}); run folder {runs / 'with'}") in proc.stdout

    proc = fit("--data.train_file", str(tiny_csv), *TINY_RUN, "--output_dir", str(runs), "--run_name", "without",
               "--baseline", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((runs / "without" / "metrics.json").read_text())
    assert "test_acc" in metrics and not [key for key in metrics if key.startswith("baseline_")]
    assert "TF-IDF" not in proc.stdout


def test_the_baseline_macro_f1_leaves_out_a_class_the_test_split_lacks_as_the_model_does(tmp_path):
    neutral = [{"text": f"a plain report number {i} of facts", "label": "neutral"} for i in range(100)]
    train = write_csv(tmp_path / "train.csv", make_examples(300) + neutral)
    test = write_csv(tmp_path / "test.csv", make_examples(60, seed=1))  # positive and negative only
    splits = load_splits(SourceSpec(train_file=str(train), test_file=str(test)))
    scores = fit_baseline(splits)
    assert scores["baseline_test_acc"] == 1.0
    assert scores["baseline_test_f1_macro"] == 1.0  # over 3 classes, a class with no example would count as 0
