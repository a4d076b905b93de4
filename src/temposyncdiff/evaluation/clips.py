"""The held-out utterances both protocols score: frames, audio, visemes and a reference from another utterance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.cache import load_visemes, resize_frames
from temposyncdiff.data.manifest import read_manifest
from temposyncdiff.data.video import read_frames
from temposyncdiff.data.visemes import SILENCE
from temposyncdiff.errors import UserError


@dataclass
class Clip:
    """One held-out utterance: ground-truth frames (uint8 ``[N,H,W,3]``), its 16 kHz audio, visemes, reference image."""

    id: str
    frames: np.ndarray
    wave: np.ndarray
    visemes: np.ndarray
    reference: np.ndarray
    reference_from: str
    video: str  # the utterance's file
    talk: str = ""  # the manifest's talk_id (per_talk scores group by it)
    _sized: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def at(self, size: int) -> np.ndarray:
        """The frames as ``[N,size,size,3]`` uint8 (centre-cropped and resized as the cache does)."""
        if size not in self._sized:
            self._sized[size] = resize_frames(self.frames, size).transpose(0, 2, 3, 1)
        return self._sized[size]


def load_clips(
    manifest: str | Path,
    max_utterances: int | None,
    max_frames: int | None = None,
    reference_frame: int = 0,
    fps: float = 25.0,
    sample_rate: int = 16000,
) -> list[Clip]:
    """Evenly spaced utterances of a manifest split, each with its reference image (see the module docstring)."""
    rows = sorted(read_manifest(manifest), key=lambda r: r["id"])
    if not rows:
        raise UserError(f"{manifest}: no utterances to evaluate")
    count = len(rows) if max_utterances is None else min(len(rows), max_utterances)
    clips = []
    for i in sorted(set(np.linspace(0, len(rows) - 1, count).round().astype(int).tolist())):
        row = rows[i]
        frames, _ = read_frames(row["video_mp4"], fps)
        visemes, _ = load_visemes(row["viseme_npy"], len(frames))
        n = min(len(frames), max_frames or len(frames))
        wave = load_audio(row["video_mp4"], sample_rate, int(round(n * sample_rate / fps)))
        talk = [r for r in rows if r["talk_id"] == row["talk_id"]]
        other = talk[(talk.index(row) + 1) % len(talk)]
        if other is row:
            reference, source = frames[0], f"{row['id']}#0 (no other utterance of the talk)"
        else:
            ref_frames, _ = read_frames(other["video_mp4"], fps)
            k = min(reference_frame, len(ref_frames) - 1)
            reference, source = ref_frames[k], f"{other['id']}#{k}"
        clips.append(
            Clip(row["id"], frames[:n], wave, visemes[:n], reference, source, row["video_mp4"], row["talk_id"])
        )
    return clips


def swapped_inputs(clips: list[Clip], i: int) -> tuple[np.ndarray, np.ndarray]:
    """The next clip's audio and visemes, cut or padded (silence) to clip ``i``'s length."""
    own, other = clips[i], clips[(i + 1) % len(clips)]
    wave = np.zeros_like(own.wave)
    wave[: min(len(wave), len(other.wave))] = other.wave[: len(wave)]
    visemes = np.full_like(own.visemes, SILENCE)
    visemes[: min(len(visemes), len(other.visemes))] = other.visemes[: len(visemes)]
    return wave, visemes
