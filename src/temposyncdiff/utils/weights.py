"""Weights-only export files (the seed's checkpoints/*.pt): tensors + plain-types config, no pickled objects.

Layout: ``{"format": "temposyncdiff.<kind>", "version": 1, "target": "temposyncdiff.nets...Class",
"config": {...}, "state_dict": {...}, "meta": {...}}``, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_path

FORMAT_VERSION = 1
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pre-1.6 layout starts with this pickle
NET_PACKAGE = "temposyncdiff.nets."


class WeightsError(UserError, ValueError):
    """A weights file that is corrupt, of another kind, or of a newer format."""


def save_weights(path: str | os.PathLike, kind: str, net: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (which must carry a plain ``config`` dict of its constructor arguments) atomically."""
    target = f"{type(net).__module__}.{type(net).__qualname__}"
    payload = {
        "format": f"temposyncdiff.{kind}",
        "version": FORMAT_VERSION,
        "target": target,
        "config": dict(net.config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def keep_previous(path: str | os.PathLike) -> Path | None:
    """Keep the file at ``path`` (before it is replaced) beside it as ``<stem>.<its mtime>.<suffix>``, e.g.
    ``vae_pretrained.20250131-142501.pt`` (``-1``, ``-2``... on a clash); returns that path, None if there is none.

    A hard link where the filesystem allows (no copy), else an atomic copy; nothing existing is replaced.
    """
    path = Path(path)
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    clash = 0
    while True:
        kept = path.with_name(f"{path.stem}.{stamp}{f'-{clash}' if clash else ''}{path.suffix}")
        clash += 1
        if kept.exists():
            continue
        try:
            os.link(path, kept)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this filesystem
            with atomic_path(kept) as tmp:
                shutil.copy2(path, tmp)
        return kept


def read_weights_only(path: str | os.PathLike, what: str = "weights file", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` of a local PyTorch zip file; one-line errors naming the file.

    Never unpickles code, and no message repeats torch's advice to retry with weights-only loading turned off.
    Files in torch's legacy layout (saved before torch 1.6, such as some published weights) go through the same
    weights-only unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found" if not path.exists() else f"{path}: not a file")
    try:
        zipped = zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # is_zipfile itself raises on some corrupt end records
        zipped = False
    if not zipped and not _legacy(path):
        raise WeightsError(
            f"{path}: not a readable {what} (not a PyTorch zip archive: corrupt, truncated or another format)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as err:
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        detail = (
            f"it names {named.group(1)}, not a tensor or plain type"
            if named
            else "corrupt, or pickled objects beyond tensors and plain types"
        )
        raise WeightsError(f"{path}: refused by the weights-only loader ({detail})") from err
    except Exception as err:  # a corrupt archive or pickle: RuntimeError, EOFError, KeyError, IndexError, ...
        raise WeightsError(f"{path}: not a readable {what} (corrupt or truncated)") from err


def _legacy(path: Path) -> bool:
    """Whether the file starts with the magic number of torch.save's legacy (pre-1.6, non-zip) layout."""
    with open(path, "rb") as f:
        return f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC


def load_payload(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read and check an export file of the given kind; clear errors for every way it can be wrong."""
    path = Path(path)
    payload = read_weights_only(path)
    if not isinstance(payload, dict) or "format" not in payload:
        raise WeightsError(f"{path}: not a TempoSyncDiff export (a Lightning .ckpt? use ckpt_path= for those)")
    if payload["format"] != f"temposyncdiff.{kind}":
        raise WeightsError(f"{path}: holds a '{payload['format']}' export, expected 'temposyncdiff.{kind}'")
    missing = [k for k in ("target", "config", "state_dict") if k not in payload]
    if missing:
        raise WeightsError(f"{path}: incomplete export, missing {', '.join(missing)}")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise WeightsError(
            f"{path}: format version {payload['version']} is newer than this code ({FORMAT_VERSION}); upgrade temposyncdiff"
        )
    return payload


def build_net(target: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate a net class from our own ``nets`` package (never arbitrary import paths)."""
    if not target.startswith(NET_PACKAGE):
        raise WeightsError(f"refusing to build {target!r}: only {NET_PACKAGE}* classes can be loaded")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)(**config)


def load_net(path: str | os.PathLike, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the net stored in an export file; returns (net in eval mode, meta)."""
    payload = load_payload(path, kind)
    try:
        net = build_net(payload["target"], payload["config"])
    except (ImportError, AttributeError, TypeError, ValueError) as err:  # ValueError: WeightsError too
        raise WeightsError(f"{path}: {err}") from None
    try:
        net.load_state_dict(payload["state_dict"])
    except (RuntimeError, AttributeError, TypeError) as err:  # wrong shapes or keys; values that are no tensors
        raise WeightsError(f"{path}: weights do not fit {payload['target']} ({str(err).splitlines()[0]})") from err
    return net.eval(), payload["meta"]
