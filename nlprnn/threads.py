"""Thread counts that fit the machine: OpenMP threads beyond the free cores make recurrences crawl."""

from __future__ import annotations

import os
from pathlib import Path


def available_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, one per core, capped by a cgroup CPU quota."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = len(cores)
    try:  # cgroup v2: "max <period>" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(count, 1)


def processes_on_this_machine() -> int:
    """Training processes that torchrun or srun started on this machine; 1 when none did."""
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["LOCAL_WORLD_SIZE"])
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE")  # srun, e.g. "2(x3),1": 2 on nodes 0-2, 1 on node 3
    if not per_node:
        return 1
    counts = []
    for part in per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(int(os.environ.get("SLURM_NODEID", "0")), len(counts) - 1)]


def threads_per_process() -> int:
    """This process's share of the cores it can run on.

    Under SLURM the share is --cpus-per-task where given, else the job's CPUs on this node split among
    its tasks there (a task that SLURM bound to fewer cores keeps that fewer). Otherwise the training
    processes of this machine split its available cores evenly.
    """
    cores = available_cores()
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, min(cores, int(os.environ["SLURM_CPUS_PER_TASK"])))
    if os.environ.get("SLURM_CPUS_ON_NODE"):
        return max(1, min(cores, int(os.environ["SLURM_CPUS_ON_NODE"]) // processes_on_this_machine()))
    return max(1, cores // processes_on_this_machine())


def fit_threads_to_machine() -> None:
    """At most one torch thread per core of this process's share, unless OMP_NUM_THREADS says otherwise.

    torch counts the host's cores, not a container's CPU quota nor the other training processes on the
    machine; OpenMP threads beyond the cores wait on each other at every step (on 2 cores an LSTM ran
    25-60x slower). Lightning's DDP set-up sizes threads from the core count and the devices per node
    alone unless OMP_NUM_THREADS is set, so for processes that srun or torchrun started it is set here.
    """
    import torch

    from nlprnn.slurm import in_slurm_job

    if os.environ.get("OMP_NUM_THREADS"):
        return
    share = threads_per_process()
    if torch.get_num_threads() > share:
        torch.set_num_threads(share)
    if "LOCAL_WORLD_SIZE" in os.environ or in_slurm_job():
        os.environ["OMP_NUM_THREADS"] = str(share)
