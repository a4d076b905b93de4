"""Fault recovery: SIGKILL and resume bitwise, atomic and weights-only checkpoint files, NaN stop, resumable loader."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from temposyncdiff.callbacks.fault import AtomicCheckpointIO
from temposyncdiff.data.datamodule import ResumableLoader
from temposyncdiff.data.dataset import EpochSampler
from temposyncdiff.training import train
from temposyncdiff.utils.io import DiskFullError
from tests.helpers.configs import REPO, compose_config
from tests.helpers.configs import TINY_VAE as TINY
from tests.test_train_security import Trap

BIN = Path(sys.executable).parent
# 24 steps, validation and a checkpoint every 4 (ModelCheckpoint waits for the first val/psnr before it saves);
# an epoch is 116 batches, so runs resume mid-epoch
RUN = [*TINY, "export=false", "extras.print_config=false", "trainer.max_steps=24", "trainer.val_check_interval=4",
       "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.ema.decay=0.9"]  # fmt: skip


def _tsd_train(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(BIN / "tsd-train"), *RUN, f"paths.root_dir={root}", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _state(ckpt: Path) -> dict:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {
        "step": c["global_step"],
        "ema": c["state_dict"],
        "live": c["current_model_state"],
        "optimizer": c["optimizer_states"][0]["state"],
        "scheduler": c["lr_schedulers"],
    }


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.slow  # ~20 s: three tsd-train processes, one killed
def test_sigkill_and_resume_equals_uninterrupted_run(data_root):
    logs = data_root / "logs"
    straight = _tsd_train(data_root, logs / "straight" / "runs" / "a", "task_name=straight")
    killed_dir = logs / "crash" / "runs" / "a"
    killed = _tsd_train(data_root, killed_dir, "task_name=crash")
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    step = torch.load(last, weights_only=True)["global_step"]  # complete: checkpoint writes are atomic
    assert 4 <= step < 24 and step % 4 == 0

    resumed = _tsd_train(data_root, logs / "crash" / "runs" / "b", "task_name=crash", "ckpt_path=last")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = _state(logs / "straight" / "runs" / "a" / "checkpoints" / "last.ckpt")
    b = _state(logs / "crash" / "runs" / "b" / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 24
    for key in ("ema", "live", "optimizer", "scheduler"):
        assert _equal(a[key], b[key]), f"{key} differs after resuming from step {step}"


def test_resumable_loader_skips_what_was_trained_on():
    items = {(i, 0): i for i in range(10)}  # EpochSampler yields (index, epoch)
    loader = ResumableLoader(items, batch_size=3, sampler=EpochSampler(10, seed=1))
    full = [b.tolist() for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    fresh = ResumableLoader(items, batch_size=3, sampler=EpochSampler(10, seed=1))
    fresh.load_state_dict(state)
    assert state == {"position": 2} and [b.tolist() for b in fresh] == full[2:]
    assert [b.tolist() for b in fresh] == full  # the epoch after starts from the beginning
    fresh.load_state_dict({"position": 4})  # saved at the end of an epoch: the next one is whole
    assert [b.tolist() for b in fresh] == full


def _broken_write(checkpoint, filepath):
    Path(filepath).write_bytes(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    good = {"global_step": 3, "w": torch.ones(2)}
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(good, path)
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", _broken_write)
    with pytest.raises(DiskFullError, match="last.ckpt: disk full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 6}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3 and os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint({"global_step": 6}, path)  # Lightning's own writer, for contrast
    assert path.read_bytes() == b"half a checkpoint"


def test_checkpoints_are_read_weights_only(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "trap.ckpt"
    torch.save({"state_dict": Trap(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # whatever the caller asks
    assert not marker.exists()
    TorchCheckpointIO().load_checkpoint(path, weights_only=False)  # Lightning's own reader, for contrast
    assert marker.exists()


class NaNAt(L.Callback):
    """Poisons the batch of one step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch.frames.fill_(float("nan"))


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(data_root, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        [*RUN, "task_name=nan", "+callbacks.nan._target_=tests.test_fault.NaNAt", "+callbacks.nan.step=6"],
        data_root,
        run,
    )
    with pytest.raises(SystemExit) as exit_:
        train(cfg)
    assert exit_.value.code == 2
    message = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "training loss is nan at step 6" in message and "last.ckpt" in message and "\n" not in message
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values() if v.is_floating_point())
