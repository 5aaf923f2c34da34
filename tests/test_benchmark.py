"""scripts/benchmark.py: the FLOP count it reports, and one run end to end on a tiny setting."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCRIPTS, load_script, make_examples, write_csv

SCRIPT = SCRIPTS / "benchmark.py"


@pytest.mark.parametrize(
    ("cell", "gates"), [("lstm", 4), ("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1)]
)
def test_flops_count_every_gate_of_every_layer_and_direction(cell, gates):
    shape = {"cell": cell, "embedding_dim": 10, "hidden_size": 6, "num_layers": 3, "directions": 2}
    # layer 1 reads the 10-wide embedding, layers 2 and 3 the 12-wide output below; 2 FLOPs per multiply-add
    per_direction = sum(2 * gates * 6 * (width + 6) for width in (10, 12, 12))
    assert load_script("benchmark").flops_per_token(shape) == 2 * per_direction


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_one_run_measures_everything_and_writes_json_markdown_and_plot(tmp_path):
    train_file = write_csv(tmp_path / "tiny.csv", make_examples(200))
    out = tmp_path / "out"
    out.mkdir()  # a report from before, with a section the script writes and one written by hand
    (out / "benchmarks.md").write_text("# Benchmarks\n\n## Memory\n\nstale figure\n\n## int8 bundles\n\nwritten by hand\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--warmup-steps", "1", "--steps", "2", "--repeats", "1",
         "--memory-epochs", "1", "--inference-runs", "3", "--inference-texts", "16", "--note", "tiny smoke run",
         "--", "--data.train_file", str(train_file), "--data.batch_size", "16", "--model.embedding_dim", "8",
         "--model.encoder.hidden_size", "8", "--model.encoder.dropout", "0.3"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "benchmarks.json").read_text())

    assert results["machine"]["torch_threads"] == 1 and results["machine"]["cpu_model"]
    training = results["training"]
    assert training["model"] == {"cell": "lstm", "embedding_dim": 8, "hidden_size": 8, "num_layers": 2,
                                 "directions": 2, "direction": "bidirectional", "between_layer_dropout": 0.3}
    # 2 directions x (8 * 8 * (8 + 8) for layer 1 + 8 * 8 * (16 + 8) for layer 2), three times for training
    assert training["training_flops_per_token"] == 3 * 2 * (8 * 8 * 16 + 8 * 8 * 24)
    for name in ("plain", "pipeline", "pipeline_progress_bar", "ceiling"):
        assert finite_positive(training[name]["tokens_per_s"]) and finite_positive(training[name]["gflops"]), name
        (run,) = training["runs"][name]
        assert run["steps"] == 2 and 0 < run["tokens"] <= run["padded_tokens"], name
    assert training["runs"]["ceiling"][0]["tokens"] == 2 * 16 * training["ceiling_length"]
    assert training["pipeline"]["padding_efficiency"] > 0.9  # bucketed; the plain loop's random batches are not
    for ratio in ("pipeline_vs_plain", "pipeline_vs_ceiling", "matmul_gflops"):
        assert finite_positive(training[ratio]), ratio

    tokenization = results["tokenization"]
    assert tokenization["texts"] == 200 and tokenization["tokens"] > 200
    assert set(tokenization["phases_s"]) == {"load_splits", "train_tokenizer", "tokenize_splits"}
    assert finite_positive(tokenization["tokenize_vs_direct"]) and finite_positive(tokenization["prepare_vs_direct"])

    memory = results["memory"]
    assert 100 < memory["peak_rss_mb"] < 4000 and "--trainer.max_epochs 1" in memory["command"]

    engines = results["inference"]["engines"]
    assert {"onnxruntime", "pytorch eager"} <= set(engines)
    assert all(finite_positive(v) for v in results["inference"]["onnxruntime_vs_eager"].values())

    assert set(results["targets"]) == {"pipeline_vs_plain", "pipeline_vs_ceiling", "tokenize_vs_direct", "peak_rss_mb"}
    assert all(isinstance(t["met"], bool) for t in results["targets"].values())

    markdown = (out / "benchmarks.md").read_text()
    assert "tiny smoke run" in markdown
    assert "stale figure" not in markdown and markdown.endswith("\n## int8 bundles\n\nwritten by hand\n")
    for heading in ("## Machine", "## Targets", "## Training throughput", "## Tokenization", "## Inference", "## Memory"):
        assert heading in markdown
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rewritten_report_keeps_other_scripts_sections_and_drops_its_own_skipped_ones(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n## Training throughput\n\nstale figures\n\n## int8 bundles\n\nanother script's\n")
    benchmark = load_script("benchmark")
    kept = benchmark.written_elsewhere(report, benchmark.OWN_SECTIONS)  # a run with --skip training
    assert kept == ["## int8 bundles\n\nanother script's\n"]
