"""SLURM jobs: one run folder per job step, and a job that nears its time limit requeues itself.

With `#SBATCH --signal=USR1@120`, SLURM sends SIGUSR1 two minutes before the time limit. The run then
stops as on SIGTERM (the current batch finishes, `last.ckpt` is saved) and rank 0 requeues the job. The
requeued job keeps its job id, so its run folder is the same, and it resumes from that `last.ckpt`.
Lightning's own requeue (an `hpc_ckpt_N.ckpt` written from inside the signal handler) is turned off,
so there is one checkpoint and one way to resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

REQUEUE_SIGNAL = signal.SIGUSR1


def in_slurm_job() -> bool:
    """Started by srun or sbatch (not an interactive allocation, which Lightning treats as a plain machine)."""
    return SLURMEnvironment.detect()


def job_id() -> str:
    """The job's id, `<array job>_<task>` for an array task; unchanged when the job is requeued."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def default_run_name(dataset_stem: str) -> str:
    """The same in every task of a job step, and again after a requeue: e.g. movie-snippets-slurm4711.0."""
    return f"{dataset_stem}-slurm{job_id()}.{os.environ.get('SLURM_STEP_ID', '0')}"


def was_requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def cluster_environment() -> SLURMEnvironment:
    return SLURMEnvironment(auto_requeue=False)


class RequeueOnSignal(Callback):
    """On SIGUSR1, stop the way SIGTERM does and remember to requeue the job once `last.ckpt` is saved."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None  # the handler to put back: a function, SIG_DFL or SIG_IGN

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(REQUEUE_SIGNAL, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM handling stops every rank between batches


def requeue() -> str | None:
    """Put this job back in the queue (SLURM then ends the running one); on failure, say why."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id()], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return (result.stderr.strip() or f"exit status {result.returncode}") if result.returncode else None
