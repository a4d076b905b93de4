"""Landmark mouth opening (dlib's 68 points) of a generated video against the ground truth's: how well the opening
follows the truth (own audio vs another utterance's: the audio-swap control), its amplitude, and the mouth in silence.

Opening of a frame: the three inner-lip gaps (0-based points 61-67, 62-66, 63-65), each measured along the face's
downward axis (perpendicular to the line through the eye centres, the means of points 36-41 and 42-47), averaged and
divided by the distance between the eye centres. Unlike the face height (the chin), the eyes do not move with the
jaw. A closed mouth reads about 0 (slightly below when the inner lips overlap), a wide-open one 0.3-0.4.

Face boxes come from the ground truth: dlib's HOG detector on every ``detect_every``-th frame, upsampled so the short
side is at least ``min_side`` (the detector finds no face in 64 px crops), interpolated between detections. A frame
farther than ``detect_every`` frames from any detection has no box: its opening is NaN, excluded and counted. The
generated video is landmarked in the truth's boxes (the same framing; blurry generated faces are often missed by the
detector). A clip whose truth shows a face in fewer than ``min_face_frac`` of the checked frames is skipped with
the reason, as is every clip when dlib or its 68-point model is missing (the report says unavailable, never a number).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchmetrics import Metric

from temposyncdiff.data.faces import FaceDetector
from temposyncdiff.metrics.identity import as_uint8_frames, dlib_models
from temposyncdiff.metrics.image import unavailable

LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
UPPER_INNER_LIP, LOWER_INNER_LIP = [61, 62, 63], [67, 66, 65]  # pairs facing each other
UPPER_OUTER_LIP, LOWER_OUTER_LIP = [50, 51, 52], [58, 57, 56]
MOUTH_CORNERS = [48, 54]
LIP_FEATURES = ("inner_opening", "outer_opening", "width")  # ``lip_shape``'s entries
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)
CLOSED = 0.02  # openings below this are a closed mouth within landmark noise (grace_hopper's closed lips read 0.02)


def lip_shape(points: np.ndarray) -> np.ndarray:
    """``[3]`` float32 (``LIP_FEATURES``) from ``[68,2]`` dlib landmarks (x, y in pixels), each over the inter-ocular
    distance: the inner- and outer-lip gaps along the face's downward axis and the corner-to-corner width."""
    left, right = points[LEFT_EYE].mean(0), points[RIGHT_EYE].mean(0)
    across = right - left
    iod = float(np.hypot(*across))
    down = np.array([-across[1], across[0]]) / iod  # image y points down: this is the face's downward axis
    inner = ((points[LOWER_INNER_LIP] - points[UPPER_INNER_LIP]) @ down).mean()
    outer = ((points[LOWER_OUTER_LIP] - points[UPPER_OUTER_LIP]) @ down).mean()
    width = np.hypot(*(points[MOUTH_CORNERS[1]] - points[MOUTH_CORNERS[0]]))
    return np.array([inner, outer, width], dtype=np.float64) / iod


def lip_opening(points: np.ndarray) -> float:
    """Inner-lip gap over the inter-ocular distance (``lip_shape``'s first entry)."""
    return float(lip_shape(points)[0])


def interpolate_missing(shapes: np.ndarray) -> np.ndarray:
    """``[T,F]`` per-frame values with NaN rows (no face) filled linearly over time; all NaN: returned as is."""
    ok = ~np.isnan(shapes[:, 0])
    if ok.all() or not ok.any():
        return shapes
    t, have = np.arange(len(shapes)), np.flatnonzero(ok)
    return np.stack([np.interp(t, have, shapes[ok, k]) for k in range(shapes.shape[1])], axis=1)


def lip_stats(shapes: np.ndarray) -> np.ndarray:
    """``[T, F]`` lip shapes of one person -> ``[2, F]`` float32: their mean (the person's average mouth) and std (how
    far it moves; at least 1e-3), the range a ``lip_relative`` net reads shapes in."""
    shapes = np.asarray(shapes, np.float64)
    return np.stack([shapes.mean(0), np.maximum(shapes.std(0), 1e-3)]).astype(np.float32)


def silent_frames(
    wave: np.ndarray,
    num_frames: int,
    fps: float = 25.0,
    sample_rate: int = 16000,
    threshold_db: float = -25.0,
    min_ms: float = 200.0,
) -> np.ndarray:
    """``[num_frames]`` bool: frames inside silent stretches of at least ``min_ms``.

    A frame's level is the power of its own audio (samples ``[k, k + 1) * sample_rate / fps``) in dB; silent means
    ``threshold_db`` or more below the clip's loud level (the 95th percentile of frame levels). Missing audio is
    silence.
    """
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(int)
    wave = np.pad(np.asarray(wave, dtype=np.float64)[: edges[-1]], (0, max(0, edges[-1] - len(wave))))
    energy = np.concatenate([[0.0], np.cumsum(wave**2)])
    power = (energy[edges[1:]] - energy[edges[:-1]]) / np.maximum(np.diff(edges), 1)
    level = 10 * np.log10(power + 1e-10)
    quiet = level < np.percentile(level, 95) + threshold_db
    out, need, start = np.zeros(num_frames, dtype=bool), math.ceil(min_ms * fps / 1000 - 1e-9), None
    for k, q in enumerate([*quiet, False]):
        if q and start is None:
            start = k
        elif not q and start is not None:
            out[start:k] = k - start >= need
            start = None
    return out


@dataclass
class FaceTrack:
    """Face boxes ``[T,4]`` as (x0, y0, x1, y1) frame fractions (NaN rows: no face near) and the detector's hits."""

    boxes: np.ndarray
    found: int
    checked: int


class LipLandmarks:
    """dlib's HOG face detector and 68-point shape predictor: face tracks and per-frame lip openings of uint8 videos.

    Truth tracks and openings are remembered by the frames' digest, so every run of an eval pays for the truth once.
    """

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        min_side: int = 256,
        detect_every: int = 5,
        detector: FaceDetector | None = None,
    ) -> None:
        dlib, folder = dlib_models(weights_dir, LANDMARK_MODEL)
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(folder / LANDMARK_MODEL))
        self._detector = detector or FaceDetector()
        self.min_side, self.detect_every = int(min_side), max(1, int(detect_every))
        self._memo: dict[str, tuple[FaceTrack, np.ndarray]] = {}

    def upsampled(self, frame: np.ndarray) -> np.ndarray:
        """The frame enlarged (bicubic) so its short side is at least ``min_side``."""
        h, w = frame.shape[:2]
        scale = self.min_side / min(h, w)
        if scale <= 1:
            return np.ascontiguousarray(frame)
        size = (round(w * scale), round(h * scale))
        return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))

    def track(self, frames: np.ndarray) -> FaceTrack:
        """Detect on every ``detect_every``-th frame (and the last); interpolate boxes between detections."""
        n = len(frames)
        checked = sorted({*range(0, n, self.detect_every), n - 1}) if n else []
        at, boxes = [], []
        for i in checked:
            image = self.upsampled(frames[i])
            box = self._detector.detect(image)
            if box is not None:
                h, w = image.shape[:2]
                at.append(i)
                boxes.append((box[0] / w, box[1] / h, box[2] / w, box[3] / h))
        out = np.full((n, 4), np.nan)
        if at:
            out = np.stack([np.interp(np.arange(n), at, [b[k] for b in boxes]) for k in range(4)], axis=1)
            far = np.abs(np.arange(n)[:, None] - np.array(at)[None]).min(axis=1) > self.detect_every
            out[far] = np.nan
        return FaceTrack(out, len(at), len(checked))

    def openings(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``[T]`` lip openings (``lip_opening``) of uint8 ``[T,H,W,3]`` frames in boxes ``[T,4]`` (fractions)."""
        return self.shapes(frames, boxes)[:, 0]

    def shapes(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``[T,3]`` lip shapes (``lip_shape``) of uint8 ``[T,H,W,3]`` frames in boxes ``[T,4]``; NaN rows: no box."""
        out = np.full((len(frames), len(LIP_FEATURES)), np.nan)
        for k, (frame, box) in enumerate(zip(frames, boxes)):
            if not np.isnan(box).any():
                out[k] = lip_shape(self.points(self.upsampled(frame), box))
        return out

    def points(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """``[68,2]`` landmarks (x, y pixels) of a uint8 ``[H,W,3]`` image in ``box`` (fractions of the image)."""
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (round(f * s) for f, s in zip(box, (w, h, w, h)))
        shape = self._shape(image, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def truth(self, frames: np.ndarray) -> tuple[FaceTrack, np.ndarray]:
        """The ground truth's face track and openings (remembered)."""
        frames = np.ascontiguousarray(frames)
        key = hashlib.blake2b(frames.data, digest_size=16).hexdigest() + str(frames.shape)
        if key not in self._memo:
            track = self.track(frames)
            self._memo[key] = track, self.openings(frames, track.boxes)
        return self._memo[key]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when ``a`` is constant (a still mouth follows nothing)."""
    if a.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def follow_scores(pred: np.ndarray, truth: np.ndarray, silent: np.ndarray) -> dict[str, Any]:
    """One video's lip openings ``pred`` against the ``truth``'s (``[T]``, NaN: no landmarks) as ``MouthOpening``
    scores a clip: correlation, amplitude ratio, mean opening in the ``silent`` frames vs the truth's."""
    ok = ~(np.isnan(pred) | np.isnan(truth))
    p, t = pred[ok], truth[ok]
    if ok.sum() < 3 or t.std() < 1e-9:
        return unavailable(f"the truth's mouth does not move ({int(ok.sum())} frames with landmarks)")
    out = {
        "status": "ok",
        "corr": pearson(p, t),
        "amplitude": float(p.std() / t.std()),
        "num_frames": int(ok.sum()),
        "frames_without_landmarks": int((~ok).sum()),
    }
    quiet = silent[ok]
    if not quiet.any():
        return out | {"silence": unavailable("no silent stretch in the audio")}
    sp, st = float(p[quiet].mean()), float(t[quiet].mean())
    ratio = sp / st if st >= CLOSED else None
    return out | {"silence": {"pred": sp, "truth": st, "ratio": ratio, "gap": sp - st, "num_frames": int(quiet.sum())}}


# per-run totals, summed over clips (one float64 state vector)
TOTALS = tuple(
    "corr amplitude clips corr_swapped amplitude_swapped clips_swapped silence_pred silence_truth silence_frames "
    "silence_clips frames frames_no_face".split()
)


class MouthOpening(Metric):
    """Landmark mouth opening of generated videos vs the truth: ``update(pred, target, wave, swapped, clip_id)``.

    Per clip, over frames with a face box: the Pearson correlation of the pred and truth opening series (also for
    ``swapped``, the video made from another utterance's audio: the audio-swap control), the amplitude ratio
    std(pred) / std(truth) and, with the clip's 16 kHz ``wave``, both openings in its silent stretches
    (``silent_frames``). ``compute()`` -> ``own`` / ``swapped`` ``{corr, amplitude, num_clips}`` (means over clips),
    ``silence`` ``{pred, truth, ratio, gap, num_frames, num_clips}`` (means over all silent frames; ratio = pred /
    truth, None when the truth's mouth is closed there (< ``CLOSED``); gap = pred - truth),
    frame counts and the skipped clips with their reasons; an unavailable entry when no clip could be scored.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        landmarks: LipLandmarks | None = None,
        weights_dir: str | os.PathLike | None = None,
        min_face_frac: float = 0.5,
        silence_db: float = -25.0,
        silence_min_ms: float = 200.0,
        fps: float = 25.0,
        sample_rate: int = 16000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.add_state("totals", default=torch.zeros(len(TOTALS), dtype=torch.float64), dist_reduce_fx="sum")
        self.min_face_frac, self.silence_db, self.silence_min_ms = min_face_frac, silence_db, silence_min_ms
        self.fps, self.sample_rate = fps, sample_rate
        self.skipped: list[str] = []
        self.landmarks, self.reason = landmarks, ""
        if landmarks is None:
            try:
                self.landmarks = LipLandmarks(weights_dir)
            except (ImportError, OSError, RuntimeError) as err:
                self.reason = str(err)

    def _add(self, **values: float) -> None:
        for name, v in values.items():
            self.totals[TOTALS.index(name)] += v

    def update(
        self,
        pred: Tensor | np.ndarray,
        target: Tensor | np.ndarray,
        wave: np.ndarray | None = None,
        swapped: Tensor | np.ndarray | None = None,
        clip_id: str | None = None,
    ) -> None:
        """Score one clip (frames as ``metrics.image.to_unit`` accepts them; no-op when unavailable)."""
        if self.landmarks is None:
            return
        truth_frames = as_uint8_frames(target)
        track, truth = self.landmarks.truth(truth_frames)
        ok = ~np.isnan(truth)
        if track.found < max(1, self.min_face_frac * track.checked):
            reason = f"dlib finds a face in {track.found} of {track.checked} checked frames of the truth"
        elif ok.sum() < 3 or truth[ok].std() < 1e-9:
            reason = f"the truth's mouth does not move ({int(ok.sum())} frames with landmarks)"
        else:
            reason = ""
        if reason:
            self.skipped.append(f"{clip_id}: {reason}" if clip_id else reason)
            return
        self._add(frames=len(truth), frames_no_face=int((~ok).sum()))
        silent = np.zeros(len(truth), bool)
        if wave is not None:
            silent = silent_frames(wave, len(truth), self.fps, self.sample_rate, self.silence_db, self.silence_min_ms)
        own = follow_scores(self._openings(pred, track, clip_id), truth, silent)
        self._add(corr=own["corr"], amplitude=own["amplitude"], clips=1)
        if swapped is not None:
            p = follow_scores(self._openings(swapped, track, clip_id), truth, silent)
            self._add(corr_swapped=p["corr"], amplitude_swapped=p["amplitude"], clips_swapped=1)
        if (quiet := own["silence"]).get("status") != "unavailable":  # pooled over clips: sums, not means
            n = quiet["num_frames"]
            self._add(
                silence_pred=quiet["pred"] * n, silence_truth=quiet["truth"] * n, silence_frames=n, silence_clips=1
            )

    def _openings(self, video: Tensor | np.ndarray, track: FaceTrack, clip_id: str | None) -> np.ndarray:
        frames = as_uint8_frames(video)
        if len(frames) != len(track.boxes):
            raise ValueError(f"{clip_id or 'clip'}: {len(frames)} generated frames, {len(track.boxes)} true ones")
        return self.landmarks.openings(frames, track.boxes)

    def compute(self) -> dict[str, Any]:
        """Plain floats / ints for the eval report."""
        if self.landmarks is None:
            return unavailable(self.reason)
        v = dict(zip(TOTALS, self.totals.tolist()))
        if not v["clips"]:
            return unavailable("no clip scored" + (f" ({'; '.join(self.skipped)})" if self.skipped else ""))

        def follow(key: str) -> dict[str, Any]:
            n = int(v[f"clips{key}"])
            if not n:
                return unavailable(
                    "no audio-swap video (it needs 2 utterances; a baseline made from the truth has none)"
                )
            return {"corr": v[f"corr{key}"] / n, "amplitude": v[f"amplitude{key}"] / n, "num_clips": n}

        n_sil = int(v["silence_frames"])
        silence = unavailable(f"no silent stretch of >= {self.silence_min_ms:g} ms in the scored clips' audio")
        if n_sil:
            pred, truth = v["silence_pred"] / n_sil, v["silence_truth"] / n_sil
            silence = {
                "pred": pred,
                "truth": truth,
                "ratio": pred / truth if truth >= CLOSED else None,  # a ratio to a closed mouth is one to noise
                "gap": pred - truth,
                "num_frames": n_sil,
                "num_clips": int(v["silence_clips"]),
            }
        return {
            "status": "ok",
            "own": follow(""),
            "swapped": follow("_swapped"),
            "silence": silence,
            "num_frames": int(v["frames"]),
            "frames_without_landmarks": int(v["frames_no_face"]),
            "skipped": list(self.skipped),
        }

    def reset(self) -> None:
        """Clear the totals and the skipped clips (the landmarker's truth memo stays)."""
        super().reset()
        self.skipped = []
