"""The cluster path (nlprnn.deploy.ray) on a local 2-CPU Ray cluster: row for row what `predict --output` writes."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pa_csv = pytest.importorskip("pyarrow.csv")
pq = pytest.importorskip("pyarrow.parquet")

import nlprnn.deploy.ray as ray_scoring  # noqa: E402
from nlprnn import predict  # noqa: E402

from deploy.tiny_bundles import LABELS, WORDS, build_bundle  # noqa: E402

ROWS = 10_000
EMPTY_ROWS = {0, 17, 4_999, 9_999}  # and a whitespace-only text at 5_000


@pytest.fixture(scope="module")
def cluster():
    # ray.init installs its own SIGTERM and SIGINT handlers in this (pytest's) process; later tests need ours back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "bundle")


@pytest.fixture(scope="module")
def csv_input(tmp_path_factory) -> Path:
    """10,000 rows: ids with leading zeros, texts of random words, a few without text."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("input") / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        for i in range(ROWS):
            words = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
            text = "" if i in EMPTY_ROWS else "   " if i == 5_000 else words
            writer.writerow([f"{i:06d}", text])
    return path


@pytest.fixture(scope="module")
def single_process(bundle, csv_input, tmp_path_factory) -> pa.Table:
    """What `python -m nlprnn.predict BUNDLE --input X --output Y` writes."""
    output = tmp_path_factory.mktemp("single") / "scores"
    predict.main([str(bundle), "--input", str(csv_input), "--output", str(output), "--threads", "1"])
    return read_folder(output)


def read_folder(folder: Path) -> pa.Table:
    """The data files of an output folder, in name order (which is row order), as one table."""
    files = sorted(f for f in folder.iterdir() if not f.name.startswith(("_", ".")))
    return pa.concat_tables([pq.read_table(f) for f in files])


def assert_same_rows(got: pa.Table, expected: pa.Table) -> None:
    assert got.column_names == expected.column_names
    assert got.column("id").to_pylist() == expected.column("id").to_pylist()  # same rows, same order, zeros kept
    assert got.column("text").to_pylist() == expected.column("text").to_pylist()
    assert got.column("predicted_label").to_pylist() == expected.column("predicted_label").to_pylist()
    for label in LABELS:
        a, b = got.column(f"probability_{label}"), expected.column(f"probability_{label}")
        assert a.is_null().to_pylist() == b.is_null().to_pylist()
        np.testing.assert_allclose(a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False),
                                   rtol=0, atol=1e-6)


def test_single_process_reference_has_the_expected_rows(single_process):
    assert single_process.num_rows == ROWS
    labels = single_process.column("predicted_label").to_pylist()
    assert {i for i, label in enumerate(labels) if label is None} == EMPTY_ROWS | {5_000}
    assert set(labels) - {None} <= set(LABELS)


def test_command_line_on_the_cluster_equals_the_single_process_path(cluster, bundle, csv_input, single_process,
                                                                    tmp_path, capsys):
    output = tmp_path / "scores"
    started = time.monotonic()
    ray_scoring.main([str(bundle), "--input", str(csv_input), "--output", str(output),
                      "--workers", "2", "--threads_per_worker", "1"])
    print(f"ray path: {ROWS} rows in {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert "wrote the scored rows" in capsys.readouterr().err
    assert_same_rows(read_folder(output), single_process)


def write_part(table: pa.Table, path: Path) -> None:
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    elif path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_two_actors_share_the_rows_of_a_folder_of_parts(suffix, cluster, bundle, single_process, tmp_path,
                                                        monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(4):  # four files: four read tasks, four blocks for the pool to spread
        write_part(single_process.select(["id", "text"]).slice(k * 2_500, 2_500), parts / f"part-{k}{suffix}")

    class RecordingScorer:  # defined here, so Ray ships it by value; the real scorer is looked up on the worker
        def __init__(self, **kwargs):
            self.scorer = ray_scoring.BundleScorer(**kwargs)

        def __call__(self, table):
            time.sleep(0.2)  # long enough that the other actor takes the next batch
            scored = self.scorer(table)
            return scored.append_column("pid", pa.array([os.getpid()] * scored.num_rows, pa.int64()))

    monkeypatch.setattr(ray_scoring, "BundleScorer", RecordingScorer)
    source = ray_scoring.open_source(str(parts), "text")
    scored = ray_scoring.score_dataset(ray_scoring.read_input(source, "text"), bundle, workers=2,
                                       threads_per_worker=1, rows_per_batch=1_000)
    table = pa.concat_tables(ray.get(scored.materialize().to_arrow_refs()))
    assert len(set(table.column("pid").to_pylist())) == 2
    assert_same_rows(table.drop_columns(["pid"]), single_process)


def test_json_lines_are_read_as_predict_reads_them(cluster, bundle, tmp_path, capsys):
    """Bad lines cost only themselves, as in predict: Ray's own JSON reader would fail the whole job on one."""
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "good movie"}\n{"id": 2, "text": "bad \xff bytes"}\n'
                      b'{"id": 3, "text": null}\nnot json\n\n[1, 2]\n{"id": 6, "text": 5}\n{"id": 7, "text": "awful plot"}')
    expected = tmp_path / "single"
    predict.main([str(bundle), "--input", str(jsonl), "--output", str(expected), "--threads", "1"])
    output = tmp_path / "scores"
    ray_scoring.main([str(bundle), "--input", str(jsonl), "--output", str(output)])
    got, want = read_folder(output), read_folder(expected)
    assert got.column("id").to_pylist() == [1, 2, 3, 7]
    assert got.column("text").to_pylist()[1] == "bad \ufffd bytes"
    assert_same_rows(got, want)
    assert "\n3 malformed rows were skipped (for example: line " in capsys.readouterr().err  # not the blank line


def test_csv_rows_with_the_wrong_number_of_fields_are_skipped_and_counted(cluster, bundle, tmp_path, capsys):
    rows = tmp_path / "in.csv"
    rows.write_text('id,text\n1,good movie\n2,bad,extra field\n3,awful plot\n4\n5,"a, quoted text"\n')
    output = tmp_path / "scores"
    ray_scoring.main([str(bundle), "--input", str(rows), "--output", str(output)])
    assert read_folder(output).column("id").to_pylist() == ["1", "3", "5"]
    assert "\n2 malformed rows were skipped (for example: a row of " in capsys.readouterr().err


def test_bytes_that_are_not_utf8_become_u_fffd_in_other_csv_columns_too(cluster, bundle, tmp_path):
    rows = tmp_path / "in.csv"
    rows.write_bytes(b"id,text\nab\xffc,good movie\n2,bad \xff bytes\n")
    expected = tmp_path / "single"
    predict.main([str(bundle), "--input", str(rows), "--output", str(expected), "--threads", "1"])
    output = tmp_path / "scores"
    ray_scoring.main([str(bundle), "--input", str(rows), "--output", str(output)])
    got = read_folder(output)
    assert got.column("id").to_pylist() == ["ab\ufffdc", "2"]
    assert_same_rows(got, read_folder(expected))


def test_a_missing_text_column_is_one_line_before_anything_is_written(bundle, csv_input, tmp_path, capsys):
    output = tmp_path / "scores"
    with pytest.raises(SystemExit) as exit:
        ray_scoring.main([str(bundle), "--input", str(csv_input), "--output", str(output), "--text_column", "body"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no column 'body'" in err and "--text_column" in err
    assert not output.exists()


def refused(bundle: Path, source: Path, output: Path, capsys, monkeypatch, *more: str) -> str:
    """The one line `main` ends with, having joined no cluster and written nothing."""

    def joins(address):
        raise AssertionError("joined a cluster")

    monkeypatch.setattr(ray_scoring, "_connect", joins)
    with pytest.raises(SystemExit) as exit:
        ray_scoring.main([str(bundle), "--input", str(source), "--output", str(output), *more])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nlprnn.deploy.ray: error: ")
    assert not output.exists()
    return err


def test_a_parquet_text_column_that_is_not_text_is_one_line(bundle, tmp_path, capsys, monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["good movie"]}), parts / "part-0.parquet")
    pq.write_table(pa.table({"id": [2], "text": [5]}), parts / "part-1.parquet")  # every file is checked
    err = refused(bundle, parts, tmp_path / "scores", capsys, monkeypatch)
    assert "column 'text' of " in err and "part-1.parquet holds int64, not text" in err and "--text_column" in err


def test_a_struct_column_with_csv_output_is_one_line(bundle, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1], "meta": [{"stars": 4}], "text": ["good movie"]}), source)
    err = refused(bundle, source, tmp_path / "scores.csv", capsys, monkeypatch)
    assert "column 'meta' of " in err and "which CSV cannot hold" in err and "--output_format" in err


@pytest.mark.parametrize("existed", [False, True])
def test_a_write_that_fails_leaves_no_files(existed, cluster, tmp_path):
    output = tmp_path / "scores"
    if existed:
        output.mkdir()
    rows = ray.data.from_arrow(pa.table({"id": [1, 2], "meta": [{"stars": 4}, None]}))  # CSV holds no struct
    with pytest.raises(Exception, match="struct"):
        ray_scoring.write_output(rows, str(output), "csv")
    assert (list(output.iterdir()) == []) if existed else not output.exists()


@pytest.mark.parametrize("case", ["missing input", "output holds files", "no workers", "no ray"])
def test_user_mistakes_are_one_line(case, bundle, csv_input, tmp_path, capsys, monkeypatch):
    output = tmp_path / "scores"
    source = csv_input
    more = ["--workers", "0"] if case == "no workers" else []
    if case == "missing input":
        source = tmp_path / "nowhere.csv"
    elif case == "output holds files":
        output.mkdir()
        (output / "old.parquet").write_bytes(b"")
    elif case == "no ray":
        monkeypatch.setattr(ray_scoring, "ray", None)
    with pytest.raises(SystemExit) as exit:
        ray_scoring.main([str(bundle), "--input", str(source), "--output", str(output), *more])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nlprnn.deploy.ray: error: ")
    assert {"missing input": "input not found", "output holds files": "already holds files",
            "no workers": "must be at least 1", "no ray": 'pip install "nlprnn[ray]"'}[case] in err


def test_the_module_imports_neither_torch_nor_lightning():
    code = "import sys, nlprnn.deploy.ray; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
