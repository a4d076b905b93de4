"""Inputs a tsd-app test uploads: a small photo, a second of speech-like sound, a file that is no image."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A 220 Hz tone, its loudness swinging three times a second, as 16-bit mono wav."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def make_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """``face.png`` (80x96 gradients), ``speech.wav`` (1 s) and ``broken.png`` (text bytes) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:96, 0:80]
    photo = np.stack([(xx * 3) % 256, (yy * 2) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(photo).save(folder / "face.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder / "face.png", write_wav(folder / "speech.wav"), folder / "broken.png"
