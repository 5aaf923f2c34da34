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


def fit_threads_to_machine() -> None:
    """At most one torch thread per available core, unless OMP_NUM_THREADS says otherwise.

    torch counts the host's cores, not a container's CPU quota; OpenMP threads beyond the cores wait on
    each other at every step (on 2 cores an LSTM ran 25-60x slower). DDP on CPU divides further.
    """
    import torch

    if not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > available_cores():
        torch.set_num_threads(available_cores())
