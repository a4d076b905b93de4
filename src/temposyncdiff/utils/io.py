"""Atomic writing: every output file or folder goes to a temporary name in the same folder, then is renamed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from temposyncdiff.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing an output; the previous file is left as it was."""


def safe_name(name: object, key: str) -> str:
    """``name`` if it can be one path component under the project's own folder; else a one-line ``UserError``.

    Refuses empty names, ``.``/``..``, path separators and control characters, so ``run_name=../../x``
    cannot write (or replace) anything outside the folder that the name is joined to.
    """
    text = str(name) if name is not None else ""
    if (
        not text.strip()
        or text in (".", "..")
        or any(sep in text for sep in ("/", "\\", os.sep))
        or any(ord(c) < 32 for c in text)
    ):
        raise UserError(f"{key}={text!r}: not a plain name (no '/', '\\', '..' or empty names)")
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real extension last so writers that infer the format from it (PyAV, PIL) still work
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix or path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: disk full ({err.strerror}); the previous file, if any, is unchanged") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8, newline ``\\n``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically with stable key order."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(final: Path) -> None:
    """Delete temporary siblings of ``final`` left by killed writers on this host."""
    mine = f".{final.name}.tmp-{socket.gethostname()}-"
    for p in final.parent.glob(f".{final.name}.*"):
        pid = p.name[len(mine) :].split("-")[0] if p.name.startswith(mine) else ""
        stale = p.name.startswith(f".{final.name}.old-") or (pid.isdigit() and not pid_alive(int(pid)))
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing ``final`` is moved aside first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path``; it replaces ``path`` only if the block succeeds.

    Leftovers of killed writers on this host (their pid is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
        yield tmp
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """``{"path", "sha256"}`` of a file, or ``{"path", "status": "missing"}`` (what reports record of an input)."""
    if not Path(path).is_file():
        return {"path": str(path), "status": "missing"}
    return {"path": str(path), "sha256": file_sha256(path)}
