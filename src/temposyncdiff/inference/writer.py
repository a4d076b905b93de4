"""Writes a generation's outputs atomically: frames/%05d.png, sample.mp4 (H.264 + AAC) and summary.json."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from temposyncdiff.data.video import write_video
from temposyncdiff.utils.io import write_json


def write_sample(
    out_dir: str | os.PathLike,
    frames: Iterable[np.ndarray],
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    save_frames: bool = True,
    summary: Callable[[], dict] | None = None,
) -> Path:
    """Build everything in a hidden sibling folder, then swap it in: a crash never leaves half a sample.

    ``summary`` is called after the last frame (so it can report timings) and saved as summary.json.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "frames").mkdir(parents=True) if save_frames else tmp.mkdir(parents=True)

    def saved(stream: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for i, frame in enumerate(stream):
            if save_frames:
                Image.fromarray(frame).save(tmp / "frames" / f"{i:05d}.png")
            yield frame

    try:
        write_video(tmp / "sample.mp4", saved(frames), fps, audio, sample_rate)
        write_json(tmp / "summary.json", summary() if summary else {})
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
