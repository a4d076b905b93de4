"""Latency measurement: warm-up, repeats, medians and spread, CUDA sync, threads, dtype, peak memory."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


@contextmanager
def num_threads(n: int | None):
    """Temporarily set torch's intra-op threads (None = leave as is)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median and spread (p10/p90) of ``fn``'s wall time in ms, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {
        "median_ms": statistics.median(times),
        "p10_ms": q[0],
        "p90_ms": q[-1],
        "min_ms": times[0],
        "repeats": repeats,
    }


def bench_module(
    name: str,
    fn: Callable[[torch.Tensor], Any],
    make_input: Callable[[int], torch.Tensor],
    params: int,
    batch_sizes: list[int],
    threads: list[int | None],
    dtype: str,
    device: torch.device,
    warmup: int,
    repeats: int,
    frames_per_item: int = 1,
) -> list[dict[str, Any]]:
    """Time ``fn(make_input(batch))`` for every batch size and thread count; one row per setting."""
    rows = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    for n in threads if device.type == "cpu" else [None]:
        for batch in batch_sizes:
            x = make_input(batch).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with num_threads(n), torch.inference_mode(), autocast:
                stats = time_call(lambda: fn(x), device, warmup, repeats)  # noqa: B023
            frames = batch * frames_per_item
            rows.append({
                "component": name, "batch": batch, "threads": n or torch.get_num_threads(), "dtype": dtype,
                "device": device_name(device), "params": params, **stats, "ms_per_frame": stats["median_ms"] / frames,
                "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            })  # fmt: skip
    return rows


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
