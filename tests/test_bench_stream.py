"""scripts/bench_stream.py: its corpus, and one tiny run end to end (a check that it works, not a measurement)."""

from __future__ import annotations

import json
import math

import pyarrow.csv as pa_csv
import pytest

from conftest import load_script, make_examples, write_csv
from deploy.tiny_bundles import build_bundle

TEXTS = 3_000


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_stream")


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_corpus_is_seeded_reused_and_mixes_joined_snippets(bench, tmp_path):
    source = write_csv(tmp_path / "source.csv", make_examples(50))
    args = ["bundle", "--texts", "500", "--source-csv", str(source), "--workdir", str(tmp_path / "work")]
    first, meta = bench.ensure_corpus(bench.parse_args(args))
    again = bench.generate_corpus(tmp_path / "again.csv", 500, 0, bench.snippet_pools(source, "text"), "csv")
    assert first.read_bytes() == (tmp_path / "again.csv").read_bytes() and again["rows"] == meta["rows"] == 500
    first.write_text("reused\n")  # a second run with the same size, seed and source reads the file as it is
    assert bench.ensure_corpus(bench.parse_args(args))[0].read_text() == "reused\n"

    other = bench.ensure_corpus(bench.parse_args(args + ["--seed", "1", "--input-format", "parquet"]))[0]
    assert other.suffix == ".parquet" and other != first
    assert len(bench.read_corpus_texts(other)) == 500 and bench.read_corpus_texts(tmp_path / "again.csv")[0]
    table = pa_csv.read_csv(tmp_path / "again.csv")
    assert table.column_names == ["id", "text"] and table.column("id")[0].as_py() == "r0000001"
    snippets = {row["text"] for row in make_examples(50)}
    texts = table.column("text").to_pylist()
    joined = [t for t in texts if t not in snippets]
    assert 0.2 < len(joined) / len(texts) < 0.4 and all(len(t.split()) >= 4 for t in joined)


def test_ray_step_is_skipped_gracefully_when_missing(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "ray_missing", lambda: "nlprnn.deploy.ray does not exist yet")
    options = bench.parse_args(["bundle", "--workdir", str(tmp_path)])
    assert bench.measure_ray(options, tmp_path / "corpus.csv", tmp_path) == {
        "skipped": "nlprnn.deploy.ray does not exist yet"
    }


def test_one_tiny_run_measures_every_step_and_writes_json(bench, tmp_path, capsys):
    bundle = build_bundle(tmp_path / "bundle")
    source = write_csv(tmp_path / "source.csv", make_examples(300))
    out = tmp_path / "bench.json"
    bench.main([str(bundle), "--texts", str(TEXTS), "--source-csv", str(source), "--workdir", str(tmp_path / "work"),
                "--rows-per-part", "1000", "--json", str(out)])
    results = json.loads(out.read_text())

    assert results["texts"] == TEXTS and results["machine"]["cores"] >= 1
    assert set(results["steps"]) == {"in_memory", "workers_1", "workers_2"}
    for name, step in results["steps"].items():
        assert step["rows"] == TEXTS, name
        for key in ("rows_per_s", "wall_s", "peak_rss_mb", "peak_pss_mb", "largest_process_peak_rss_mb"):
            assert finite_positive(step[key]), (name, key)
        # the sampled sum lies between the largest process's own peak (give or take a missed spike) and the sum of all
        assert 0.5 * step["largest_process_peak_rss_mb"] <= step["peak_rss_mb"] <= step["sum_of_process_peaks_mb"], name
        assert step["largest_process_peak_rss_mb"] < 1_000, name  # the command's own, not the forking test process's
    assert finite_positive(results["steps"]["in_memory"]["seconds"])
    for name in ("workers_1", "workers_2"):
        step = results["steps"][name]
        assert step["rows_ok"] and step["success"]["parts"] == 3 and step["success"]["scored"] == TEXTS
    assert results["steps"]["workers_2"]["max_processes"] >= 3  # the parent and its two workers, summed
    assert set(results["targets"]) == {"rss_workers_1", "rss_workers_2", "workers_1_vs_in_memory",
                                       "workers_2_vs_workers_1", "rows_workers_1", "rows_workers_2"}
    assert all(isinstance(t["met"], bool) and finite_positive(t["value"]) for t in results["targets"].values())
    assert results["targets"]["rows_workers_1"]["met"] and results["targets"]["rows_workers_2"]["met"]
    assert not list((tmp_path / "work").glob("out-*"))  # outputs are removed unless --keep-outputs

    printed = capsys.readouterr().out
    assert "workers_2" in printed and ("PASS" in printed or "FAIL" in printed) and "smoke run" in printed
