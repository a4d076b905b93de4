"""How many intra-op threads to use: the cores this process may run on that other jobs are not keeping busy.

OpenMP threads wait on each other at the end of every parallel region. When another job holds one of them
back, a net of many small kernels slows down several times (tsd-infer at 128 px: 28 fps with 2 threads beside a
busy job vs 112 fps with one; 1.2-2 vs 120 fps was seen on another machine). So ``threads: null`` means:
``OMP_NUM_THREADS`` if set, else the cores allowed (affinity and cgroup quota) minus the cores other processes
are using right now (sampled from /proc/stat), at least one.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


def allowed_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where it does not exist."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(sample_s: float = 0.1) -> float:
    """Cores kept busy by other processes over ``sample_s`` seconds (this one sleeps meanwhile); 0 if unknown."""
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(sample_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return 0.0
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def default_threads(sample_s: float = 0.1) -> int:
    """``OMP_NUM_THREADS`` when the environment sets it (the user's or a launcher's choice, e.g. joblib's), else
    the allowed cores minus the ones other jobs are busy on (rounded), at least one."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = allowed_cores()
    return max(1, min(cores, round(cores - busy_cores(sample_s))))


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads in torch (``None``: :func:`default_threads`); returns the number set."""
    import torch

    if threads is not None and int(threads) < 1:
        from temposyncdiff.errors import UserError

        raise UserError(f"threads={threads}: must be at least 1 (or null to choose from the idle cores)")
    n = int(threads) if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n
