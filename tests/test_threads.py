"""Default intra-op threads: the allowed cores that other jobs leave idle, or OMP_NUM_THREADS when set."""

from __future__ import annotations

import pytest
import torch

from temposyncdiff.errors import UserError
from temposyncdiff.utils import threads


def test_default_is_the_idle_allowed_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cores", lambda: 4)
    for busy, expected in ((0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (7.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda sample_s=0.1, b=busy: b)
        assert threads.default_threads() == expected, busy


def test_environment_and_explicit_settings_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(threads, "busy_cores", lambda sample_s=0.1: pytest.fail("sampled despite OMP_NUM_THREADS"))
    assert threads.default_threads() == 3
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(UserError, match="threads=0"):
            threads.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_busy_cores_sees_a_busy_process():
    """/proc/stat sampling: a spinning child shows up as about one busy core."""
    import multiprocessing as mp

    if threads._cpu_times() is None:
        pytest.skip("no /proc/stat here")
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    child = ctx.Process(target=_spin, args=(stop,))
    child.start()
    try:
        import time

        time.sleep(0.5)
        assert threads.busy_cores(0.3) > 0.6
    finally:
        stop.set()
        child.join(10)


def _spin(stop) -> None:
    while not stop.is_set():
        pass
