"""The one video reader and the one writer (PyAV): probe, decode to constant fps, encode H.264 + AAC."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_path


class MediaError(UserError, ValueError):
    """A media file is missing, unreadable or lacks a required stream."""


@dataclass
class VideoInfo:
    """What a probe finds in a media file."""

    num_frames: int
    fps: float
    duration_s: float
    width: int  # as displayed: a rotated stream (phone videos) is turned upright
    height: int
    audio_sample_rate: int | None  # None when there is no audio track
    audio_channels: int | None
    video_codec: str
    audio_codec: str | None
    rotation: int = 0  # degrees counter-clockwise the stored frames are turned to display them (0, 90, 180, 270)


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that show a decoded frame upright (its display matrix; phones record one)."""
    return round(frame.rotation / 90) % 4


def upright(image: np.ndarray, turns: int) -> np.ndarray:
    """``image`` (``[H,W,...]``) turned ``turns`` quarter turns counter-clockwise."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(f"{path}: unreadable media ({err.__class__.__name__}: {err})") from err


def _codec(stream: av.stream.Stream, path: str | os.PathLike) -> av.CodecContext:
    """A stream's codec context; a ``MediaError`` when PyAV has no decoder for it (unknown or corrupt codec)."""
    if stream.codec_context is None:
        raise MediaError(f"{path}: unsupported or corrupt {stream.type} stream (no decoder for its codec)")
    return stream.codec_context


def probe(path: str | os.PathLike, count_frames: bool = True) -> VideoInfo:
    """Probe a video file; counts frames by demuxing packets when asked (exact, no decoding)."""
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        vs = container.streams.video[0]
        aus = container.streams.audio[0] if container.streams.audio else None
        video, audio = _codec(vs, path), _codec(aus, path) if aus else None
        fps = float(vs.average_rate or vs.guessed_rate or 0)
        duration = float(vs.duration * vs.time_base) if vs.duration else float(container.duration or 0) / av.time_base
        num = vs.frames
        if count_frames or not num:
            try:
                num = sum(1 for p in container.demux(vs) if p.size > 0)
            except av.error.FFmpegError as err:
                raise MediaError(f"{path}: corrupt video stream ({err})") from err
        if num <= 0:
            raise MediaError(f"{path}: video stream has no frames")
        if fps <= 0:
            fps = num / duration if duration > 0 else 0.0
        turns = _first_frame_turns(container, vs)
        width, height = (video.height, video.width) if turns % 2 else (video.width, video.height)
        return VideoInfo(
            num_frames=int(num),
            fps=round(fps, 4),
            duration_s=round(duration or num / fps, 4),
            width=width,
            height=height,
            audio_sample_rate=audio.sample_rate if audio else None,
            audio_channels=audio.channels if audio else None,
            video_codec=video.name,
            audio_codec=audio.name if audio else None,
            rotation=90 * turns,
        )


def _first_frame_turns(container: av.container.InputContainer, stream: av.stream.Stream) -> int:
    """The display rotation of the stream's first frame, in quarter turns, decoded after rewinding the open
    container (0 when it does not rewind or decode)."""
    with contextlib.suppress(av.error.FFmpegError, StopIteration):
        container.seek(0)
        return _quarter_turns(next(container.decode(stream)))
    return 0


class VideoFrames:
    """Iterate a file's video frames in presentation order as ``(seconds, av.VideoFrame)``, one at a time.

    A corrupt packet after the first frame ends the stream quietly (what was decoded counts), so two passes
    over one file see the same frames. ``rate`` is the stream's average frame rate (0 when unknown), set once
    iteration starts; ``rgb``/``gray`` convert a frame with one reused converter (~10x faster than to_ndarray),
    upright (a display rotation is applied; ``size`` is the upright size).
    ``start`` (a timestamp as iteration gives them): decoding begins at the keyframe at or before it; a stream
    whose frames carry no timestamps then raises MediaError.
    """

    def __init__(self, path: str | os.PathLike, start: float = 0.0) -> None:
        self.path = path
        self.start = start
        self.rate = 0.0
        self._convert = VideoReformatter()

    def __iter__(self) -> Iterator[tuple[float, av.VideoFrame]]:
        with _open(self.path) as container:
            if not container.streams.video:
                raise MediaError(f"{self.path}: no video stream")
            vs = container.streams.video[0]
            _codec(vs, self.path)
            vs.thread_type = "AUTO"
            self.rate = float(vs.average_rate or 0)
            if self.start > 0:
                container.seek(round(self.start / vs.time_base), stream=vs)
            n = 0
            try:
                for frame in container.decode(vs):
                    if frame.pts is not None:
                        t = float(frame.pts * vs.time_base)
                    elif self.start > 0:
                        raise MediaError(f"{self.path}: its frames carry no timestamps, so it cannot be seeked")
                    else:
                        t = n / self.rate if self.rate else float(n)
                    yield t, frame
                    n += 1
            except av.error.FFmpegError as err:
                if not n:
                    raise MediaError(f"{self.path}: corrupt video stream ({err})") from err
            if not n:
                raise MediaError(f"{self.path}: video stream has no frames")

    def rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """``[H,W,3]`` uint8 RGB, upright."""
        return upright(self._convert.reformat(frame, format="rgb24").to_ndarray(), _quarter_turns(frame))

    def gray(self, frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
        """``[height,width]`` uint8 luma, upright, scaled by swscale (cheap: no full-size RGB copy)."""
        turns = _quarter_turns(frame)
        w, h = (height, width) if turns % 2 else (width, height)
        return upright(self._convert.reformat(frame, width=w, height=h, format="gray").to_ndarray(), turns)

    @staticmethod
    def size(frame: av.VideoFrame) -> tuple[int, int]:
        """``(width, height)`` of the frame upright."""
        return (frame.height, frame.width) if _quarter_turns(frame) % 2 else (frame.width, frame.height)


def resample_index(times: Sequence[float], rate: float, fps: float | None) -> tuple[np.ndarray | None, float]:
    """The decoded frame each output frame shows at constant ``fps``, and the output rate (None: all, as decoded).

    Resampling picks, for each output time k/fps, the last decoded frame whose timestamp is <= it,
    so variable-frame-rate input becomes constant-rate output of the same duration. ``rate`` is the
    stream's average rate (0: estimated from the timestamps).
    """
    src_fps = rate or len(times) / max(times[-1] - times[0], 1e-6)
    if fps is None or abs(fps - src_fps) < 1e-3 and _is_regular(times, src_fps):
        return None, (fps or src_fps)
    t = np.asarray(times) - times[0]
    duration = t[-1] + 1.0 / src_fps
    n_out = max(1, int(round(duration * fps)))
    idx = np.searchsorted(t, np.arange(n_out) / fps + 1e-6, side="right") - 1
    return np.clip(idx, 0, len(t) - 1), fps


def _is_regular(times: Sequence[float], fps: float) -> bool:
    return len(times) < 2 or float(np.max(np.abs(np.diff(times) - 1.0 / fps))) < 0.25 / fps


def read_frames(path: str | os.PathLike, fps: float | None = None) -> tuple[np.ndarray, float]:
    """Decode all frames as uint8 ``[N,H,W,3]`` RGB; with ``fps``, resample by timestamp to constant rate.

    Holds the whole video in memory: for short clips (a long video streams through ``VideoFrames``).
    """
    reader = VideoFrames(path)
    frames, times = [], []
    for t, frame in reader:
        frames.append(reader.rgb(frame))
        times.append(t)
    index, rate = resample_index(times, reader.rate, fps)
    video = np.stack(frames)
    return (video if index is None else video[index]), rate


def read_audio_track(path: str | os.PathLike, mono: bool = False) -> tuple[np.ndarray, int]:
    """Decode the first audio stream as float32 ``[C, S]`` at its own rate (resampling is audio.py's job).

    ``mono`` averages the channels of each decoded block (``[1, S]``: a long stereo track never held whole).
    """
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        _codec(stream, path)
        chunks = []
        try:
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                if arr.dtype.kind in "iu":
                    arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
                if not frame.format.is_planar:  # packed: [1, S*C] interleaved
                    arr = arr.reshape(-1, len(frame.layout.channels)).T
                arr = arr.astype(np.float32)
                chunks.append(arr.mean(axis=0, keepdims=True) if mono else arr)
        except av.error.FFmpegError as err:
            if not chunks:
                raise MediaError(f"{path}: corrupt audio stream ({err})") from err
        rate = stream.codec_context.sample_rate
    if not chunks:
        raise MediaError(f"{path}: audio stream has no samples")
    return np.concatenate(chunks, axis=1), rate


DETERMINISTIC = {"threads": "1", "x264-params": "mbtree=0"}  # x264 settings of write_video(deterministic=True)


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float = 25.0,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 18,
    audio_bitrate: int = 64000,
    deterministic: bool = False,
) -> Path:
    """Encode uint8 RGB frames (iterable, so long videos stream) as H.264 yuv420p + AAC mono, atomically.

    The audio is trimmed or zero-padded to the video's duration so both streams end together.
    ``deterministic``: the same frames give the same bytes in any process: one x264 thread and
    no macroblock tree (x264's mbtree rate control gave different frames for the same input from one call to the
    next in a process, even on one thread; measured: 4 different outputs in 25 calls, 1 without it).
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as out:
        vs = out.add_stream(
            "libx264",
            rate=rate,
            options={"crf": str(crf), "preset": "veryfast", "threads": "0"} | (DETERMINISTIC if deterministic else {}),
        )
        vs.pix_fmt = "yuv420p"
        aus = None
        if audio is not None:
            aus = out.add_stream("aac", rate=sample_rate, layout="mono")
            aus.bit_rate = audio_bitrate
        n = 0
        for frame in frames:
            if n == 0:
                vs.height, vs.width = frame.shape[:2]
                if vs.height % 2 or vs.width % 2:
                    raise ValueError(f"{path}: frame size {frame.shape[1]}x{frame.shape[0]} must be even for yuv420p")
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            n += 1
        if n == 0:
            raise ValueError(f"{path}: no frames to write")
        out.mux(vs.encode())
        if aus is not None:
            _encode_audio(out, aus, audio, sample_rate, int(round(n / fps * sample_rate)))
    return path


def write_side_by_side(
    path: str | os.PathLike,
    videos: list[np.ndarray],
    audio: np.ndarray | None = None,
    fps: float = 25.0,
    sample_rate: int = 16000,
) -> Path:
    """uint8 ``[N,H,W,3]`` videos side by side in one mp4 (cut to the shortest), with ``audio`` when given."""
    n = min(len(v) for v in videos)
    return write_video(
        path, (np.concatenate([v[k] for v in videos], axis=1) for k in range(n)), fps, audio, sample_rate
    )


def _encode_audio(out, stream, audio: np.ndarray, sample_rate: int, num_samples: int) -> None:
    mono = np.asarray(audio, dtype=np.float32).reshape(-1)[:num_samples]
    mono = np.pad(mono, (0, num_samples - len(mono)))
    block = 1024
    for start in range(0, num_samples, block):
        chunk = np.clip(mono[start : start + block], -1, 1)[None, :]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        out.mux(stream.encode(frame))
    out.mux(stream.encode())
