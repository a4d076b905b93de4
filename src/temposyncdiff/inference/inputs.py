"""User inputs for inference: reference image -> face crop (and paste-back), speech audio, optional visemes.

Documented behaviours:

- Images: any format PIL reads; EXIF orientation is applied; transparent pixels are composited on white;
  16-bit and 32-bit integer grayscale is taken as 16-bit and scaled to 8 bit (not clipped), float
  grayscale as 0..1 when its maximum is <= 1, else 0..255; images over ``max_pixels`` (50 MP) are
  downscaled (JPEGs decoded at reduced scale); images over PIL's decompression-bomb limit (~179 MP) are refused.
- Faces: ``detector="auto"`` uses dlib when installed, else a centre crop; when dlib finds no face it
  also falls back to the centre crop, with a warning. ``detector="dlib"`` raises when dlib is missing or
  finds no face. The centre crop is the largest square, centred horizontally, a third of the spare
  height from the top (faces in portraits sit above the middle). With several faces the largest is used,
  with a warning. A face crop under ``min_face_px`` (32) source pixels is an error, not a noise video.
- Audio: any file PyAV decodes (wav, flac, mp3, m4a, mp4, ...), any rate and channel count, mixed to mono
  and resampled. Shorter than ``min_seconds`` (0.2 s = 5 frames at 25 fps) is an error; all-silent audio
  is allowed with a warning (it drives a closed mouth); no length limit unless ``max_seconds`` is set.
- Visemes: a ``.npy`` file wins over a transcript; its length is trimmed or padded with silence to the
  video's frame count, with a warning when it is off by more than a frame; a transcript whose words run
  past the audio, or end over ``TRANSCRIPT_SLACK_S`` (1 s) before it, gets the same kind of warning; with
  neither, the pipeline uses the audio encoder's viseme head.
- Paste-back: a generated crop replaces the part of the frame a net re-draws (its ``pose_mask`` box, or the whole
  crop), blended over a smoothstep feather; every other pixel stays bit-identical. ``seam_ratio`` measures the seam.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.faces import Box, FaceDetector, crop_resize, square_crop_box
from temposyncdiff.data.transcript import read_transcript
from temposyncdiff.data.transcript_visemes import transcript_to_frames
from temposyncdiff.data.visemes import NUM_VISEMES, SILENCE
from temposyncdiff.errors import UserError

log = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000
SILENT_PEAK = 1e-3  # -60 dBFS: quieter than this everywhere counts as silence
MIN_FACE_PX = 32  # a face crop with fewer source pixels across is refused
TRANSCRIPT_SLACK_S = 1.0  # speech may go on this long after a transcript's last word without a warning


class InputError(UserError, ValueError):
    """A user input (image, audio, viseme or transcript file) cannot be used."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input file does not exist."""


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: file not found")
    return path


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any image file as upright uint8 ``[H,W,3]`` RGB, downscaled to at most ``max_pixels``.

    A video file gives its first frame (handy to take a reference from a corpus utterance).
    """
    path = _require_file(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from temposyncdiff.data.video import read_frames

        return read_frames(path)[0][0]
    with _open_image(path) as img:
        if img.width * img.height > max_pixels:
            scale = (max_pixels / (img.width * img.height)) ** 0.5
            size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
            img.draft(None, size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            img = img.resize(size, Image.Resampling.LANCZOS)
        return _to_rgb(ImageOps.exif_transpose(img))


def check_reference_file(path: str | os.PathLike, min_face_px: int = MIN_FACE_PX) -> None:
    """Refuse a missing, unreadable or too small reference image (or video) from its header, decoding no pixels."""
    path = _require_file(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from temposyncdiff.data.video import probe

        info = probe(path, count_frames=False)
        width, height = info.width, info.height
    else:
        with _open_image(path) as img:
            width, height = img.size
    _check_face_size(str(path), min(width, height), width, height, min_face_px)


def _check_face_size(name: str, side: int, width: int, height: int, min_face_px: int) -> None:
    if side < min_face_px:
        raise InputError(
            f"{name}: the face would be {side} px across in a {width}x{height} image; "
            f"at least min_face_px={min_face_px} px is needed (use a larger photo)"
        )


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """PIL's lazy image of ``path`` (pixels are decoded when first used); unreadable files raise InputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image downscales big images
            with Image.open(path) as img:
                yield img
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: image too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image, or a format PIL cannot read") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data, unconvertible mode
        raise InputError(f"{path}: unreadable image ({err})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 RGB: alpha composited on white, 16-bit / float grayscale scaled to 8 bit."""
    if img.mode == "F" or img.mode.startswith("I"):
        gray = np.nan_to_num(np.asarray(img, dtype=np.float32))
        gray = (gray * 255 if gray.max() <= 1 else gray) if img.mode == "F" else gray / 257
        return np.repeat(np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return np.array(img.convert("RGB"))


@dataclass
class ReferenceFace:
    """A reference image and its face crop, framed like the training data."""

    crop: np.ndarray  # uint8 [size, size, 3]
    box: Box  # (x0, y0, x1, y1) of the crop in ``image``; may reach past its edges
    method: str  # "dlib" or "center"
    image: np.ndarray  # the whole upright uint8 RGB image, for paste-back
    faces: int  # faces the detector found (the largest is used); 0 when it found none or did not run


def center_box(width: int, height: int) -> Box:
    """Largest square in the image, centred horizontally, a third of the spare height from the top."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 3
    return x0, y0, x0 + side, y0 + side


def prepare_reference(
    image: str | os.PathLike | np.ndarray,
    size: int,
    detector: str = "auto",
    margin: float = 0.5,
    lift: float = 0.1,
    min_face_px: int = MIN_FACE_PX,
) -> ReferenceFace:
    """Crop the face of ``image`` (path or uint8 RGB array) to ``size`` px, framed as ``data.prepare`` frames videos
    (same ``margin`` and ``lift`` defaults).

    ``detector``: "auto" (dlib when installed and a face is found, else centre crop), "dlib" or "center".
    A crop with fewer than ``min_face_px`` source pixels across is an InputError.
    """
    if detector not in ("auto", "dlib", "center"):
        raise InputError(f"detector={detector!r}: choose auto, dlib or center")
    name = str(image) if isinstance(image, (str, os.PathLike)) else "the reference image"
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    h, w = image.shape[:2]
    face, found = (None, 0) if detector == "center" else _detect(image, name, required=detector == "dlib")
    box = center_box(w, h) if face is None else square_crop_box(face, w, h, margin, lift)
    x0, y0, x1, y1 = box
    _check_face_size(name, min(min(x1, w) - max(x0, 0), min(y1, h) - max(y0, 0)), w, h, min_face_px)
    return ReferenceFace(crop_resize(image, box, size), box, "center" if face is None else "dlib", image, found)


def _detect(image: np.ndarray, name: str, required: bool) -> tuple[Box | None, int]:
    """dlib's largest face box (None, with a log line, where a centre crop is to be used) and the faces it found."""
    try:
        detector = FaceDetector()
    except ImportError as err:
        if required:
            raise InputError(f"detector=dlib: {err}") from None
        log.info("dlib is not installed; using a centre crop of %s", name)
        return None, 0
    face = detector.detect_still(image)
    if face is None and required:
        raise InputError(f"no face found in {name}; pass detector=center to use a centre crop")
    if face is None:
        log.warning("no face found in %s; using a centre crop", name)
    elif detector.faces_found > 1:
        log.warning("%d faces found in %s; using the largest, at %s (x0, y0, x1, y1)", detector.faces_found, name, face)
    return face, detector.faces_found


def even_size(image: np.ndarray) -> np.ndarray:
    """``image`` with an odd height or width padded by one edge row or column (H.264 yuv420p needs even sizes)."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else image


Region = tuple[float, float, float, float]  # (x0, y0, x1, y1) fractions of a face crop
SEAM_RING = 2  # pixels around a blend's mask that seam_ratio also looks at (a hard edge's outer side)


@dataclass
class Blend:
    """A paste's soft mask: ``weight`` ``[h, w]`` in [0, 1] over frame rows ``top:top+h``, columns ``left:left+w``."""

    top: int
    left: int
    weight: np.ndarray


def blend_mask(
    box: Box, frame_shape: tuple[int, ...], feather: float = 0.1, region: Region | None = None
) -> Blend | None:
    """Where a crop pasted at ``box`` changes a frame of ``frame_shape`` (None: the box misses the frame).

    ``region``: the part of the crop the net changed (None: all of it); it gets weight 1, falling to 0 by a
    smoothstep over ``feather`` x the box side outside it, or inside it where the box leaves no room. Pixels of
    weight 0 are left out, so a paste leaves them bit-identical.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    rx0, ry0, rx1, ry1 = region or (0.0, 0.0, 1.0, 1.0)
    weight = np.outer(_ramp(y1 - y0, feather, ry0, ry1), _ramp(x1 - x0, feather, rx0, rx1))
    rows, cols = np.flatnonzero(weight.any(axis=1)), np.flatnonzero(weight.any(axis=0))
    if not len(rows):
        return None
    h, w = frame_shape[:2]
    top, bottom = max(y0 + rows[0], 0), min(y0 + rows[-1] + 1, h)
    left, right = max(x0 + cols[0], 0), min(x0 + cols[-1] + 1, w)
    if top >= bottom or left >= right:
        return None
    return Blend(top, left, weight[top - y0 : bottom - y0, left - x0 : right - x0])


def paste_back(
    original: np.ndarray, box: Box, generated: np.ndarray, feather: float = 0.1, region: Region | None = None
) -> np.ndarray:
    """Blend a generated uint8 square face into a copy of ``original`` at its crop ``box``, with soft edges.

    ``feather``: width of the edge ramp as a fraction of the box side (0 = hard edge); ``region``: the part of the
    crop to replace (``blend_mask``). Parts of the box outside the image are dropped; pixels the blend does not
    reach are left bit-identical.
    """
    return paste_blend(original, box, generated, blend_mask(box, original.shape, feather, region))


def paste_blend(original: np.ndarray, box: Box, generated: np.ndarray, blend: Blend | None) -> np.ndarray:
    """``paste_back`` with its ``blend_mask`` already made (None: the box misses the frame, a plain copy)."""
    out = original.copy()
    if blend is None:
        return out
    x0, y0, x1, y1 = (int(v) for v in box)
    (h, w), top, left = blend.weight.shape, blend.top, blend.left
    sx, sy = generated.shape[1] / (x1 - x0), generated.shape[0] / (y1 - y0)
    part = ((left - x0) * sx, (top - y0) * sy, (left - x0 + w) * sx, (top - y0 + h) * sy)  # the blend's source pixels
    face = Image.fromarray(np.ascontiguousarray(generated)).resize((w, h), Image.Resampling.LANCZOS, box=part)
    face = np.asarray(face, dtype=np.float32)
    under = out[top : top + h, left : left + w].astype(np.float32)
    blended = under + blend.weight[..., None] * (face - under)
    out[top : top + h, left : left + w] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def _ramp(n: int, feather: float, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Weights of ``n`` pixels: 1 on ``[lo, hi]`` (fractions of n), a smoothstep down to 0 over ``feather * n``
    pixels outside it, moved inside where the ends leave no room (so the whole span ramps in from its edges)."""
    x, width = np.arange(n, dtype=np.float32) + 0.5, feather * n
    if width <= 0:
        return ((x >= lo * n) & (x <= hi * n)).astype(np.float32)
    start, stop = max(lo * n - width, 0.0), min(hi * n + width, float(n))
    t = np.clip(np.minimum(x - start, stop - x) / width, 0, 1)
    return t * t * (3 - 2 * t)


def seam_ratio(output: np.ndarray, source: np.ndarray, blend: Blend) -> float:
    """Mean gradient magnitude along a paste's border in ``output`` over the same in the untouched ``source``.

    The border: every pixel whose blend weight differs from a neighbour's (the whole feather ramp; both sides of a
    hard edge). ~1: no visible seam; above 1: the paste adds an edge; below 1: it is smoother (blurrier) there.
    """
    h, w = blend.weight.shape
    top, left = max(blend.top - SEAM_RING, 0), max(blend.left - SEAM_RING, 0)
    bottom = min(blend.top + h + SEAM_RING, output.shape[0])
    right = min(blend.left + w + SEAM_RING, output.shape[1])
    weight = np.zeros((bottom - top, right - left), np.float32)
    weight[blend.top - top : blend.top - top + h, blend.left - left : blend.left - left + w] = blend.weight
    dy, dx = np.diff(weight, axis=0) != 0, np.diff(weight, axis=1) != 0
    border = np.zeros(weight.shape, bool)
    border[1:] |= dy
    border[:-1] |= dy
    border[:, 1:] |= dx
    border[:, :-1] |= dx
    if not border.any():
        return 1.0
    crop = np.s_[top:bottom, left:right]
    return (_gradient(output[crop], border) + 1e-3) / (_gradient(source[crop], border) + 1e-3)  # flat and flat: 1


def _gradient(image: np.ndarray, where: np.ndarray) -> float:
    """Mean over ``where`` of the gradient magnitude (central differences, averaged over channels)."""
    gy, gx = np.gradient(image.astype(np.float32), axis=(0, 1))
    return float(np.sqrt(gx**2 + gy**2)[where].mean())


def load_speech(
    path: str | os.PathLike, sample_rate: int = 16000, min_seconds: float = 0.2, max_seconds: float | None = None
) -> np.ndarray:
    """Speech from any audio or video file as float32 mono at ``sample_rate``.

    Empty, shorter than ``min_seconds`` or (when set) longer than ``max_seconds`` is an InputError;
    unreadable files raise MediaError; all-silent audio is returned with a warning.
    """
    path = _require_file(path)
    wave = load_audio(path, sample_rate)
    seconds = len(wave) / sample_rate
    if not len(wave):
        raise InputError(f"{path}: audio is empty")
    if seconds < min_seconds:
        raise InputError(f"{path}: audio is {seconds:.2f} s long; at least {min_seconds:g} s is needed")
    if max_seconds is not None and seconds > max_seconds:
        raise InputError(f"{path}: audio is {seconds:.1f} s long; the limit is max_seconds={max_seconds:g}")
    if np.abs(wave).max() < SILENT_PEAK:
        log.warning("%s: audio is silent; the mouth will stay closed", path)
    return wave


def load_visemes_for(
    num_frames: int,
    fps: float = 25.0,
    transcript: str | os.PathLike | None = None,
    viseme_file: str | os.PathLike | None = None,
    wave: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> np.ndarray | None:
    """Per-frame viseme ids (int64 ``[num_frames]``) from a viseme ``.npy``, an LRS3 transcript with timings or,
    given ``wave``, the speech's phones decoded by pocketsphinx (speaker-independent, no transcript needed).

    The ``.npy`` wins, then the transcript. None when none is given: the pipeline then uses the audio
    encoder's viseme head.
    """
    if viseme_file is not None:
        return _read_viseme_file(_require_file(viseme_file), num_frames)
    if transcript is None:
        if wave is None:
            return None
        from temposyncdiff.data.phones import visemes_for_audio

        return visemes_for_audio(wave, sample_rate, num_frames, fps)
    path = _require_file(transcript)
    parsed = read_transcript(path)
    if not parsed.words:
        raise InputError(
            f"{path}: transcript has no word timings (WORD START END table); pass one with timings or none"
        )
    last, seconds = max(end for _, _, end in parsed.words), num_frames / fps
    if last > seconds + 1 / fps or last < seconds - TRANSCRIPT_SLACK_S:
        log.warning(
            "%s: words end at %.2f s but the audio is %.2f s; visemes past the audio are dropped, "
            "frames after the last word are silent",
            path,
            last,
            seconds,
        )
    return transcript_to_frames(parsed, num_frames, fps)


def _read_viseme_file(path: Path, num_frames: int) -> np.ndarray:
    """1-D integer ids in 0..NUM_VISEMES-1, trimmed or padded with silence to ``num_frames``."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, TokenError) as err:  # TokenError: numpy parsing a corrupt header
        raise InputError(f"{path}: not a .npy array ({err})") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
        got = f"{ids.dtype} of shape {ids.shape}" if isinstance(ids, np.ndarray) else "an .npz archive"
        raise InputError(f"{path}: expected a 1-D integer array of viseme ids, got {got}")
    if len(ids) and (ids.min() < 0 or ids.max() >= NUM_VISEMES):
        raise InputError(f"{path}: viseme ids must lie in 0..{NUM_VISEMES - 1}, found {ids.min()}..{ids.max()}")
    if abs(len(ids) - num_frames) > 1:
        log.warning("%s: %d visemes for %d frames; trimmed or padded with silence", path, len(ids), num_frames)
    out = np.full(num_frames, SILENCE, dtype=np.int64)
    out[: min(num_frames, len(ids))] = ids[:num_frames]
    return out
