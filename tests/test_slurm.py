"""SLURM: run folders named after the job, and a job that nears its time limit requeues itself and resumes.

The job's environment is what srun gives a task; `scontrol` is a stand-in that records its arguments.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from test_faults import assert_same_training, fit_stalled_at, load, tiny

from nlprnn import slurm
from nlprnn.fit import main


@pytest.fixture
def slurm_task(monkeypatch, tmp_path) -> Path:
    """This process is task 0 of 1 in step 0 of job 4711; returns the file `scontrol` writes its arguments to."""
    for name, value in {"SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train",
                        "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    calls = tmp_path / "scontrol.calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    return calls


def test_the_run_folder_is_named_after_the_job_and_step(slurm_task, monkeypatch):
    assert slurm.in_slurm_job()
    assert slurm.default_run_name("reviews") == "reviews-slurm4711.0"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm.default_run_name("reviews") == "reviews-slurm4700_3.0"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an salloc shell: Lightning treats it as a plain machine
    assert not slurm.in_slurm_job()


def test_the_time_limit_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path, tiny_csv, slurm_task,
                                                                           monkeypatch):
    out = tmp_path / "runs"
    proc, log = fit_stalled_at(5, tiny(tiny_csv, out, None, "--checkpoint_every_n_steps", "0"), tmp_path)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=USR1@120` sends before the time limit
    proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == 143, output[-3000:]
    assert "stopped at step 5 before the time limit; requeuing SLURM job 4711" in output
    assert "Traceback" not in output
    assert slurm_task.read_text() == "requeue 4711\n"
    run = out / "tiny-slurm4711.0"
    assert load(run / "last.ckpt")["global_step"] == 5
    assert not list(run.glob("hpc_ckpt_*")), "Lightning's own requeue checkpoint was written too"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job: same id, same command
    main(tiny(tiny_csv, out, None))
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    main(tiny(tiny_csv, out, "uninterrupted"))
    assert_same_training(load(run / "last.ckpt"), load(out / "uninterrupted" / "last.ckpt"))


def test_a_failed_requeue_is_one_line_and_keeps_the_checkpoint(tmp_path, tiny_csv, slurm_task):
    (slurm_task.parent / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    out = tmp_path / "runs"
    proc, log = fit_stalled_at(3, tiny(tiny_csv, out, None, "--checkpoint_every_n_steps", "0"), tmp_path)
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == 2, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "nlprnn.fit: error: last.ckpt is saved, but `scontrol requeue 4711` failed (Invalid job id specified); "
        f"continue with python -m nlprnn.fit --config {out / 'tiny-slurm4711.0' / 'config.yaml'} --ckpt_path last"
    )
    assert load(out / "tiny-slurm4711.0" / "last.ckpt")["global_step"] == 3


class UsrAtTest(Callback):
    """Sends this process SLURM's time-limit signal as the test starts, after training."""

    def on_test_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)


def test_the_time_limit_signal_after_training_requeues_the_job_to_test_it(tmp_path, tiny_csv, slurm_task, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, out, None), callbacks=[UsrAtTest()])
    assert exit_info.value.code == 143
    assert ("stopped after training, before the time limit; requeuing SLURM job 4711, which tests last.ckpt's "
            "training") in capsys.readouterr().err
    assert slurm_task.read_text() == "requeue 4711\n"
    assert not (out / "tiny-slurm4711.0" / "metrics.json").exists()
