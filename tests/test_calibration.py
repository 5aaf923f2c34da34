"""Temperature scaling: the fit, the ECE, and what a fit run reports and stores."""

from __future__ import annotations

import json

import pytest
import torch

from nlprnn.calibration import expected_calibration_error, fit_temperature, nll, temperature_of
from nlprnn.export import checkpoint_data

from conftest import make_examples, write_csv
from test_fit import TINY_MODEL, fit


def test_the_fitted_temperature_undoes_over_confidence():
    torch.manual_seed(0)
    calibrated = 2 * torch.randn(4000, 3)  # (N, C); labels drawn from its softmax: calibrated by construction
    labels = torch.multinomial(torch.softmax(calibrated, -1), 1).squeeze(1)
    over_confident = 5 * calibrated
    temperature = fit_temperature(over_confident, labels)
    assert temperature > 1 and temperature == pytest.approx(5, rel=0.1)
    assert nll(over_confident, labels, temperature) < nll(over_confident, labels)
    before = expected_calibration_error(torch.softmax(over_confident, -1), labels)
    after = expected_calibration_error(torch.softmax(over_confident / temperature, -1), labels)
    assert after < before / 2


def test_a_calibrated_model_keeps_a_temperature_near_one():
    torch.manual_seed(1)
    logits = 2 * torch.randn(4000, 3)
    labels = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(1, abs=0.1)
    assert fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long)) == 1.0


def test_a_split_the_model_separates_perfectly_keeps_temperature_one():
    """Its NLL falls as T -> 0: a fit there would make every later prediction near certain, right or wrong."""
    labels = torch.tensor([0, 1, 0, 1])
    for margin in (0.1, 1.0, 2.0, 5.0):  # L-BFGS stops on its tolerance inside the bounds from a margin of 1 on
        logits = margin * torch.tensor([[3.0, 0.0], [0.0, 2.0], [5.0, 0.0], [0.0, 1.0]])
        assert nll(logits, labels, 0.05) < nll(logits, labels)
        assert fit_temperature(logits, labels) == 1.0


def test_ece_by_hand():
    probabilities = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 1, 0])
    # 5 bins of width 0.2: (0.8, 1] holds 0.9 right and 0.9 wrong: |0.5 - 0.9| x 2/4 = 0.2;
    # (0.6, 0.8] holds 0.7 right: 0.3 x 1/4 = 0.075; (0.4, 0.6] holds 0.55 right: 0.45 x 1/4 = 0.1125.
    assert expected_calibration_error(probabilities, labels, bins=5) == pytest.approx(0.3875)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


def test_temperature_of_a_checkpoint_entry():
    assert temperature_of(None) == temperature_of({}) == temperature_of({"temperature": -1.0}) == 1.0
    assert temperature_of({"method": "temperature", "temperature": 1.7}) == 1.7


def test_fit_calibrates_reports_and_stores_the_temperature(tmp_path, tiny_csv):
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.max_epochs", "3", "--model.lr", "0.01",
               "--trainer.logger", "false", "--baseline", "false", "--output_dir", str(tmp_path / "runs"),
               "--run_name", "calibrated", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "calibrated"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test_ece_uncalibrated", "test_ece", "test_nll_uncalibrated", "test_nll"):
        assert 0 <= metrics[key] < float("inf"), key
    assert metrics["temperature"] > 0
    assert checkpoint_data(run / "best.ckpt")["calibration"]["temperature"] == pytest.approx(metrics["temperature"])
    assert f"ECE {metrics['test_ece_uncalibrated']:.4f} -> {metrics['test_ece']:.4f}" in proc.stdout
    assert (run / "reliability.png").read_bytes().startswith(b"\x89PNG")


def test_calibrate_false_keeps_temperature_one(tmp_path, tiny_csv):
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.fast_dev_run", "true", "--calibrate", "false",
               "--trainer.logger", "false", "--baseline", "false", "--output_dir", str(tmp_path / "runs"),
               "--run_name", "plain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "plain" / "metrics.json").read_text())
    assert metrics["temperature"] == 1.0 and metrics["test_ece"] == metrics["test_ece_uncalibrated"]
    assert metrics["test_nll"] == pytest.approx(metrics["test_nll_uncalibrated"])


def test_a_run_resumed_from_a_calibrated_checkpoint_does_not_carry_its_temperature_on(tmp_path):
    rows = make_examples(200)
    for row in rows[::10]:  # flipped labels: no model gets every validation text right, so T has a minimum
        row["label"] = "negative" if row["label"] == "positive" else "positive"
    noisy_csv = write_csv(tmp_path / "noisy.csv", rows)
    args = ["--data.train_file", str(noisy_csv), *TINY_MODEL, "--trainer.max_epochs", "3", "--model.lr", "0",
            "--trainer.logger", "false", "--baseline", "false", "--output_dir", str(tmp_path / "runs")]
    proc = fit(*args, "--run_name", "calibrated", cwd=tmp_path)  # lr 0: no epoch beats the first, which is kept
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = tmp_path / "runs" / "calibrated" / "best.ckpt"
    assert checkpoint_data(best)["calibration"]["temperature"] != 1.0
    proc = fit(*args, "--run_name", "resumed", "--ckpt_path", str(best), "--calibrate", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the checkpoints this training writes carry no temperature: it was fitted to the weights resumed from
    assert checkpoint_data(tmp_path / "runs" / "resumed" / "last.ckpt")["calibration"] is None

