"""Timing and counting: medians and spread of a call (CUDA synchronised), FLOPs, the machine's matmul peak,
threads and dtype contexts, and the facts about the machine every timing depends on."""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the CPU features bf16 and int8 speed depends on (reported with every latency table)
FAST_PATH_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


# ---- machine ----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What every latency number depends on besides its own setting (load average: the machine may be shared)."""
    flags = set(cpu_flags())
    return {
        "device": device_name(device),
        "cpu": cpu_model(),
        "cpu_flags": {flag: flag in flags for flag in FAST_PATH_FLAGS},
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (None = leave as is)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32" else nullcontext()


# ---- timing and counting ------------------------------------------------------------------------------------------
def time_call(
    fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10, budget_s: float | None = None
) -> dict[str, float]:
    """Median and spread (p10/p90) of ``fn``'s wall time in ms, synchronising CUDA around each call.

    ``budget_s`` ends the warm-up (after one call) and the repeats (after three) once that many seconds are spent.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    begin = time.perf_counter()
    for _ in range(warmup):
        fn()
        sync()
        if budget_s is not None and time.perf_counter() - begin > budget_s:
            break
    times: list[float] = []
    begin = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        if budget_s is not None and len(times) >= 3 and time.perf_counter() - begin > budget_s:
            break
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {
        "median_ms": statistics.median(times),
        "p10_ms": q[0],
        "p90_ms": q[-1],
        "min_ms": times[0],
        "repeats": len(times),
    }


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.cache
def matmul_peak(device: str, dtype: str, threads: int | None, size: int = 1024) -> float:
    """GFLOP/s of the fastest of a few ``size``-square matmuls in ``dtype``: the machine's practical peak."""
    dev = torch.device(device)
    if dtype == "int8":
        a, b = (torch.randint(-128, 128, (size, size), device=dev, dtype=torch.int8) for _ in range(2))
        matmul = functools.partial(torch._int_mm, a, b)
    else:
        a, b = (torch.randn(size, size, device=dev, dtype=DTYPES[dtype]) for _ in range(2))
        matmul = functools.partial(torch.matmul, a, b)
    with num_threads(threads), torch.inference_mode():
        ms = time_call(matmul, dev, warmup=2, repeats=5)["min_ms"]
    return 2 * size**3 / ms / 1e6


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
