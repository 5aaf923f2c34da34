"""Thread counts: each training process gets its share of the cores, never more threads than cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nlprnn import threads


@pytest.fixture
def eight_core_machine(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # and SLURM_*: the autouse fixture removes them
    monkeypatch.setattr(threads, "available_cores", lambda: 8)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, 1),
    ({"LOCAL_WORLD_SIZE": "4"}, 4),
    ({"SLURM_STEP_TASKS_PER_NODE": "2"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
])
def test_processes_on_this_machine(env, expected, eight_core_machine, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert threads.processes_on_this_machine() == expected


def test_the_processes_of_a_machine_split_its_cores(eight_core_machine, monkeypatch):
    assert threads.threads_per_process() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.threads_per_process() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.threads_per_process() == 1


@pytest.mark.parametrize(("env", "visible_cores", "expected"), [
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "2"}, 8, 4),  # tasks share the job's CPUs
    ({"SLURM_CPUS_ON_NODE": "4", "SLURM_STEP_TASKS_PER_NODE": "1"}, 8, 4),  # the job got 4 of the 8
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "2"}, 2, 2),  # bound to 2 cores: keeps them
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "3"}, 8, 3),
])
def test_under_slurm_the_share_is_the_jobs(env, visible_cores, expected, eight_core_machine, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(threads, "available_cores", lambda: visible_cores)
    assert threads.threads_per_process() == expected


def fitted_threads(**env: str) -> tuple[int, int, str]:
    """In a fresh process: torch's threads before and after fit_threads_to_machine, and OMP_NUM_THREADS after."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}, **env}
    code = ("import os, torch; from nlprnn.threads import fit_threads_to_machine; default = torch.get_num_threads(); "
            "fit_threads_to_machine(); print(default, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS', '-'))")
    default, used, omp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()
    return int(default), int(used), omp


def test_two_srun_tasks_on_this_machine_use_at_most_half_its_cores_each():
    share = max(1, threads.available_cores() // 2)
    default, used, omp = fitted_threads(SLURM_JOB_ID="7", SLURM_JOB_NAME="train", SLURM_NTASKS="2",
                                        SLURM_STEP_TASKS_PER_NODE="2", SLURM_PROCID="0")
    assert used == min(default, share)
    assert omp == str(share)  # so that Lightning's DDP set-up keeps it


def test_a_plain_process_leaves_the_split_to_lightnings_launcher():
    default, used, omp = fitted_threads()
    assert used == min(default, threads.available_cores())
    assert omp == "-"  # Lightning divides by the processes it starts only while OMP_NUM_THREADS is unset
