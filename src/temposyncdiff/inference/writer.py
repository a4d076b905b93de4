"""Writes a generation's outputs atomically: frames/%05d.png, sample.mp4 (H.264 + AAC), summary.json and a marker.

Every sample folder holds a ``.tsd-sample`` marker (a small JSON). An existing ``out_dir`` is replaced only when it
is empty or is such a folder holding nothing but what tsd-infer writes; anything else is refused, so a user's files
are never deleted. A run killed mid-way leaves a hidden ``.<name>.partial-<host>-<pid>`` folder; the next run into
the same parent folder, of any name, removes it once that process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from temposyncdiff.data.video import write_video
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import pid_alive, write_json

log = logging.getLogger(__name__)

MARKER = ".tsd-sample"
SAMPLE_FILES = ("sample.mp4", "summary.json", MARKER)  # plus frames/%05d.png
FRAME_NAME = re.compile(r"\d{5}\.png")
_HIDDEN = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>.+)-(?P<pid>\d+)")
_open_partials: set[Path] = set()  # this process's partial folders (a leftover may carry a reused pid)


def check_out_dir(out_dir: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> Path:
    """``out_dir`` as an absolute path if tsd-infer may write (or replace) it; else a one-line UserError naming it.

    Refused: the current directory, home, any ``protected`` folder or a folder holding one of them; a symlink
    or file; a non-empty folder without the marker, or holding anything tsd-infer does not write.
    """
    path = Path(os.path.abspath(out_dir))
    real = Path(os.path.realpath(path))
    for keep in (Path.cwd(), Path.home(), *map(Path, protected)):
        keep = Path(os.path.realpath(keep))
        if real == keep or real in keep.parents:
            raise UserError(
                f"out_dir={out_dir}: {path} is or holds {keep}; tsd-infer replaces out_dir, give it its own"
            )
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{path}: exists and is not a folder; tsd-infer leaves it alone (pick another out_dir)")
    if path.is_dir() and any(path.iterdir()):
        if _marker(path) is None:
            raise UserError(
                f"{path}: not a sample folder written by tsd-infer (no {MARKER}); it is left alone "
                "(pick another run_name or out_dir)"
            )
        foreign = _foreign(path)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise UserError(
                f"{path}: holds files tsd-infer did not write ({', '.join(foreign[:3])}{more}); "
                "move them away or pick another run_name or out_dir"
            )
    return path


def write_sample(
    out_dir: str | os.PathLike,
    frames: Iterable[np.ndarray],
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    save_frames: bool = True,
    summary: Callable[[], dict] | None = None,
    protected: Iterable[str | os.PathLike] = (),
) -> Path:
    """Build everything in a hidden sibling folder, then swap it in: a crash never leaves half a sample.

    ``out_dir`` must pass ``check_out_dir`` (checked again just before the swap). ``summary`` is called after
    the last frame (so it can report timings) and saved as summary.json.
    """
    protected = tuple(protected)
    out_dir = check_out_dir(out_dir, protected)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir.parent)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir()
    _open_partials.add(tmp)

    def saved(stream: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for i, frame in enumerate(stream):
            if save_frames:
                Image.fromarray(frame).save(tmp / "frames" / f"{i:05d}.png")
            yield frame

    try:
        write_json(tmp / MARKER, {"written_by": "tsd-infer", "host": socket.gethostname(), "pid": os.getpid()})
        if save_frames:
            (tmp / "frames").mkdir()
        write_video(tmp / "sample.mp4", saved(frames), fps, audio, sample_rate)
        write_json(tmp / "summary.json", summary() if summary else {})
        check_out_dir(out_dir, protected)  # the folder may have changed while generating
        _swap_in(tmp, out_dir)
    finally:
        _open_partials.discard(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Clear what killed tsd-infer runs on this host left in ``folder``: their partial samples are removed and
    a sample moved aside for replacement goes back to its name (or is removed when a newer one took it).

    Only hidden folders named as write_sample names them and holding its marker are touched, and only once
    the process named in them is gone; folders of other hosts are left alone.
    """
    host, me = socket.gethostname(), os.getpid()
    for path in Path(folder).glob(".*"):
        m = _HIDDEN.fullmatch(path.name)
        if not m or m["host"] != host or path.is_symlink() or not path.is_dir() or _marker(path) is None:
            continue
        pid = int(m["pid"])
        if pid_alive(pid) and (pid != me or path in _open_partials):
            continue
        final = path.with_name(m["name"])
        if m["kind"] == "partial":
            shutil.rmtree(path, ignore_errors=True)
        elif not final.exists() and not final.is_symlink():
            os.replace(path, final)
            log.warning("restored %s, moved aside by a tsd-infer run that was killed", final)
        else:
            _remove_sample(path)


def _marker(folder: Path) -> dict | None:
    """The marker's contents if ``folder`` holds a marker tsd-infer wrote, else None."""
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "tsd-infer" else None


def _foreign(folder: Path) -> list[str]:
    """Entries of a sample folder that tsd-infer does not write, relative to it."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name == "frames" and entry.is_dir() and not entry.is_symlink():
            found += [f"frames/{f.name}" for f in sorted(entry.iterdir()) if not _own_file(f, FRAME_NAME.fullmatch)]
        elif not _own_file(entry, lambda name: name in SAMPLE_FILES):
            found.append(entry.name)
    return found


def _own_file(path: Path, named: Callable[[str], object]) -> bool:
    return bool(named(path.name)) and path.is_file() and not path.is_symlink()


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; a sample already there is moved aside first and its files deleted after."""
    if not (final.is_dir() and any(final.iterdir())):
        os.replace(tmp, final)  # absent or an empty folder: one rename
        return
    old = final.with_name(f".{final.name}.old-{socket.gethostname()}-{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    _remove_sample(old)


def _remove_sample(folder: Path) -> None:
    """Delete the files tsd-infer wrote in a sample folder, then the folder if nothing else is left in it."""
    frames = folder / "frames"
    if frames.is_dir() and not frames.is_symlink():
        for f in frames.iterdir():
            if _own_file(f, FRAME_NAME.fullmatch):
                f.unlink()
    for name in ("frames", *SAMPLE_FILES):  # the marker last
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            _rmdir(path)
        elif _own_file(path, lambda _: True):
            path.unlink()
    _rmdir(folder)


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        log.warning("left %s: it holds files tsd-infer did not write", folder)
