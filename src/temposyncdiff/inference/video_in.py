"""Video in: re-voice a talking video with new speech, streaming, at its own resolution (``tsd-infer video=``).

Pass 1 tracks the face as ``data.prepare`` does (dlib on every n-th frame, boxes interpolated and smoothed, framed by
``square_crop_box`` with ``prepare_reference``'s margin and lift), keeping no frames. Pass 2 decodes the frames the
output needs in order, hands the pipeline each window's face crops as its pose source, and pastes every generated
face back into its full frame as it comes out, so memory does not grow with the video's length.

Length: the output lasts as long as the speech. A longer video is cut; a shorter one plays on by ``loop``:
``pingpong`` (forward, backward, forward, ...: motion never jumps, as peers do) or ``hold`` (the last frame stands,
the mouth still moving). A backward leg is decoded in chunks of at most ``buffer_bytes`` after seeking to each.

Frames with no face near them (the detector samples on both sides of the frame missed; where only one missed, the
frame itself is checked) are passed through unchanged. The pipeline still generates them, with the last face crop
(the reference's before any) as their pose, so its windows and motion frames stay those of a face.

With ``lips`` (a ``LipLandmarks``), every pasted frame's lips are read beside the source frame's, in the same face
crop: ``report()["lips_vs_source"]`` scores the re-voiced mouth against the video's own (``follow_scores``). With the
video's own speech that is its truth (a held-out take re-voiced); with other speech, the audio-swap control.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import av
import numpy as np
import torch

from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box
from temposyncdiff.data.prepare import PrepareError, output_rate_track
from temposyncdiff.data.video import MediaError, VideoFrames, VideoInfo, probe
from temposyncdiff.inference.inputs import InputError, Region, blend_mask, even_size, paste_blend, seam_ratio
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings, num_output_frames
from temposyncdiff.metrics.mouth import LipLandmarks, follow_scores, silent_frames

log = logging.getLogger(__name__)

LOOPS = ("pingpong", "hold")
BUFFER_BYTES = 128 << 20  # decoded frames a backward leg (or a whole short video) may hold
SCORE_PX = 256  # lip scoring reads both frames' face crops at this size


@dataclass
class VideoTrack:
    """A video's face track at the models' frame rate (pass 1): one crop box per output-rate frame."""

    path: Path
    width: int
    height: int
    times: np.ndarray  # [M] every decoded frame's timestamp (seconds)
    index: np.ndarray  # [N] the decoded frame each constant-rate frame shows
    boxes: np.ndarray  # [N, 4] int square crop boxes (x0, y0, x1, y1), may reach past the frame
    face: np.ndarray  # [N] int8: 1 a face near, 0 none near, -1 unsure (checked when decoded)
    stats: dict = field(default_factory=dict)

    @property
    def frame_times(self) -> np.ndarray:
        return self.times[self.index]


def check_video(path: str | os.PathLike, min_face_px: int) -> VideoInfo:
    """Refuse a missing, unreadable, video-less, single-image or too small video from its header."""
    info = probe(path, count_frames=False)
    if info.num_frames <= 1:
        raise InputError(f"{path}: a single image, not a video; animate a photo with ref_image= instead of video=")
    if min(info.width, info.height) < min_face_px:
        raise InputError(
            f"{path}: its {info.width}x{info.height} frames are smaller than a face of min_face_px={min_face_px} px"
        )
    return info


def track_video(
    path: str | os.PathLike,
    fps: float = 25.0,
    detect_every: int = 5,
    smooth_window: int = 9,
    margin: float = 0.5,
    lift: float = 0.1,
) -> VideoTrack:
    """Pass 1: the face track of ``path`` at ``fps``, framed like the training crops; an InputError if no face."""
    path = Path(path)
    try:
        detector = FaceDetector()
    except ImportError as err:
        raise InputError(f"video={path}: {err}") from None
    reader, misses = VideoFrames(path), []
    try:
        times, index, at, track = output_rate_track(
            reader, detector, fps, detect_every, smooth_window, 0.0, None, misses
        )
    except PrepareError as err:
        raise InputError(f"{path}: {err}; video mode needs a face to re-voice") from None
    frame_times = times[index]
    info = probe(path, count_frames=False)
    width, height = info.width, info.height
    crop = np.array([square_crop_box(b, width, height, margin, lift) for b in track], dtype=np.int64)
    face = _face_near(frame_times, at, np.asarray(misses))
    sides = crop[:, 2] - crop[:, 0]
    stats = {
        "detect_every": detect_every,
        "smooth_window": smooth_window,
        "detections": len(at) + len(misses),
        "faces_found": len(at),
        "frames_face": int((face == 1).sum()),
        "frames_no_face": int((face == 0).sum()),
        "frames_checked_when_decoded": int((face == -1).sum()),
        "crop_side_px": {"min": int(sides.min()), "median": int(np.median(sides)), "max": int(sides.max())},
        "first_face_s": round(float(at[0] - times[0]), 3),
    }
    found = f"a face in {len(at)} of {len(at) + len(misses)} sampled frames"
    log.info("%s: %dx%d, %d frames (%d at %g fps); %s", path, width, height, len(times), len(index), fps, found)
    return VideoTrack(path, width, height, times, index, crop, face, stats)


def _face_near(frame_times: np.ndarray, found: np.ndarray, missed: np.ndarray) -> np.ndarray:
    """Per frame: 1 when the detector samples on both sides of it found a face, 0 when both missed, else -1."""
    samples = np.concatenate([found, missed])
    hit = np.concatenate([np.ones(len(found), np.int8), np.zeros(len(missed), np.int8)])
    order = np.argsort(samples, kind="stable")
    samples, hit = samples[order], hit[order]
    last = len(samples) - 1
    before = np.clip(np.searchsorted(samples, frame_times + 1e-6, side="right") - 1, 0, last)
    after = np.clip(np.searchsorted(samples, frame_times - 1e-6, side="left"), 0, last)
    return np.where(hit[before] == hit[after], hit[before], -1).astype(np.int8)


def source_plan(frames: int, total: int, loop: str = "pingpong") -> np.ndarray:
    """The constant-rate video frame each of ``total`` output frames shows: the first ``total`` of ``frames``, then
    (a shorter video) ``pingpong`` (backward to the second, forward again, ...) or ``hold`` (the last frame)."""
    k = np.arange(total)
    if total <= frames or frames == 1 or loop == "hold":
        return np.minimum(k, frames - 1)
    m = k % (2 * (frames - 1))
    return np.where(m < frames, m, 2 * (frames - 1) - m)


class VideoSource:
    """Decodes a tracked video's constant-rate frames in the order a plan asks, holding at most ``buffer_bytes``."""

    def __init__(self, track: VideoTrack, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.track, self.buffer_bytes = track, buffer_bytes

    def play(self, plan: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(j, rgb)`` for each entry ``j`` of ``plan``: forward stretches stream, backward ones come in chunks."""
        n, frame_bytes = len(self.track.index), self.track.width * self.track.height * 3
        if n * frame_bytes <= self.buffer_bytes:  # a short clip: decoded once, replayed from memory
            frames = [rgb for _, rgb in self.decoded(0, n)]
            yield from ((int(j), frames[j]) for j in plan)
            return
        chunk = max(1, self.buffer_bytes // frame_bytes)
        down = np.concatenate([[False], np.diff(plan) < 0])  # each entry: lower than the one before it
        edges = np.flatnonzero(np.diff(down.astype(np.int8))) + 1
        for run, backward in zip(np.split(plan, edges), down[np.r_[0, edges]], strict=True):
            if backward:
                for top in range(int(run[0]), int(run[-1]) - 1, -chunk):
                    yield from reversed(list(self.decoded(max(top - chunk + 1, int(run[-1])), top + 1)))
                continue
            frames = self.decoded(int(run[0]), int(run[-1]) + 1)
            j, rgb = next(frames)
            for want in run:
                while j < want:
                    j, rgb = next(frames)
                yield j, rgb
            frames.close()

    def decoded(self, a: int, b: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(j, rgb)`` for the constant-rate frames ``a <= j < b`` in order, decoding from the keyframe before ``a``."""
        times, index = self.track.times, self.track.index
        first = int(index[a])
        reader, frames, head = self._seek(float(times[first]) if first else 0.0)
        j = a
        try:
            for t, frame in chain([head], frames):
                i = int(np.searchsorted(times, t - 1e-6))  # its place in pass 1's frames
                if index[j] > i:
                    continue
                rgb = reader.rgb(frame)
                while j < b and index[j] <= i:
                    yield j, rgb
                    j += 1
                if j == b:
                    return
        finally:
            frames.close()
        raise InputError(f"{self.track.path}: the video changed while being read ({j - a} of {b - a} frames found)")

    def _seek(self, start: float) -> tuple[VideoFrames, Iterator, tuple[float, av.VideoFrame]]:
        """Frames from the keyframe at or before ``start`` and the first of them; from the beginning when the
        container cannot seek there (no timestamps, a seek that fails or lands past ``start``)."""
        if start > 0:
            reader = VideoFrames(self.track.path, start=start)
            frames = iter(reader)
            try:
                head = next(frames)
                if head[0] <= start + 1e-6:
                    return reader, frames, head
            except (MediaError, av.error.FFmpegError, StopIteration):
                pass
            frames.close()
        reader = VideoFrames(self.track.path)
        frames = iter(reader)
        return reader, frames, next(frames)


@dataclass
class _Frame:
    source: int  # the constant-rate video frame shown
    rgb: np.ndarray  # that frame, uint8 [H, W, 3]
    crop: np.ndarray  # the pose crop given to the pipeline
    face: bool  # pasted (True) or passed through


class VideoRevoicer:
    """Re-voices a tracked video with a pipeline: the video's face crops are its pose source, window by window,
    and each generated face is pasted back into its full frame (``region`` plus a ``feather``; ``blend_mask``)."""

    def __init__(
        self,
        pipe: TalkingHeadPipeline,
        track: VideoTrack,
        ref_crop: np.ndarray,
        region: Region | None = None,
        feather: float = 0.1,
        loop: str = "pingpong",
        buffer_bytes: int = BUFFER_BYTES,
        lips: LipLandmarks | None = None,
    ) -> None:
        if loop not in LOOPS:
            raise ValueError(f"loop={loop!r}: choose {' | '.join(LOOPS)}")
        self.pipe, self.track, self.ref_crop = pipe, track, ref_crop
        self.region, self.feather, self.loop, self.lips = region, feather, loop, lips
        self._openings: list[np.ndarray] = []  # per output frame: (source, re-voiced) lip opening, NaN: not scored
        self._wave: np.ndarray | None = None
        self._score_s = 0.0
        self.source = VideoSource(track, buffer_bytes)
        self._detector: FaceDetector | None = None
        self.counts = {"frames": 0, "pasted": 0, "passed_through": 0}
        self._seams: list[float] = []

    def frames(
        self,
        ref_latent: torch.Tensor,
        wave: np.ndarray,
        visemes: np.ndarray | None = None,
        timings: Timings | None = None,
    ) -> Iterator[np.ndarray]:
        """Full-resolution uint8 frames (padded to even sides), as many as the speech lasts at the models' rate."""
        timings = timings or Timings()
        self._wave = wave
        total = num_output_frames(len(wave), self.pipe.audio.sample_rate, self.pipe.audio.fps)
        source = self.source.play(source_plan(len(self.track.index), total, self.loop))
        buffer: dict[int, _Frame] = {}  # output frame -> its source; the frames of at most two windows
        held = self.ref_crop  # the pose of frames without a face: the last face crop

        def pull(k: int) -> None:  # decode output frames up to k
            nonlocal held
            t0 = time.perf_counter()
            for i in range(len(buffer) and max(buffer) + 1, k + 1):
                j, rgb = next(source)
                face = self._has_face(j, rgb)
                if face:
                    held = crop_resize(rgb, self.track.boxes[j], self.pipe.image_size)
                buffer[i] = _Frame(j, rgb, held, face)
            timings.add("video_decode", t0)

        def pose(start: int, stop: int) -> np.ndarray:
            decoding = timings.seconds["video_decode"]
            pull(min(stop, total) - 1)
            # the pipeline times this call as "pose_encoder": the decoding in it is reported as video_decode
            timings.seconds["pose_encoder"] -= timings.seconds["video_decode"] - decoding
            return np.stack([buffer[k].crop for k in range(start, min(stop, total))])

        try:
            for k, generated in enumerate(self.pipe.frames(ref_latent, wave, visemes, timings, pose=pose)):
                pull(k)
                t0 = time.perf_counter()
                item = buffer[k]
                out = self._paste(item, generated) if item.face else item.rgb
                for old in [i for i in buffer if i <= k - self.pipe.window]:  # later windows start after these
                    del buffer[old]
                self.counts["frames"] += 1
                self.counts["pasted" if item.face else "passed_through"] += 1
                timings.add("paste_back", t0)
                if self.lips is not None:  # timed apart from the video's making (timings)
                    t0 = time.perf_counter()
                    self._score(item, out)
                    self._score_s += time.perf_counter() - t0
                yield even_size(out)
        finally:
            source.close()

    def _has_face(self, j: int, rgb: np.ndarray) -> bool:
        if self.track.face[j] < 0:  # between a sample that found a face and one that did not: look at this frame
            self._detector = self._detector or FaceDetector()
            self.track.face[j] = self._detector.detect(rgb) is not None
        return bool(self.track.face[j])

    def _paste(self, item: _Frame, generated: np.ndarray) -> np.ndarray:
        box = tuple(int(v) for v in self.track.boxes[item.source])
        blend = blend_mask(box, item.rgb.shape, self.feather, self.region)  # once: for the paste and its seam
        out = paste_blend(item.rgb, box, generated, blend)
        if blend is not None:
            self._seams.append(seam_ratio(out, item.rgb, blend))
        return out

    def _score(self, item: _Frame, out: np.ndarray) -> None:
        if not item.face:  # a passed-through frame is the source itself: not scored
            self._openings.append(np.full(2, np.nan))
            return
        box = self.track.boxes[item.source]
        pair = np.stack([crop_resize(item.rgb, box, SCORE_PX), crop_resize(out, box, SCORE_PX)])
        face = self.lips.track(pair[:1]).boxes  # found in the source crop, read in both
        self._openings.append(self.lips.openings(pair, np.repeat(face, 2, axis=0)))

    def report(self) -> dict:
        """Frame counts, the length rule applied, the blend and the seam measure (``seam_ratio``) over pasted frames."""
        n, total = len(self.track.index), self.counts["frames"]
        seams = np.asarray(self._seams)
        out = self.counts | {
            "video_frames": n,
            "length": "as is" if total == n else "trimmed" if total < n else self.loop,
            "region": list(self.region) if self.region else None,
            "feather": self.feather,
            "seam_ratio": round(float(seams.mean()), 4) if len(seams) else None,
            "seam_ratio_max": round(float(seams.max()), 4) if len(seams) else None,
        }
        if self.lips is not None and self._openings:
            source, revoiced = np.stack(self._openings).T
            audio = self.pipe.audio
            silent = silent_frames(self._wave, len(source), audio.fps, audio.sample_rate)
            ms = round(1e3 * self._score_s / len(source), 1)
            out["lips_vs_source"] = follow_scores(revoiced, source, silent) | {"ms_per_frame": ms}
        return out


def reference_frame(track: VideoTrack) -> tuple[np.ndarray, float]:
    """The frame (and its time in the video) nearest the first face the detector found: the default reference."""
    first = track.times[0] + track.stats["first_face_s"]
    j = int(np.argmin(np.abs(track.frame_times - first)))
    frames = VideoSource(track).decoded(j, j + 1)
    _, rgb = next(frames)
    frames.close()
    return rgb, round(float(track.frame_times[j] - track.times[0]), 3)


def changed_region(pipe: TalkingHeadPipeline) -> Region | None:
    """The crop box a net re-draws (its ``pose_mask``, as the ONNX stand-ins' sidecar records it too); None for a
    net without one (it draws the whole crop)."""
    mask = pipe.net.pose_mask
    return None if mask is None else tuple(float(v) for v in mask)


def video_summary(info: VideoInfo, track: VideoTrack) -> dict:
    """The source video as found: size, rate, duration, and whether it was resampled to the models' rate."""
    regular = len(track.index) == len(track.times) and bool(np.all(track.index == np.arange(len(track.times))))
    return {
        "path": str(track.path),
        "width": info.width,
        "height": info.height,
        "fps": info.fps,
        "duration_s": info.duration_s,
        "decoded_frames": len(track.times),
        "frames_at_model_fps": len(track.index),
        "resampled": not regular,
        "face_track": track.stats,
    }
