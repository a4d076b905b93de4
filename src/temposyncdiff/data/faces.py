"""Face detection (dlib HOG) and square face-centred crops, shared by data preparation and inference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


class FaceDetector:
    """dlib's HOG frontal face detector; returns the largest face in an RGB uint8 frame.

    Frames wider or taller than ``max_side`` are downscaled first (speed); when nothing is found the
    image is upsampled (up to ``max_upsample`` times, x2 each) so faces down to ~40 px are found too.
    """

    def __init__(self, max_side: int = 960, max_upsample: int = 1) -> None:
        try:
            import dlib
        except ImportError as err:
            raise ImportError("face detection needs dlib: pip install -e .[faces]") from err
        self._detector = dlib.get_frontal_face_detector()
        self.max_side = max_side
        self.max_upsample = max_upsample
        self.faces_found = 0  # how many faces the last detection found (the largest is returned)

    def scale_for(self, width: int, height: int) -> float:
        """The factor a ``width`` x ``height`` frame is shrunk by before detection (1: not at all)."""
        return min(1.0, self.max_side / max(width, height))

    def detect(self, frame: np.ndarray) -> Box | None:
        """Largest face box of an ``[H,W,3]`` uint8 RGB frame in its own pixel coordinates, or None."""
        image = Image.fromarray(np.ascontiguousarray(frame)).convert("L")
        scale = self.scale_for(*image.size)
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        return self.detect_gray(np.asarray(image), scale)

    def detect_still(self, frame: np.ndarray, scales: Sequence[float] = (1.0, 0.75, 0.5)) -> Box | None:
        """The largest face of one image, its box the median over the image at ``scales`` x its size.

        A video's boxes are smoothed over its track; a still has none, and dlib's box on one image moves with how
        the image was saved (on a 512 px portrait: 216 px across as a PNG, 259 px as a JPEG at quality 20, the
        median over these three scales 240-250 px on both). ``faces_found``: the full-size detection's count.
        """
        boxes, found, (h, w) = [], [], frame.shape[:2]
        for s in sorted(scales, reverse=True):
            image = frame if s == 1.0 else np.asarray(Image.fromarray(frame).resize((round(w * s), round(h * s))))
            box = self.detect(image)
            found.append(self.faces_found)
            if box is not None:
                boxes.append([v / s for v in box])
        self.faces_found = found[0]
        return tuple(round(v) for v in np.median(np.array(boxes), axis=0)) if boxes else None

    def detect_gray(self, gray: np.ndarray, scale: float = 1.0) -> Box | None:
        """Largest face box of a uint8 luma image that is ``scale`` x the frame's size, in the frame's pixels."""
        gray = np.ascontiguousarray(gray)
        self.faces_found = 0
        for upsample in range(self.max_upsample + 1):
            rects = self._detector(gray, upsample)
            self.faces_found = len(rects)
            if rects:
                r = max(rects, key=lambda r: r.width() * r.height())
                return tuple(round(v / scale) for v in (r.left(), r.top(), r.right() + 1, r.bottom() + 1))
        return None


def square_crop_box(box: Sequence[float], frame_w: int, frame_h: int, margin: float = 0.5, lift: float = 0.1) -> Box:
    """Square box centred on a face box, ``1 + 2 * margin`` times its size (whole head for dlib boxes).

    ``lift`` moves the centre up by that fraction of the face size (dlib boxes stop at the eyebrows).
    The side is capped at the frame's short side so close-ups are not padded with smeared edges.
    """
    x0, y0, x1, y1 = box
    face = max(x1 - x0, y1 - y0)
    side = max(1, round(min(face * (1 + 2 * margin), max(face, min(frame_w, frame_h)))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - lift * face
    left, top = round(cx - side / 2), round(cy - side / 2)
    return left, top, left + side, top + side


def crop_resize(frame: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Crop ``box`` from an ``[H,W,3]`` uint8 frame (edge pixels fill what lies outside) and resize to ``size``."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    cx0, cy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    cx1, cy1 = max(min(x1, w), cx0 + 1), max(min(y1, h), cy0 + 1)
    crop = frame[cy0:cy1, cx0:cx1]
    pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
    if any(a or b for a, b in pad):
        crop = np.pad(crop, [(max(a, 0), max(b, 0)) for a, b in pad], mode="edge")
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))
