"""python -m nlprnn.predict: JSON lines from texts or files, no torch on the way, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nlprnn.deploy import Predictor
from nlprnn.deploy.bundle import BUNDLE_FORMAT
from nlprnn.predict import main

from deploy.tiny_bundles import LABELS, build_bundle

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "bundle", max_length=50)


def run_python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "nlprnn.predict", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)


def output_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# Top-level modules of the `train` extra (and what it pulls in); serving must import none of them.
TRAINING_MODULES = ("torch", "lightning", "pytorch_lightning", "torchmetrics", "jsonargparse", "datasets", "wandb",
                    "onnx", "pyarrow", "pandas", "yaml")


def test_serving_imports_neither_torch_nor_lightning(bundle):
    code = textwrap.dedent(f"""
        import sys
        from nlprnn.predict import main
        main(sys.argv[1:])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_MODULES!r})
        print("HEAVY", heavy, file=sys.stderr)
    """)
    proc = run_python(str(bundle), "good movie", "--threads", "1", code=code)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "HEAVY []" in proc.stderr.decode()
    assert output_lines(proc.stdout.decode())[0]["text"] == "good movie"


def test_one_json_line_per_text_in_order(bundle):
    texts = ["good movie", "the plot was awful", "", "café ünïcode"]
    proc = run_python(str(bundle), *texts, "--threads", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = output_lines(proc.stdout.decode("utf-8"))
    assert [line["text"] for line in lines] == texts
    predictor = Predictor(bundle, threads=1)
    for line, (label, probabilities) in zip(lines, predictor.predict(texts)):
        assert set(line) == {"text", "label", "probabilities"}
        assert line["label"] == label and list(line["probabilities"]) == LABELS
        assert line["probabilities"] == pytest.approx(probabilities, abs=1e-6)


def test_undecodable_command_line_bytes_are_replaced(bundle):
    proc = run_python(str(bundle), os.fsdecode(b"good \xff movie"), "--threads", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    assert output_lines(proc.stdout.decode("utf-8"))[0]["text"] == "good \ufffd movie"


@pytest.mark.parametrize("name, content, extra", [
    ("in.txt", b"good movie\n\xff bad bytes\n\nawful plot\n", []),
    ("in.csv", b'id,review\n1,good movie\n2,"\xff bad bytes"\n3,\n4,awful plot\n', ["--text_column", "review"]),
    ("in.jsonl", b'{"text": "good movie"}\n{"text": "\xff bad bytes"}\n{"text": ""}\n{"text": "awful plot"}\n', []),
])
def test_input_files(bundle, tmp_path, capsys, name, content, extra):
    path = tmp_path / name
    path.write_bytes(content)
    main([str(bundle), "--input", str(path), "--threads", "1", *extra])
    lines = output_lines(capsys.readouterr().out)
    assert [line["text"] for line in lines] == ["good movie", "\ufffd bad bytes", "", "awful plot"]
    assert all(line["label"] in LABELS for line in lines)


def test_input_from_stdin(bundle):
    proc = subprocess.run(
        [sys.executable, "-m", "nlprnn.predict", str(bundle), "--input", "-", "--threads", "1"],
        input=b"\xef\xbb\xbfgood movie\nawful plot\n", cwd=REPO, capture_output=True, timeout=300,  # a BOM first
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert [line["text"] for line in output_lines(proc.stdout.decode())] == ["good movie", "awful plot"]


def test_long_texts_are_cut_not_refused(bundle, capsys):
    main([str(bundle), "good " * 5000, "--threads", "1"])
    (line,) = output_lines(capsys.readouterr().out)
    assert line["label"] in LABELS


def newer_bundle(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "newer"
    copy.mkdir()
    for path in bundle.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "nlprnn.json").read_text())
    (copy / "nlprnn.json").write_text(json.dumps({**manifest, "format_version": BUNDLE_FORMAT + 1}))
    return copy


@pytest.mark.parametrize("case, message", [
    ("missing bundle", "no bundle at"),
    ("newer bundle", "newer than this nlprnn reads"),
    ("no texts", "nothing to classify"),
    ("texts and input", "not both"),
    ("missing input", "input file not found"),
    ("bad batch size", "batch_size must be at least 1"),
])
def test_errors_are_one_line(bundle, tmp_path, capsys, case, message):
    args = {
        "missing bundle": [str(tmp_path / "nope"), "text"],
        "newer bundle": [str(newer_bundle(bundle, tmp_path)), "text"],
        "no texts": [str(bundle)],
        "texts and input": [str(bundle), "text", "--input", str(tmp_path / "x.txt")],
        "missing input": [str(bundle), "--input", str(tmp_path / "x.txt")],
        "bad batch size": [str(bundle), "text", "--batch_size", "0"],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--threads", "1"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("nlprnn.predict: error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_errors_in_a_fresh_process_carry_no_traceback(tmp_path):
    proc = run_python(str(tmp_path / "nope"), "text")
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("nlprnn.predict: error: no bundle at") and b"Traceback" not in proc.stderr


def interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where, target", [
    ("printing predictions", "nlprnn.deploy.predictor.Predictor.predict"),
    ("reading JSON lines before scoring", "nlprnn.deploy.tables.jsonl_schema"),
    ("counting rows in the new output folder", "nlprnn.deploy.tables.InputFiles.approximate_rows"),
])
def test_ctrl_c_anywhere_is_one_line_and_leaves_no_output_folder(bundle, tmp_path, capsys, monkeypatch, where,
                                                                 target):
    (tmp_path / "in.jsonl").write_text('{"text": "good movie"}\n')
    monkeypatch.setattr(target, interrupt)
    output = [] if where == "printing predictions" else ["--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main([str(bundle), "--input", str(tmp_path / "in.jsonl"), *output, "--threads", "1"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("nlprnn.predict: error: stopped by SIGINT") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
