"""--ckpt_path PATH into another run folder: the best checkpoint comes along, and the other folder is never written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlprnn.errors import UserError
from nlprnn.fit import main
from nlprnn.run_dir import claim_run_dir, releasing_run_dirs
from test_fit import TINY_MODEL


def tiny(csv: Path, out: Path, run: str, *extra: str) -> list[str]:
    return ["--data.train_file", str(csv), *TINY_MODEL, "--trainer.max_epochs", "2", "--trainer.logger", "false",
            "--output_dir", str(out), "--run_name", run, *extra]


def files(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each file's content, inode and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def best_state(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    (state,) = [s for k, s in checkpoint["callbacks"].items() if k.startswith("BestCheckpoint")]
    return state


def test_a_resume_into_a_new_folder_copies_the_best_checkpoint_and_leaves_the_other_run_alone(
    tmp_path, tiny_csv, capsys
):
    out = tmp_path / "runs"
    main(tiny(tiny_csv, out, "first"))
    first = files(out / "first")
    # The finished run's last.ckpt: nothing is left to train, so only calibration and the test touch best.ckpt.
    main(tiny(tiny_csv, out, "second", "--ckpt_path", str(out / "first" / "last.ckpt")))
    assert files(out / "first") == first  # not even rewritten with the same bytes
    second = out / "second"
    assert {"best.ckpt", "metrics.json", "config.yaml"} <= {p.name for p in second.iterdir()}
    saved = torch.load(second / "best.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == best_state(out / "first" / "last.ckpt")["best_epoch"]

    # Its best.ckpt gone, the resume is refused in one line before a folder is made.
    (out / "first" / "best.ckpt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, out, "third", "--ckpt_path", str(out / "first" / "last.ckpt")))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("nlprnn.fit: error: cannot resume: the checkpoint's best epoch was saved as ")
    assert not (out / "third").exists()


def test_of_two_runs_started_at_once_with_one_run_name_one_is_refused(tmp_path, monkeypatch):
    from nlprnn.errors import UserError
    from nlprnn.run_dir import claim_run_dir

    mkdir, raced = Path.mkdir, set()

    def the_other_run_claims_it_first(self, *args, **kwargs):
        mkdir(self, *args, **kwargs)
        if self.name in ("same", "made-empty") and self.name not in raced:  # between this run's look and its claim
            raced.add(self.name)
            claim_run_dir(self.parent, self.name, resuming=False)

    monkeypatch.setattr(Path, "mkdir", the_other_run_claims_it_first)
    for name in ("same", "made-empty"):
        if name == "made-empty":
            mkdir(tmp_path / "runs" / name)  # an empty folder made beforehand: both runs would take it
        with pytest.raises(UserError, match=f"another run has just claimed .*runs/{name}; choose another --run_name"):
            claim_run_dir(tmp_path / "runs", name, resuming=False)
    assert claim_run_dir(tmp_path / "runs", "fresh", resuming=False).is_dir()


def test_resuming_into_a_run_folder_this_user_cannot_write_is_one_line(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "frozen"
    run.mkdir(parents=True)
    # as a user without write permission sees it (root may write anywhere, so the permission is not set here)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run)
    with pytest.raises(UserError, match=f"cannot resume: the run folder {run} is not writable"):
        claim_run_dir(tmp_path / "runs", "frozen", resuming=True)


def test_a_second_process_cannot_train_in_a_run_folder_another_is_training_in(tmp_path):
    run = claim_run_dir(tmp_path / "runs", "busy", resuming=False)  # this process trains there
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from nlprnn.run_dir import claim_run_dir\n"
         "try:\n    claim_run_dir(Path(sys.argv[1]), 'busy', resuming=True)\n"
         "except Exception as err:\n    print(err)", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == f"another process is training in {run} now; let it end, or stop it first"
    with releasing_run_dirs():
        pass  # the run ends: the folder is free to resume
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from nlprnn.run_dir import claim_run_dir; claim_run_dir(Path(sys.argv[1]), 'busy', True)",
                            str(tmp_path / "runs")], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
