"""Crash safety for training: atomic checkpoint files, RNG state in checkpoints, a stop on a non-finite loss.

Lightning restores the model, optimizers, schedulers, loops, callbacks (EMA) and stateful data loaders from a
``.ckpt``; this module adds what it lacks.
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each ``.ckpt`` to a temporary file and renames it, so a crash never leaves a half-written
    ``last.ckpt`` in place of the good one (Lightning's own writer truncates the file first); reads every
    checkpoint weights-only, whatever the caller asks, so no checkpoint a user names can unpickle code."""

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores: fsspec uploads whole objects already
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class RNGState(pl.Callback):
    """Saves the torch/numpy/python RNG states in each checkpoint and restores them when training resumes,
    so a resumed run draws the same noise as an uninterrupted one. Stored as tensors and plain types:
    checkpoints stay loadable with ``torch.load(weights_only=True)``, as Lightning loads them."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not at load time: the sanity check between loading and training must not shift the streams
        if self._loaded is None:
            return
        state, self._loaded = self._loaded, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        random.setstate(state["python"])


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLoss(pl.Callback):
    """Stops training before the backward pass of a NaN/inf loss, so no checkpoint ever holds its update.

    Lightning's ``EarlyStopping(check_finite=True)`` only looks at validation time, after the bad weights may
    have been saved. Every rank checks, so all stop together under DDP.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach()).all()), all=False)
        if bad:
            ckpt = trainer.checkpoint_callback
            last = (ckpt.last_model_path or ckpt.best_model_path) if ckpt else ""
            value = loss.detach().float().sum().item()
            raise NonFiniteLossError(
                f"training loss is {value if not math.isfinite(value) else 'not finite on another rank'} at step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}); stopped before the update; "
                f"last good checkpoint: {last or 'none'}"
            )
