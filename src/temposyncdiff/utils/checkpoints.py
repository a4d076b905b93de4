"""Lightning checkpoints a run may read: ``ckpt_path`` is checked before anything is built, and an export
reads only the run's own best/last files (inside its ModelCheckpoint folder), always weights-only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from temposyncdiff.errors import UserError
from temposyncdiff.utils.task import log
from temposyncdiff.utils.weights import read_weights_only

LIGHTNING_KEYS = ("state_dict", "global_step", "epoch", "pytorch-lightning_version")
NAMED_PATHS = ("best_model_path", "last_model_path", "kth_best_model_path")  # ModelCheckpoint state that names files


def check_resume(path: str | os.PathLike, stage: str | None) -> Path:
    """The absolute path of ``ckpt_path`` if it is a local, weights-only Lightning checkpoint of ``stage``;
    else a one-line ``UserError``. Cheap enough to run before the data module and model are built."""
    if "://" in str(path):
        raise UserError(f"ckpt_path={path}: only a local checkpoint file can be resumed from (copy it here first)")
    ckpt = read_weights_only(path, "checkpoint", mmap=True)
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("temposyncdiff."):
        raise UserError(
            f"{path}: a weights-only export ({ckpt['format']}), not a Lightning checkpoint; "
            "ckpt_path= resumes from a run's checkpoints/*.ckpt"
        )
    missing = [k for k in LIGHTNING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a Lightning checkpoint (no {', '.join(missing)})")
    if stage is not None and ckpt.get("stage", stage) != stage:
        raise UserError(f"{path}: a checkpoint of the '{ckpt['stage']}' stage, not of '{stage}'")
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and "dirpath" in state:
            _check_named_paths(path, state)
    return Path(path).absolute()  # absolute: a file named like a Lightning keyword ("hpc") stays a file


def _check_named_paths(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """A ModelCheckpoint state names only files inside its own folder (Lightning writes it so); a state that
    names others (which Lightning would later load, or delete as an outdated checkpoint) is refused."""
    folder = state["dirpath"]
    named = [state.get(k) for k in NAMED_PATHS] + list(state.get("best_k_models") or {})
    for name in filter(None, named):
        if not isinstance(folder, str) or not isinstance(name, str) or not _inside(name, folder):
            raise UserError(
                f"{path}: its ModelCheckpoint state names {name!r}, outside its own folder {folder!r} "
                "(an edited or crafted checkpoint?); refusing it"
            )


def _inside(name: str, folder: str) -> bool:
    """Whether ``name`` lies in ``folder`` once both are made absolute and ``..`` is resolved."""
    name, folder = os.path.normpath(os.path.abspath(name)), os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([name, folder]) == folder and name != folder


def own_checkpoint(callback: ModelCheckpoint, which: str) -> Path | None:
    """This run's ``best`` or ``last`` checkpoint: a file inside the callback's folder once symlinks are
    resolved. None when there is none; a path outside the folder (e.g. restored from a resumed checkpoint)
    is ignored with a log line."""
    name = callback.best_model_path if which == "best" else callback.last_model_path
    if not name:
        return None
    path, folder = Path(name).resolve(), Path(callback.dirpath or "").resolve()
    if callback.dirpath and path.is_relative_to(folder) and path.is_file():
        return path
    log.warning("ignoring the %s checkpoint %s: not a file inside this run's checkpoint folder %s", which, name, folder)
    return None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's own checkpoint, weights-only (one-line errors)."""
    ckpt = read_weights_only(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt
