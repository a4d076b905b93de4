"""Own videos -> LRS3 layout: constant fps, 16 kHz mono audio, face-tracked square crops, utterance split.

Each source video becomes ``<out_root>/<talk_id>/<NNNNN>.mp4`` (talk_id = sanitised file stem). A talk is
written into a hidden temporary folder and renamed when complete, so a rerun skips finished talks and
redoes interrupted ones. Bad videos (unreadable, no audio, no face) are skipped with a one-line reason.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box
from temposyncdiff.data.video import MediaError, probe, read_frames, write_video
from temposyncdiff.utils.io import write_json

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
META_NAME = "prepare_meta.json"


class PrepareError(ValueError):
    """A video that cannot be prepared; the message is the reason."""


def find_videos(inputs: str | os.PathLike | Iterable[str | os.PathLike], exclude: Path | None = None) -> list[Path]:
    """A folder's video files (recursive, sorted, none under ``exclude``) or the given list of files."""
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        found = (p for p in Path(inputs).rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
        skip = exclude.resolve() if exclude else None
        return sorted(p for p in found if not (skip and p.resolve().is_relative_to(skip)))
    return [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]


def talk_id_for(path: Path) -> str:
    """File stem reduced to ``[A-Za-z0-9_-]``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_") or "video"


def face_track(
    frames: np.ndarray,
    detector: FaceDetector,
    detect_every: int = 5,
    smooth_window: int = 9,
    min_face_ratio: float = 0.5,
) -> np.ndarray:
    """Face box per frame ``[N,4]``: detect every ``detect_every`` frames, interpolate, moving-average smooth."""
    n = len(frames)
    sampled = sorted({*range(0, n, max(1, detect_every)), n - 1})
    found, missed = [], 0
    for i in sampled:  # stop as soon as too many misses make the ratio unreachable
        box = detector.detect(frames[i])
        if box is not None:
            found.append((i, box))
        elif (missed := missed + 1) > (1 - min_face_ratio) * len(sampled):
            break
    if not found:
        raise PrepareError(f"no face found ({missed} of {len(sampled)} sampled frames checked)")
    if len(found) < min_face_ratio * len(sampled):
        checked = len(found) + missed
        raise PrepareError(
            f"face found in only {len(found)} of {checked} sampled frames checked (min_face_ratio={min_face_ratio})"
        )
    at = np.array([i for i, _ in found])
    boxes = np.array([box for _, box in found], dtype=np.float64)
    track = np.stack([np.interp(np.arange(n), at, boxes[:, k]) for k in range(4)], axis=1)
    if smooth_window > 1:
        half = smooth_window // 2
        padded = np.pad(track, ((half, smooth_window - 1 - half), (0, 0)), mode="edge")
        kernel = np.full(smooth_window, 1.0 / smooth_window)
        track = np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(4)], axis=1)
    return track


def split_utterances(
    audio: np.ndarray, sample_rate: int, fps: float, num_frames: int, max_s: float | None, min_s: float
) -> list[tuple[int, int]]:
    """Frame ranges of at most ``max_s`` seconds, cut at the quietest 40 ms in the last quarter before the limit.

    Ranges shorter than ``min_s`` (the tail) are dropped; ``max_s`` None or 0 keeps the video whole.
    """
    max_f = max(1, int(max_s * fps)) if max_s else num_frames
    search = max(1, max_f // 4)
    half = round(0.02 * sample_rate)
    energy = np.concatenate([[0.0], np.cumsum(np.asarray(audio, dtype=np.float64) ** 2)])

    def loudness(frame: int) -> float:
        centre = round(frame * sample_rate / fps)
        return energy[min(centre + half, len(audio))] - energy[max(centre - half, 0)]

    ranges, start = [], 0
    while num_frames - start > max_f:
        candidates = range(start + max_f - search + 1, start + max_f + 1)
        cut = min(reversed(candidates), key=loudness)  # the quietest; the latest on ties
        ranges.append((start, cut))
        start = cut
    ranges.append((start, num_frames))
    return [(a, b) for a, b in ranges if b - a >= math.ceil(min_s * fps - 1e-6)]


def prepare_video(
    path: Path,
    talk_dir: Path,
    detector: FaceDetector,
    image_size: int = 128,
    fps: float = 25.0,
    sample_rate: int = 16000,
    max_utterance_s: float | None = 8.0,
    min_utterance_s: float = 1.0,
    detect_every: int = 5,
    smooth_window: int = 9,
    margin: float = 0.5,
    min_face_ratio: float = 0.5,
) -> int:
    """Prepare one video into ``talk_dir`` (written whole or not at all); returns the utterance count."""
    if probe(path, count_frames=False).audio_sample_rate is None:
        raise PrepareError("no audio track")
    frames, _ = read_frames(path, fps)
    n = len(frames)
    audio = load_audio(path, sample_rate, num_samples=round(n / fps * sample_rate))
    ranges = split_utterances(audio, sample_rate, fps, n, max_utterance_s, min_utterance_s)
    if not ranges:
        raise PrepareError(f"shorter than min_utterance_s={min_utterance_s} ({n / fps:.2f} s)")
    track = face_track(frames, detector, detect_every, smooth_window, min_face_ratio)
    h, w = frames.shape[1:3]

    def crops(a: int, b: int) -> Iterator[np.ndarray]:
        for i in range(a, b):
            yield crop_resize(frames[i], square_crop_box(track[i], w, h, margin), image_size)

    partial = talk_dir.with_name(f".{talk_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for k, (a, b) in enumerate(ranges, start=1):
            clip = audio[round(a * sample_rate / fps) : round(b * sample_rate / fps)]
            write_video(partial / f"{k:05d}.mp4", crops(a, b), fps, clip, sample_rate)
        os.replace(partial, talk_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return len(ranges)


def prepare_videos(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_root: str | os.PathLike,
    image_size: int = 128,
    fps: float = 25.0,
    sample_rate: int = 16000,
    max_utterance_s: float | None = 8.0,
    min_utterance_s: float = 1.0,
    detect_every: int = 5,
    smooth_window: int = 9,
    margin: float = 0.5,
    min_face_ratio: float = 0.5,
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare a folder or list of videos into LRS3 layout under ``out_root``; writes ``prepare_meta.json``.

    Returns ``{"videos", "utterances", "existing", "skipped": [{"path", "reason"}]}``; ``videos`` and
    ``utterances`` count every talk in the output, ``existing`` the talks a previous run had finished.
    """
    if image_size % 2:
        raise ValueError(f"image_size must be even for H.264 yuv420p, got {image_size}")
    out_root = Path(out_root)
    settings = dict(
        image_size=image_size, fps=fps, sample_rate=sample_rate, max_utterance_s=max_utterance_s,
        min_utterance_s=min_utterance_s, detect_every=detect_every, smooth_window=smooth_window,
        margin=margin, min_face_ratio=min_face_ratio,
    )  # fmt: skip
    detector = FaceDetector()
    result: dict = {"videos": 0, "utterances": 0, "existing": 0, "skipped": []}
    talks: dict[str, str] = {}
    start = time.time()
    for path in find_videos(inputs, exclude=out_root):
        talk_id, k = talk_id_for(path), 1
        while talk_id in talks:  # same stem in another folder
            k += 1
            talk_id = f"{talk_id_for(path)}_{k}"
        talks[talk_id] = str(path)
        talk_dir = out_root / talk_id
        if talk_dir.is_dir():
            count = len(list(talk_dir.glob("*.mp4")))
            result["existing"] += 1
            log(f"{path}: exists, {count} utterances in {talk_dir}")
        else:
            try:
                count = prepare_video(path, talk_dir, detector, **settings)
            except Exception as err:  # a bad file must not end the batch
                known = isinstance(err, (MediaError, PrepareError))
                reason = str(err).removeprefix(f"{path}: ") if known else f"{type(err).__name__}: {err}"
                reason = " ".join(reason.split())
                del talks[talk_id]
                result["skipped"].append({"path": str(path), "reason": reason})
                log(f"{path}: skipped: {reason}")
                continue
            log(f"{path}: {count} utterances -> {talk_dir}")
        result["videos"] += 1
        result["utterances"] += count
    meta = {**result, "out_root": str(out_root), "talks": talks, "settings": settings}
    write_json(out_root / META_NAME, {**meta, "elapsed_s": round(time.time() - start, 2)})
    return result
