"""Own videos -> LRS3 layout: constant fps, 16 kHz mono audio, face-tracked square crops, utterance split.

Each source video becomes ``<out_root>/<talk_id>/<NNNNN>.mp4`` (talk_id = sanitised file stem). A talk is
written into a hidden temporary folder and renamed when complete, so a rerun skips finished talks and
redoes interrupted ones. A video without an audio track takes its sound from a sidecar file of the same
stem (``<stem>.wav``, ``.flac``, ...) when there is one. Bad inputs (not a video, unreadable, no audio, no face)
are skipped with a one-line reason; when none is prepared that is an error. Frames stream through two decoding
passes (face track, then crops), so memory does not grow with a video's length (only its 16 kHz audio is held whole: 3.8 MB a minute).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import av
import numpy as np

from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.faces import Box, FaceDetector, crop_resize, square_crop_box
from temposyncdiff.data.video import MediaError, VideoFrames, probe, resample_index, write_video
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import write_json

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
AUDIO_EXTS = (".wav", ".flac", ".m4a", ".mp3", ".aac", ".ogg", ".opus")  # a sidecar track: <video stem><ext>
META_NAME = "prepare_meta.json"


class PrepareError(UserError, ValueError):
    """A video that cannot be prepared (the message is the reason), or inputs of which none could be."""


def find_videos(inputs: str | os.PathLike | Iterable[str | os.PathLike], exclude: Path | None = None) -> list[Path]:
    """A folder's video files (recursive, sorted, none under ``exclude``) or the given list of files.

    A single path that does not exist, a folder without video files and an empty list are a ``PrepareError``.
    """
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if not path.is_dir():
            if not path.exists():
                raise PrepareError(f"inputs={path}: no such file or folder")
            return [path]
        found = (p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
        skip = exclude.resolve() if exclude else None
        videos = sorted(p for p in found if not (skip and p.resolve().is_relative_to(skip)))
        if not videos:
            raise PrepareError(f"inputs={path}: no video files ({' '.join(VIDEO_EXTS)}) in this folder")
        return videos
    videos = [Path(p) for p in inputs]
    if not videos:
        raise PrepareError("inputs=[]: no videos given")
    return videos


def sidecar_audio(video: Path) -> Path | None:
    """The audio file recorded beside a video without an audio track (same folder and stem), if there is one."""
    return next((p for ext in AUDIO_EXTS if (p := video.with_suffix(ext)).is_file()), None)


def talk_id_for(path: Path) -> str:
    """File stem reduced to ``[A-Za-z0-9_-]``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_") or "video"


def scan_faces(
    reader: VideoFrames,
    detector: FaceDetector,
    every_s: float,
    min_face_ratio: float = 0.5,
    expected: int | None = None,
    misses: list[float] | None = None,
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Pass 1: every frame's timestamp, and face boxes ``[K,4]`` at their times ``[K]`` (frames kept: none).

    The detector runs on the first frame at or after every ``every_s`` seconds and on the last frame, on a
    downscaled luma copy. With ``expected`` (the number of such samples the probe predicts) it stops as soon
    as too many misses make ``min_face_ratio`` unreachable. ``misses`` gets the times of samples without a face.
    """
    times: list[float] = []
    found: list[tuple[float, Box]] = []
    missed, due, last = 0, 0.0, None

    def detect(t: float, frame: av.VideoFrame) -> None:
        nonlocal missed
        width, height = reader.size(frame)
        scale = detector.scale_for(width, height)
        gray = reader.gray(frame, max(1, round(width * scale)), max(1, round(height * scale)))
        box = detector.detect_gray(gray, scale)
        if box is not None:
            found.append((t, box))
            return
        if misses is not None:
            misses.append(t)
        if (missed := missed + 1) > (1 - min_face_ratio) * (expected or math.inf):
            raise PrepareError(_face_reason(len(found), missed, min_face_ratio))

    for t, frame in reader:
        times.append(t)
        last = None
        if t - times[0] >= due - 1e-6:
            detect(t, frame)
            due = (math.floor((t - times[0]) / every_s + 1e-6) + 1) * every_s
        else:
            last = frame
    if last is not None:
        detect(times[-1], last)
    if len(found) < max(1, min_face_ratio * (len(found) + missed)):
        raise PrepareError(_face_reason(len(found), missed, min_face_ratio))
    return times, np.array([t for t, _ in found]), np.array([box for _, box in found], dtype=np.float64)


def _face_reason(found: int, missed: int, min_face_ratio: float) -> str:
    if not found:
        return f"no face found ({missed} sampled frames checked)"
    return f"face found in only {found} of {found + missed} sampled frames checked (min_face_ratio={min_face_ratio})"


def face_track(times: np.ndarray, at: np.ndarray, boxes: np.ndarray, smooth_window: int = 9) -> np.ndarray:
    """Face box per output frame ``[N,4]`` (frame times ``[N]``): boxes found at times ``at``, interpolated, smoothed."""
    track = np.stack([np.interp(times, at, boxes[:, k]) for k in range(4)], axis=1)
    if smooth_window > 1:
        half = smooth_window // 2
        padded = np.pad(track, ((half, smooth_window - 1 - half), (0, 0)), mode="edge")
        kernel = np.full(smooth_window, 1.0 / smooth_window)
        track = np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(4)], axis=1)
    return track


def output_rate_track(
    reader: VideoFrames,
    detector: FaceDetector,
    fps: float,
    detect_every: int = 5,
    smooth_window: int = 9,
    min_face_ratio: float = 0.5,
    expected: int | None = None,
    misses: list[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 at the models' rate (``scan_faces``, then ``resample_index`` and ``face_track``): every decoded frame's
    time ``[M]``, the decoded frame each ``fps``-rate frame shows ``[N]``, the detection times ``[K]`` and the
    smoothed face box of each ``fps``-rate frame ``[N,4]``."""
    times, at, boxes = scan_faces(reader, detector, max(1, detect_every) / fps, min_face_ratio, expected, misses)
    index, _ = resample_index(times, reader.rate, fps)
    times = np.asarray(times)
    index = np.arange(len(times)) if index is None else index
    return times, index, at, face_track(times[index], at, boxes, smooth_window)


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


@dataclass(frozen=True)
class PrepareSettings:
    """How footage is cut into a corpus: square face crops of ``image_size`` px at ``fps``, audio at
    ``sample_rate``, utterances of ``min_utterance_s`` to ``max_utterance_s`` (None: whole videos) cut at quiet
    points, the face detector on every ``detect_every``-th frame, boxes smoothed over ``smooth_window`` detections
    and widened by ``margin``; a video whose frames show a face less than ``min_face_ratio`` of the time is skipped."""

    image_size: int = 128
    fps: float = 25.0
    sample_rate: int = 16000
    max_utterance_s: float | None = 8.0
    min_utterance_s: float = 1.0
    detect_every: int = 5
    smooth_window: int = 9
    margin: float = 0.5
    min_face_ratio: float = 0.5


def prepare_video(
    path: Path, talk_dir: Path, detector: FaceDetector, settings: PrepareSettings = PrepareSettings()
) -> int:
    """Prepare one video into ``talk_dir`` (written whole or not at all); returns the utterance count.

    Two decoding passes keep memory flat in the video's length: the first finds the face track, the
    second crops each frame and streams it into its utterance's writer. Only the audio is held whole.
    """
    s = settings
    image_size, fps, sample_rate, margin = s.image_size, s.fps, s.sample_rate, s.margin
    info = probe(path, count_frames=False)
    if info.num_frames <= 1:
        raise PrepareError("not a video (a single image)")
    sound = path if info.audio_sample_rate is not None else sidecar_audio(path)
    if sound is None:
        raise PrepareError(f"no audio track (nor a sidecar audio file {path.stem}{{{','.join(AUDIO_EXTS)}}})")
    every_s = max(1, s.detect_every) / fps
    expected = math.floor(info.duration_s / every_s) + 2 if info.duration_s > 0 else None
    reader = VideoFrames(path)
    times, index, _, track = output_rate_track(
        reader, detector, fps, s.detect_every, s.smooth_window, s.min_face_ratio, expected
    )
    n = len(index)
    audio = load_audio(sound, sample_rate, num_samples=round(n / fps * sample_rate))
    ranges = split_utterances(audio, sample_rate, fps, n, s.max_utterance_s, s.min_utterance_s)
    if not ranges:
        raise PrepareError(f"shorter than min_utterance_s={s.min_utterance_s} ({n / fps:.2f} s)")

    def crops() -> Iterator[np.ndarray]:  # pass 2: output frames in order, each source frame converted once
        repeats, k = np.bincount(index, minlength=len(times)), 0
        for i, (_, frame) in enumerate(reader):
            if i < len(repeats) and repeats[i]:
                rgb = reader.rgb(frame)
                for _ in range(repeats[i]):
                    yield crop_resize(rgb, square_crop_box(track[k], rgb.shape[1], rgb.shape[0], margin), image_size)
                    k += 1
        raise PrepareError(f"the video changed while being prepared ({k} of {n} frames decoded again)")

    partial = talk_dir.with_name(f".{talk_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    stream, done = crops(), 0
    try:
        for k, (a, b) in enumerate(ranges, start=1):
            clip = audio[round(a * sample_rate / fps) : round(b * sample_rate / fps)]
            write_video(partial / f"{k:05d}.mp4", islice(stream, a - done, b - done), fps, clip, sample_rate)
            done = b
        os.replace(partial, talk_dir)
    finally:
        stream.close()
        shutil.rmtree(partial, ignore_errors=True)
    return len(ranges)


def prepare_videos(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_root: str | os.PathLike,
    settings: PrepareSettings = PrepareSettings(),
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare a folder or list of videos into LRS3 layout under ``out_root``; writes ``prepare_meta.json``.

    Returns ``{"videos", "utterances", "existing", "skipped": [{"path", "reason"}]}``; ``videos`` and
    ``utterances`` count every talk in the output, ``existing`` the talks a previous run had finished.
    Skipped inputs are summed up in one last line; when no input is prepared (or done before), that line
    is a ``PrepareError`` instead, and neither the report nor a folder this run made is left behind.
    """
    if settings.image_size % 2:
        raise PrepareError(f"image_size={settings.image_size}: must be even (H.264 yuv420p)")
    out_root = Path(out_root)
    detector = FaceDetector()
    result: dict = {"videos": 0, "utterances": 0, "existing": 0, "skipped": []}
    talks: dict[str, str] = {}
    paths = find_videos(inputs, exclude=out_root)
    made = [p for p in (out_root, *out_root.parents) if not p.exists()]  # the folders this run may create
    start = time.time()
    for path in paths:
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
                count = prepare_video(path, talk_dir, detector, settings)
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
    skipped = result["skipped"]
    listed = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
    summary = f"skipped {len(skipped)} of {len(paths)} inputs: {listed}" + (
        f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    )
    if not result["videos"]:  # leave no report and no folder of this run behind
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise PrepareError(f"nothing prepared: {summary}")
    meta = {**result, "out_root": str(out_root), "talks": talks, "settings": asdict(settings)}
    write_json(out_root / META_NAME, {**meta, "elapsed_s": round(time.time() - start, 2)})
    if skipped:
        log(summary)
    return result
