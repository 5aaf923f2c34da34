"""predict --output: streaming batch scoring into parts, every row exactly once, resumable, bad rows counted."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from nlprnn.deploy import Predictor
from nlprnn.deploy.tables import _binary_lines, stream_lines
from nlprnn.predict import main

from deploy.tiny_bundles import LABELS, WORDS, build_bundle

REPO = Path(__file__).resolve().parents[2]
PROBABILITIES = [f"probability_{label}" for label in LABELS]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "bundle", max_length=40)


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "id,text") -> Path:
    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(header.split(","))})
    pa_csv.write_csv(table, path)
    return path


def read_output(folder: Path) -> pa.Table:
    fmt = next(f.suffix for f in folder.iterdir() if f.name.startswith("part-")).lstrip(".")
    if fmt == "jsonl":
        parts = sorted(folder.glob("part-*.jsonl"))
        return pa.Table.from_pylist([json.loads(line) for p in parts for line in p.read_text().splitlines()])
    options = {"format": "csv", "schema": None} if fmt == "csv" else {"format": "parquet"}
    if fmt == "csv":
        column_types = {"id": pa.string()}
        options["format"] = ds.CsvFileFormat(convert_options=pa_csv.ConvertOptions(column_types=column_types))
        del options["schema"]
    return ds.dataset(sorted(str(p) for p in folder.glob("part-*")), **options).to_table()


def score(bundle: Path, source: Path, out: Path, *args: str) -> None:
    main([str(bundle), "--input", str(source), "--output", str(out), "--threads", "1", *args])


def summary(out: Path) -> dict:
    return json.loads((out / "_SUCCESS").read_text())


def test_scores_every_row_in_order_beside_its_columns(bundle, tmp_path, capsys):
    rows = [(f"{i:05d}", text) for i, text in enumerate(texts(2_345))]
    rows[17] = ("00017", "")
    rows[40] = ("00040", "   ")
    source = write_csv(tmp_path / "in.csv", rows)
    score(bundle, source, tmp_path / "out", "--rows_per_part", "500")

    table = read_output(tmp_path / "out")
    assert table.column_names == ["id", "text", "predicted_label", *PROBABILITIES]
    assert table.column("id").to_pylist() == [row[0] for row in rows]  # leading zeros kept, input order
    assert sorted(f.name for f in (tmp_path / "out").glob("part-*")) == [f"part-0000{k}.parquet" for k in range(5)]
    predictions = Predictor(bundle, threads=1).predict([text for _, text in rows])
    for i, (label, probabilities) in enumerate(predictions):
        if i in (17, 40):
            assert table.column("predicted_label")[i].as_py() is None
            assert all(table.column(c)[i].as_py() is None for c in PROBABILITIES)
        else:
            assert table.column("predicted_label")[i].as_py() == label
            got = [table.column(c)[i].as_py() for c in PROBABILITIES]
            assert got == pytest.approx(list(probabilities.values()), abs=1e-6)
    assert summary(tmp_path / "out") | {"seconds_this_run": 0} == {
        "rows": 2_345, "scored": 2_343, "empty": 2, "undecodable": 0, "parts": 5, "malformed_skipped": 0,
        "first_malformed": None, "seconds_this_run": 0,
    }
    assert "wrote 2,345 rows in 5 parts" in capsys.readouterr().err


def write_input(folder: Path, fmt: str, rows: list[tuple[str, str]]) -> Path:
    table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]})
    if fmt == "csv":
        return write_csv(folder / "in.csv", rows)
    if fmt == "tsv":  # no quoting: texts hold no tabs or newlines
        (folder / "in.tsv").write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in rows))
        return folder / "in.tsv"
    if fmt == "jsonl":
        (folder / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
        return folder / "in.jsonl"
    if fmt == "parquet":
        pq.write_table(table, folder / "in.parquet")
        return folder / "in.parquet"
    if fmt == "txt":
        (folder / "in.txt").write_text("".join(t + "\n" for _, t in rows))
        return folder / "in.txt"
    parts = folder / "parts"  # a folder of Parquet parts, as Spark or Ray write them
    parts.mkdir()
    for k, start in enumerate(range(0, len(rows), 333)):
        pq.write_table(table.slice(start, 333), parts / f"part-{k:03d}.parquet")
    (parts / "_SUCCESS").write_text("")
    return parts


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "txt", "folder"])
def test_each_input_format_gives_the_same_scores(bundle, tmp_path, fmt):
    rows = [(f"{i:04d}", text) for i, text in enumerate(texts(1_000, seed=1))]
    score(bundle, write_input(tmp_path, fmt, rows), tmp_path / "out", "--rows_per_part", "300")
    table = read_output(tmp_path / "out")
    assert table.column("text").to_pylist() == [t for _, t in rows]
    if fmt != "txt":
        assert table.column("id").to_pylist() == [i for i, _ in rows]
    expected = [label for label, _ in Predictor(bundle, threads=1).predict([t for _, t in rows])]
    assert table.column("predicted_label").to_pylist() == expected


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_each_output_format_holds_the_same_rows(bundle, tmp_path, fmt):
    rows = [(f"{i:04d}", text) for i, text in enumerate(texts(700, seed=2))]
    source = write_csv(tmp_path / "in.csv", rows)
    score(bundle, source, tmp_path / f"scores.{fmt}", "--rows_per_part", "300")  # the suffix names the format
    assert len(list((tmp_path / f"scores.{fmt}").glob(f"part-*.{fmt}"))) == 3
    table = read_output(tmp_path / f"scores.{fmt}")
    assert table.column("id").to_pylist() == [i for i, _ in rows]
    expected = Predictor(bundle, threads=1).predict([t for _, t in rows])
    assert table.column("predicted_label").to_pylist() == [label for label, _ in expected]
    assert table.column(PROBABILITIES[0]).to_pylist() == pytest.approx(
        [p[LABELS[0]] for _, p in expected], abs=1e-6)


def test_bad_rows_are_counted_not_fatal(bundle, tmp_path, capsys):
    csv = tmp_path / "in.csv"
    csv.write_bytes(b'id,text\n1,good movie\n2,"bad \xff bytes"\n3,\n4,one,too many\n5,awful plot\n')
    score(bundle, csv, tmp_path / "csv-out")
    table = read_output(tmp_path / "csv-out")
    assert table.column("id").to_pylist() == ["1", "2", "3", "5"]
    assert table.column("text").to_pylist()[1] == "bad \ufffd bytes"
    assert table.column("predicted_label").null_count == 1
    counts = summary(tmp_path / "csv-out")
    assert (counts["rows"], counts["scored"], counts["empty"], counts["undecodable"], counts["malformed_skipped"]) \
        == (4, 3, 1, 1, 1)
    err = capsys.readouterr().err
    assert "1 with no text were left without a label" in err and "1 malformed rows were skipped" in err

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b'{"id": 1, "text": "good movie"}\n{"id": 2, "text": "bad \xff bytes"}\n{"id": 3, "text": null}\n'
                      b'{"id": 4}\nnot json\n\n{"id": 6, "text": "awful plot"}\n{"id": 7, "text": 5}\n')
    score(bundle, jsonl, tmp_path / "jsonl-out")
    table = read_output(tmp_path / "jsonl-out")
    assert table.column("id").to_pylist() == [1, 2, 3, 4, 6]
    assert table.column("predicted_label").null_count == 2  # a null text and a missing one
    counts = summary(tmp_path / "jsonl-out")
    assert (counts["rows"], counts["scored"], counts["empty"], counts["undecodable"], counts["malformed_skipped"]) \
        == (5, 3, 2, 1, 2)  # "not json", and a text that is a number


@pytest.mark.parametrize("block_bytes", [1, 7, 1 << 20])
def test_a_pyarrow_stream_splits_into_the_lines_a_local_file_gives(block_bytes, tmp_path):
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n{"a": "\xff"}\nnot json\n{"a": 3}'  # a byte-order mark, no last newline
    (tmp_path / "in.jsonl").write_bytes(data)
    with pa.OSFile(str(tmp_path / "in.jsonl")) as stream:
        lines = list(stream_lines(stream, block_bytes))
    assert lines == [b'{"a": 1}\r\n', b"\n", b'{"a": "\xff"}\n', b"not json\n", b'{"a": 3}']
    assert lines == list(_binary_lines(tmp_path / "in.jsonl"))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nlprnn.predict", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("problem, make, message", [
    ("no text column", lambda d: write_csv(d / "in.csv", [("1", "good")], header="id,review"),
     "has no column 'text' (it has 'id', 'review'); name the text column with --text_column"),
    ("a column scoring writes", lambda d: write_csv(d / "in.csv", [("good", "x")], header="text,predicted_label"),
     "the input already has a column 'predicted_label', which scoring writes; rename it first"),
    ("missing input", lambda d: d / "nowhere.csv", "input not found:"),
    ("unknown format", lambda d: (d / "in.xlsx").write_text("x") and d / "in.xlsx", "cannot read"),
])
def test_bad_input_is_one_line_before_anything_is_written(bundle, tmp_path, problem, make, message):
    proc = run_cli(str(bundle), "--input", str(make(tmp_path)), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--threads", "--workers", "--rows_per_part"])
def test_a_count_below_one_is_one_line(bundle, tmp_path, option):
    source = write_csv(tmp_path / "in.csv", [("1", "good movie")])
    proc = run_cli(str(bundle), "--input", str(source), "--output", str(tmp_path / "out"), option, "0")
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f"{option} must be at least 1, not 0"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_output_must_be_a_folder_of_its_own(bundle, tmp_path):
    source = write_csv(tmp_path / "in.csv", [("1", "good movie")])
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for out, message in (("file", "is a file"), ("foreign", "already holds files that are not a scoring job's")):
        proc = run_cli(str(bundle), "--input", str(source), "--output", str(tmp_path / out))
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert [f.name for f in (tmp_path / "foreign").iterdir()] == ["notes.txt"]
    for args, message in ((["good movie"], "give --input PATH and no texts"), (["--explain"], "leave out --output")):
        proc = run_cli(str(bundle), "--input", str(source), "--output", str(tmp_path / "o"), *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_finished_job_is_not_redone_and_a_changed_one_is_refused(bundle, tmp_path, capsys):
    source = write_csv(tmp_path / "in.csv", [(str(i), t) for i, t in enumerate(texts(900, seed=3))])
    out = tmp_path / "out"
    score(bundle, source, out, "--rows_per_part", "400")
    written = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*")}
    score(bundle, source, out, "--rows_per_part", "400", "--workers", "2")
    assert "is already complete: 900 rows in 3 parts" in capsys.readouterr().err
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("part-*")} == written

    proc = run_cli(str(bundle), "--input", str(source), "--output", str(out), "--rows_per_part", "300")
    assert proc.returncode == 2 and "holds a job started with --rows_per_part 400" in proc.stderr, proc.stderr
    with open(source, "a") as f:
        f.write("900,one more row\n")
    proc = run_cli(str(bundle), "--input", str(source), "--output", str(out), "--rows_per_part", "400")
    assert proc.returncode == 2 and "holds a job started with other input files" in proc.stderr, proc.stderr
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("part-*")} == written


def test_a_job_that_scored_nothing_starts_anew_with_other_input(bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # a job killed before its first part, over other input with another bundle, left its _job.json
    (out / "_job.json").write_text(json.dumps({"format": 1, "bundle_sha256": "another", "input": []}))
    (out / "part-00003.parquet").write_bytes(b"its part, killed before its record")
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "good"}\n{"id": 2, "text": "bad"}\n')
    score(bundle, tmp_path / "in.jsonl", out)
    assert read_output(out).column("id").to_pylist() == [1, 2]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]

    locked_only = tmp_path / "locked-only"  # a kill between taking the lock and writing _job.json
    locked_only.mkdir()
    (locked_only / "_lock").write_text("")
    score(bundle, tmp_path / "in.jsonl", locked_only)
    assert read_output(locked_only).column("id").to_pylist() == [1, 2]


def test_a_malformed_csv_row_is_named_by_its_row_number_whatever_newlines_its_neighbours_hold(bundle, tmp_path):
    (tmp_path / "in.csv").write_text('id,text\n1,"good\nmovie\nindeed"\n2,awful,plot\n3,fine\n')
    score(bundle, tmp_path / "in.csv", tmp_path / "out")
    assert summary(tmp_path / "out")["first_malformed"] == \
        f"row 3 of {tmp_path / 'in.csv'} (the header is row 1): 3 fields, not 2"


def test_one_job_at_a_time_per_folder(bundle, tmp_path):
    source = write_csv(tmp_path / "in.csv", [("1", "good movie")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text("{}")
    with open(out / "_lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = run_cli(str(bundle), "--input", str(source), "--output", str(out))
    assert proc.returncode == 2 and "another nlprnn.predict is writing to" in proc.stderr, proc.stderr


def test_two_workers_write_what_one_writes(bundle, tmp_path):
    source = write_csv(tmp_path / "in.csv", [(f"{i}", t) for i, t in enumerate(texts(3_000, seed=4))])
    score(bundle, source, tmp_path / "one", "--rows_per_part", "400")
    score(bundle, source, tmp_path / "two", "--rows_per_part", "400", "--workers", "2")
    one, two = read_output(tmp_path / "one"), read_output(tmp_path / "two")
    assert two.column("id").to_pylist() == one.column("id").to_pylist()
    assert two.column("predicted_label").to_pylist() == one.column("predicted_label").to_pylist()
    assert summary(tmp_path / "two")["parts"] == 8


def test_scoring_imports_neither_torch_nor_lightning(bundle, tmp_path):
    source = write_csv(tmp_path / "in.csv", [("1", "good movie")])
    code = ("import sys; from nlprnn.predict import main; main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(bundle), "--input", str(source), "--output",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.rstrip().endswith("[]"), proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_the_same_command_gives_every_row_exactly_once(bundle, tmp_path, workers):
    rows = [(f"r{i:06d}", t) for i, t in enumerate(texts(120_000, seed=5))]
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nlprnn.predict", str(bundle), "--input", str(source), "--output", str(out),
               "--rows_per_part", "2000", "--workers", str(workers), "--threads", "1"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((out / "_parts").glob("*.json"))) < 4 * workers and time.monotonic() < deadline:
        time.sleep(0.02)
    children = _children(job.pid)
    assert len(children) >= (workers if workers > 1 else 0)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 5  # workers die with their parent: none may go on writing parts
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    done_before = len(list((out / "_parts").glob("*.json")))
    assert 0 < done_before < 60 and not (out / "_SUCCESS").exists()

    proc = run_cli(*command[3:], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming: {done_before * 2000:,} rows already scored" in proc.stderr
    table = read_output(out)
    assert table.column("id").to_pylist() == [i for i, _ in rows]  # every row once, in order
    assert summary(out)["rows"] == 120_000 and summary(out)["parts"] == 60
    assert not list(out.glob(".*.tmp"))


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return children


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_with_one_line_and_the_job_resumes(bundle, tmp_path, stop):
    source = write_csv(tmp_path / "in.csv", [(f"{i}", t) for i, t in enumerate(texts(120_000, seed=6))])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nlprnn.predict", str(bundle), "--input", str(source), "--output", str(out),
               "--rows_per_part", "2000", "--workers", "2", "--threads", "1"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "_parts").glob("*.json"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, stop)  # as a terminal's Ctrl-C or a scheduler's preemption does: to the whole group
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + stop, err
    assert err.strip().splitlines()[-1] == (f"nlprnn.predict: error: stopped by {stop.name}; run the same command "
                                            "again to continue from the last finished part")
    assert not list(out.glob(".*.tmp"))
    proc = run_cli(*command[3:], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_output(out).column("id").to_pylist() == [str(i) for i in range(120_000)]


def test_json_lines_may_widen_a_column_between_batches(bundle, tmp_path, monkeypatch):
    import nlprnn.deploy.tables as tables

    monkeypatch.setattr(tables, "BATCH_ROWS", 4)
    lines = [{"text": "good movie", "score": None}] * 5 + [{"text": "awful plot", "score": 1.5}] * 5
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    score(bundle, tmp_path / "in.jsonl", tmp_path / "out", "--rows_per_part", "6")
    table = read_output(tmp_path / "out")
    assert table.column("score").to_pylist() == [None] * 5 + [1.5] * 5


def test_json_lines_keep_every_field_whichever_line_first_has_it(bundle, tmp_path, monkeypatch):
    import nlprnn.deploy.tables as tables

    monkeypatch.setattr(tables, "BATCH_ROWS", 4)
    lines = [{"id": i, "text": "good movie"} for i in range(10)]
    lines[1]["extra"] = "kept"
    del lines[4]["text"]  # the first line of the second batch
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    score(bundle, tmp_path / "in.jsonl", tmp_path / "out", "--rows_per_part", "3")
    table = read_output(tmp_path / "out")
    assert table.column("text").to_pylist() == ["good movie"] * 4 + [None] + ["good movie"] * 5
    assert [i for i, label in enumerate(table.column("predicted_label").to_pylist()) if label is None] == [4]
    assert table.column("extra").to_pylist() == [None, "kept"] + [None] * 8


def test_json_lines_parts_share_one_schema_that_every_reader_takes_as_one_table(bundle, tmp_path, monkeypatch):
    import nlprnn.deploy.tables as tables

    monkeypatch.setattr(tables, "BATCH_ROWS", 4)
    lines = [{"text": "good movie", "note": None, "score": 1}] * 6 + [{"text": "awful plot", "note": "x", "score": 1.5}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    score(bundle, tmp_path / "in.jsonl", tmp_path / "out", "--rows_per_part", "3")
    schemas = {pq.read_schema(part) for part in (tmp_path / "out").glob("part-*.parquet")}
    assert len(schemas) == 1
    table = pq.read_table(tmp_path / "out")  # takes the first part's schema for the whole folder
    assert table.column("note").type == pa.string() and table.column("score").type == pa.float64()
    assert table.column("note").to_pylist() == [None] * 6 + ["x"]


def test_a_lone_surrogate_escape_in_json_lines_is_an_undecodable_text(bundle, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "good \\ud83d movie", "tag": "\\udc00"}\n'
                                       '{"id": 2, "text": "fine \\ud83d\\ude00 pair"}\n')
    score(bundle, tmp_path / "in.jsonl", tmp_path / "out")
    table = read_output(tmp_path / "out")
    assert table.column("text").to_pylist() == ["good \ufffd movie", "fine \U0001f600 pair"]
    assert table.column("tag").to_pylist() == ["\ufffd", None]
    assert table.column("predicted_label").null_count == 0 and summary(tmp_path / "out")["undecodable"] == 1


def test_bytes_that_are_not_utf8_in_another_csv_column_become_replacement_characters(bundle, tmp_path):
    (tmp_path / "in.csv").write_bytes(b"id,title,text\n1,Caf\xe9,good movie\n2,ok,awful plot\n")
    score(bundle, tmp_path / "in.csv", tmp_path / "out")
    table = read_output(tmp_path / "out")
    assert table.column("title").to_pylist() == ["Caf\ufffd", "ok"] and table.column("predicted_label").null_count == 0


def test_a_nested_column_with_csv_output_is_one_line_before_anything_is_written(bundle, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "good", "meta": {"a": 1}}\n')
    proc = run_cli(str(bundle), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.csv"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "column 'meta' of" in proc.stderr and "which CSV cannot hold; write Parquet or JSON lines" in proc.stderr
    assert not (tmp_path / "out.csv").exists()


def test_json_lines_before_the_first_object_are_skipped_and_each_file_must_name_the_text_field(bundle, tmp_path):
    (tmp_path / "in.jsonl").write_text('not json\n[1, 2]\n{"id": 3}\n{"id": 4, "text": "good movie"}\n')
    score(bundle, tmp_path / "in.jsonl", tmp_path / "out")
    assert read_output(tmp_path / "out").column("id").to_pylist() == [3, 4]
    assert summary(tmp_path / "out")["malformed_skipped"] == 2

    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_text('{"id": 1, "text": "good movie"}\n')
    (parts / "b.jsonl").write_text('{"id": 2, "body": "good movie"}\n')
    proc = run_cli(str(bundle), "--input", str(parts), "--output", str(tmp_path / "parts-out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no line of {parts / 'b.jsonl'} has a field 'text' (its lines have 'id', 'body')" in proc.stderr
    assert not (tmp_path / "parts-out").exists()


def test_a_job_takes_its_paths_as_strings_too(bundle, tmp_path):
    from nlprnn.deploy.stream import Job, score_files

    source = write_csv(tmp_path / "in.csv", [("1", "good movie")])
    counts = score_files(Job(str(bundle), str(source), "text", str(tmp_path / "out")), threads=1, quiet=True)
    assert counts["rows"] == counts["scored"] == 1


def test_workers_need_an_output_folder(bundle):
    proc = run_cli(str(bundle), "good movie", "--workers", "2")
    assert proc.returncode == 2 and "--workers needs --output" in proc.stderr, proc.stderr


def test_tsv_quotes_are_text(bundle, tmp_path):
    (tmp_path / "in.tsv").write_text('id\ttext\n1\t"Great film\n2\the said "ok" twice\n')
    score(bundle, tmp_path / "in.tsv", tmp_path / "out")
    assert read_output(tmp_path / "out").column("text").to_pylist() == ['"Great film', 'he said "ok" twice']


@pytest.mark.parametrize("kind", ["dictionary", "string_view"])
def test_parquet_text_columns_of_other_string_types_are_text(bundle, tmp_path, kind):
    texts = pa.array(["good movie", None, "awful plot", "good movie"])
    column = texts.dictionary_encode() if kind == "dictionary" else texts.cast(pa.string_view())  # pandas categoricals
    pq.write_table(pa.table({"text": column}), tmp_path / "in.parquet")
    score(bundle, tmp_path / "in.parquet", tmp_path / "out")
    table = read_output(tmp_path / "out")
    assert table.column("text").to_pylist() == texts.to_pylist()
    labels = table.column("predicted_label").to_pylist()
    assert labels[1] is None and labels[0] == labels[3] is not None and labels[2] is not None


def test_a_text_column_that_is_not_text_is_one_line_and_a_failed_job_leaves_no_folder(bundle, tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    proc = run_cli(str(bundle), "--input", str(tmp_path / "numbers.parquet"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "column 'text' of" in proc.stderr and "holds int64, not text" in proc.stderr
    # a JSON field that changes type is found by the pass that reads every line before scoring: no folder is made
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "good"}\n{"id": [1], "text": "bad"}\n')
    proc = run_cli(str(bundle), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "changes type" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_parquet_parts_whose_column_types_differ_are_merged_or_refused_in_one_line(bundle, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"score": pa.array([1, 2], pa.int64()), "text": ["good", "bad"]}), parts / "a.parquet")
    pq.write_table(pa.table({"score": [0.5], "text": pa.array(["fine"]).dictionary_encode()}), parts / "b.parquet")
    score(bundle, parts, tmp_path / "out", "--rows_per_part", "2")
    assert len({pq.read_schema(part) for part in (tmp_path / "out").glob("part-*.parquet")}) == 1
    table = pq.read_table(tmp_path / "out")
    assert table.column("score").to_pylist() == [1.0, 2.0, 0.5] and table.column("text").to_pylist()[2] == "fine"

    pq.write_table(pa.table({"score": ["x"], "text": ["awful"]}), parts / "c.parquet")
    proc = run_cli(str(bundle), "--input", str(parts), "--output", str(tmp_path / "out2"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot read {parts / 'c.parquet'}: its column types do not join" in proc.stderr, proc.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_parquet_column_of_bytes_is_written_to_csv_or_json_lines_as_text(bundle, tmp_path, fmt):
    blobs = pa.array([b"ok", b"caf\xe9", b"\xff\xfe"], pa.binary())
    pq.write_table(pa.table({"blob": blobs, "text": ["good", "bad", "fine"]}), tmp_path / "in.parquet")
    score(bundle, tmp_path / "in.parquet", tmp_path / "out", "--output_format", fmt)
    assert read_output(tmp_path / "out").column("blob").to_pylist() == ["ok", "caf\ufffd", "\ufffd\ufffd"]
