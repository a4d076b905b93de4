"""tsd-infer's sample writer: replaces only samples it wrote, never a user's files; cleans up after killed runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from temposyncdiff.errors import UserError
from temposyncdiff.inference.writer import MARKER, check_out_dir, write_sample

FRAMES = [np.full((16, 16, 3), v, np.uint8) for v in (0, 80, 160)]
AUDIO = np.zeros(16000 * 3 // 25, np.float32)
HOST = socket.gethostname()


def _write(out: Path, frames=FRAMES, **kwargs) -> Path:
    return write_sample(out, iter(frames), AUDIO, 16000, 25.0, **kwargs)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sample_is_marked_and_replaced_by_the_next_run(tmp_path):
    out = tmp_path / "samples" / "s"
    _write(out, summary=lambda: {"run": 1})
    assert json.loads((out / MARKER).read_text())["written_by"] == "tsd-infer"
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "frames", "sample.mp4", "summary.json"])
    _write(out, FRAMES[:2], summary=lambda: {"run": 2}, save_frames=True)
    assert json.loads((out / "summary.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00001.png"]
    assert _hidden(out.parent) == []  # no partial or moved-aside folder left
    empty = tmp_path / "samples" / "empty"
    empty.mkdir()
    _write(empty, save_frames=False)  # an empty folder deletes nothing of anyone's
    assert (empty / "sample.mp4").is_file() and not (empty / "frames").exists()


def _user_folder(tmp_path: Path, layout: str) -> Path:
    out = tmp_path / "samples" / "mine"
    if layout in ("sample+file", "sample+frame file", "sample+subfolder"):
        _write(out)
    if layout == "no marker":
        out.mkdir(parents=True)
        (out / "sample.mp4").write_bytes(b"the user's own video")
    elif layout == "sample+file":
        (out / "notes.txt").write_text("mine\n")
    elif layout == "sample+frame file":
        (out / "frames" / "retouched.png").write_bytes(b"mine")
    elif layout == "sample+subfolder":
        (out / "extra").mkdir()
        (out / "extra" / "take2.mp4").write_bytes(b"mine")
    elif layout == "file":
        out.parent.mkdir(parents=True)
        out.write_text("a file, not a folder\n")
    elif layout == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("mine\n")
        out.parent.mkdir(parents=True)
        out.symlink_to(tmp_path / "elsewhere")
    return out


@pytest.mark.parametrize(
    "layout", ["no marker", "sample+file", "sample+frame file", "sample+subfolder", "file", "symlink"]
)
def test_user_files_are_never_replaced(tmp_path, layout):
    out = _user_folder(tmp_path, layout)
    before = _files(tmp_path)
    with pytest.raises(UserError, match="mine") as err:
        _write(out)
    assert "\n" not in str(err.value)
    assert _files(tmp_path) == before  # byte-identical, nothing added or removed
    assert _hidden(out.parent) == []


def test_out_dir_that_is_or_holds_cwd_home_or_a_protected_folder_is_refused(tmp_path, monkeypatch):
    work, home, project = tmp_path / "work", tmp_path / "home", tmp_path / "project"
    for folder in (work, home, project / "data"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out in (".", "", "..", "/", str(work), str(home), str(tmp_path), f"{work}/sub/.."):
        with pytest.raises(UserError, match="out_dir="):
            check_out_dir(out)
    for out in (project, tmp_path):
        with pytest.raises(UserError, match="is or holds"):
            check_out_dir(out, protected=[project])
    assert check_out_dir("outputs/samples/x", protected=[project]) == work / "outputs" / "samples" / "x"


def _marked(folder: Path, **marker) -> Path:
    """A folder as write_sample leaves it when killed: its marker and a frame."""
    (folder / "frames").mkdir(parents=True)
    (folder / "frames" / "00000.png").write_bytes(b"png")
    (folder / MARKER).write_text(json.dumps({"written_by": "tsd-infer", **marker}))
    return folder


def test_killed_runs_leftovers_are_cleaned_by_a_run_of_any_name(tmp_path):
    samples = tmp_path / "samples"
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        _write(samples / "g")  # a newer sample took the name of the one moved aside below
        stale = _marked(samples / f".a.partial-{HOST}-{gone.pid}")
        reused_pid = _marked(samples / f".b.partial-{HOST}-{os.getpid()}")  # a killed run that had this pid
        running = _marked(samples / f".c.partial-{HOST}-{live.pid}")
        other_host = _marked(samples / f".d.partial-elsewhere-{gone.pid}")
        unmarked = samples / f".e.partial-{HOST}-{gone.pid}"
        unmarked.mkdir()
        (unmarked / "keep.txt").write_text("not tsd-infer's\n")
        moved_aside = _marked(samples / f".f.old-{HOST}-{gone.pid}")  # killed between the two renames
        replaced = _marked(samples / f".g.old-{HOST}-{gone.pid}")  # killed before deleting the old sample
        kept = _files(tmp_path)
        _write(samples / "h")
        for path in (stale, reused_pid, moved_aside, replaced):
            assert not path.exists(), path.name
        for path in (running, other_host, unmarked):
            assert path.is_dir(), path.name
        assert (samples / "f" / "frames" / "00000.png").read_bytes() == b"png"  # restored under its name
        for name, data in kept.items():
            if name.startswith(f"samples/{running.name}") or name.startswith(f"samples/{unmarked.name}"):
                assert (tmp_path / name).read_bytes() == data
    finally:
        live.kill()
        live.wait()


KILLED_RUN = """
import sys, time
from pathlib import Path
import numpy as np
from temposyncdiff.inference.writer import write_sample

def frames():
    for i in range(1000):
        if i == 2:
            Path(sys.argv[2]).touch()
            time.sleep(60)
        yield np.zeros((16, 16, 3), np.uint8)

write_sample(sys.argv[1], frames(), np.zeros(16000, np.float32), 16000, 25.0)
"""


def test_sigkilled_run_is_cleaned_up_by_the_next_run(tmp_path):
    samples, ready = tmp_path / "samples", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(samples / "killed"), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the writer did not start"
        assert _hidden(samples) == [f".killed.partial-{HOST}-{proc.pid}"]
        _write(samples / "other")
        assert _hidden(samples) == [f".killed.partial-{HOST}-{proc.pid}"]  # its writer is alive: left alone
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _write(samples / "other")
    assert _hidden(samples) == [] and sorted(p.name for p in samples.iterdir()) == ["other"]


def _interrupted(after: int):
    for i, frame in enumerate(FRAMES):
        if i == after:
            raise KeyboardInterrupt
        yield frame


def test_interrupt_removes_the_partial_folder_and_keeps_the_previous_sample(tmp_path):
    out = tmp_path / "samples" / "s"
    _write(out)
    before = _files(out)
    with pytest.raises(KeyboardInterrupt):
        _write(out, _interrupted(after=2))
    assert _files(out) == before and _hidden(out.parent) == []


def test_files_added_while_generating_are_kept(tmp_path):
    out = tmp_path / "samples" / "s"
    _write(out)

    def frames():
        yield from FRAMES
        (out / "notes.txt").write_text("written during the run\n")

    with pytest.raises(UserError, match="notes.txt"):
        _write(out, frames())
    assert (out / "notes.txt").read_text() == "written during the run\n" and _hidden(out.parent) == []
