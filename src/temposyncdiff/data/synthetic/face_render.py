"""Procedurally drawn talking faces: identity parameters, mouth shapes per viseme, anti-aliased rendering.

Shapes live in face units (fractions of the image side, origin at the face centre) and are drawn as
polygons at ``supersample`` times the output size, then box-filtered down, which anti-aliases every edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from temposyncdiff.data.visemes import VISEMES

# Mouth parameters per viseme: opening, width, rounding, teeth shown, tongue shown (all 0..1).
MOUTH_PARAMS = ("open", "width", "round", "teeth", "tongue")
VISEME_MOUTH: dict[str, tuple[float, float, float, float, float]] = {
    "sil": (0.0, 0.45, 0.0, 0.0, 0.0),
    "AA": (1.0, 0.6, 0.1, 0.5, 0.0),
    "AE": (0.75, 0.85, 0.0, 0.8, 0.0),
    "EH": (0.5, 0.7, 0.0, 0.7, 0.0),
    "IH": (0.3, 0.95, 0.0, 1.0, 0.0),
    "OH": (0.7, 0.3, 0.8, 0.2, 0.0),
    "OO": (0.3, 0.1, 1.0, 0.0, 0.0),
    "FV": (0.12, 0.6, 0.0, 1.0, 0.0),
    "MBP": (0.0, 0.5, 0.0, 0.0, 0.0),
    "WQ": (0.2, 0.05, 1.0, 0.0, 0.0),
    "L": (0.45, 0.6, 0.0, 0.6, 1.0),
    "CH": (0.3, 0.35, 0.7, 1.0, 0.0),
    "TH": (0.3, 0.65, 0.0, 0.8, 1.0),
    "SZ": (0.15, 0.85, 0.0, 1.0, 0.0),
    "R": (0.3, 0.35, 0.6, 0.5, 0.0),
}
VISEME_MOUTH_TABLE = np.array([VISEME_MOUTH[v] for v in VISEMES], dtype=np.float32)

SKIN = [(255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 59, 36), (255, 205, 178)]
HAIR = [(20, 17, 15), (59, 38, 25), (106, 78, 66), (183, 142, 88), (165, 75, 40), (150, 150, 150), (230, 206, 140)]
IRIS = [(70, 45, 30), (40, 90, 140), (60, 110, 70), (110, 90, 60), (30, 30, 30)]


@dataclass
class Identity:
    """Everything that makes one drawn person look like themselves."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    iris: tuple[int, int, int]
    lips: tuple[int, int, int]
    shirt: tuple[int, int, int]
    bg_top: tuple[int, int, int]
    bg_bottom: tuple[int, int, int]
    face_rx: float
    face_ry: float
    jaw: float  # 0 round .. 1 narrow chin
    hair_style: int  # 0 short, 1 long, 2 bald sides, 3 tall
    eye_dx: float
    eye_size: float
    brow_tilt: float
    nose_len: float
    mouth_y: float
    glasses: bool
    beard: bool

    @classmethod
    def random(cls, rng: np.random.Generator) -> Identity:
        def jitter(c, amount=12):
            return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)

        skin = jitter(SKIN[rng.integers(len(SKIN))])
        hue = rng.random()
        bg = _hsv(hue, 0.25 + 0.3 * rng.random(), 0.75 + 0.2 * rng.random())
        return cls(
            skin=skin,
            hair=jitter(HAIR[rng.integers(len(HAIR))], 8),
            iris=IRIS[rng.integers(len(IRIS))],
            lips=tuple(int(0.72 * s + 0.28 * t) for s, t in zip(skin, (200, 60, 70))),
            shirt=_hsv(rng.random(), 0.5 + 0.4 * rng.random(), 0.35 + 0.5 * rng.random()),
            bg_top=bg,
            bg_bottom=tuple(int(0.7 * c) for c in bg),
            face_rx=float(rng.uniform(0.25, 0.31)),
            face_ry=float(rng.uniform(0.33, 0.38)),
            jaw=float(rng.uniform(0.0, 1.0)),
            hair_style=int(rng.integers(4)),
            eye_dx=float(rng.uniform(0.095, 0.12)),
            eye_size=float(rng.uniform(0.8, 1.2)),
            brow_tilt=float(rng.uniform(-0.02, 0.02)),
            nose_len=float(rng.uniform(0.07, 0.1)),
            mouth_y=float(rng.uniform(0.175, 0.2)),
            glasses=bool(rng.random() < 0.25),
            beard=bool(rng.random() < 0.2),
        )


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(255 * c) for c in rgb)


def _ellipse(cx, cy, rx, ry, a0=0.0, a1=2 * math.pi, n=40) -> np.ndarray:
    a = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


class FaceRenderer:
    """Draws frames of one identity at ``size`` pixels; pose and mouth change per frame."""

    def __init__(self, identity: Identity, size: int, supersample: int = 4, zoom: float = 1.2) -> None:
        self.id = identity
        self.zoom = zoom  # face units -> image fraction: a tight, face-centred crop like LRS3
        self.size = size
        self.big = size * supersample
        grad = np.linspace(0, 1, self.big)[:, None, None]
        top, bottom = np.array(identity.bg_top), np.array(identity.bg_bottom)
        bg = (top * (1 - grad) + bottom * grad).astype(np.uint8)
        self.background = Image.fromarray(np.broadcast_to(bg, (self.big, self.big, 3)).copy())

    def render(self, mouth: np.ndarray, blink: float, pose: tuple[float, float, float]) -> np.ndarray:
        """One uint8 ``[S,S,3]`` frame; ``mouth`` holds MOUTH_PARAMS, ``blink`` 0..1, pose (dx, dy, angle)."""
        idn, img = self.id, self.background.copy()
        draw = ImageDraw.Draw(img)
        dx, dy, angle = pose
        cos, sin = math.cos(angle), math.sin(angle)
        centre = np.array([0.5 + dx, 0.5 + dy])

        line = max(1, self.big // 90)

        def poly(points, fill=None, outline=None):
            p = np.asarray(points) * self.zoom
            x = p[:, 0] * cos - p[:, 1] * sin + centre[0]
            y = p[:, 0] * sin + p[:, 1] * cos + centre[1]
            xy = [(float(a), float(b)) for a, b in zip(x * self.big, y * self.big)]
            draw.polygon(xy, fill=fill, outline=outline, width=line if outline else 0)

        opening = float(mouth[0])
        rx, ry = idn.face_rx, idn.face_ry
        shade = tuple(int(c * 0.82) for c in idn.skin)
        # shoulders and neck (do not rotate with the head as much: drawn in the same frame for simplicity)
        poly(_ellipse(0, 0.62, 0.46, 0.22, math.pi, 2 * math.pi) + [0, 0.0], idn.shirt)
        poly([(-0.3, 0.62), (0.3, 0.62), (0.4, 0.7), (-0.4, 0.7)], idn.shirt)
        poly([(-0.1, 0.2), (0.1, 0.2), (0.11, 0.45), (-0.11, 0.45)], shade)
        if idn.hair_style == 1:  # long hair behind the face
            poly(_ellipse(0, 0.05, rx * 1.25, ry * 1.2), idn.hair)
            poly([(-rx * 1.25, 0.05), (rx * 1.25, 0.05), (rx * 1.2, 0.38), (-rx * 1.2, 0.38)], idn.hair)
        for side in (-1, 1):  # ears
            poly(_ellipse(side * rx * 0.98, 0.02, 0.035, 0.06), shade)
        # face with a jaw that drops as the mouth opens
        upper = _ellipse(0, 0, rx, ry, math.pi, 2 * math.pi, 30)
        a = np.linspace(0, math.pi, 30)
        chin_ry = ry + 0.045 * opening
        narrow = 1 - 0.25 * idn.jaw * np.sin(a) ** 4
        lower = np.stack([rx * np.cos(a) * narrow, chin_ry * np.sin(a)], axis=1)
        poly(np.concatenate([lower, upper]), idn.skin)
        if idn.beard:
            poly(np.concatenate([lower * [1.0, 1.03], _ellipse(0, 0.16, rx * 0.8, 0.07, 0, math.pi)[::-1]]), idn.hair)
        # hair on top
        if idn.hair_style in (0, 1, 3):
            h = 1.25 if idn.hair_style == 3 else 1.0
            poly(_ellipse(0, -ry * 0.35, rx * 1.05, ry * 0.75 * h, math.pi, 2 * math.pi), idn.hair)
            poly(
                [(-rx * 1.05, -ry * 0.35), (rx * 1.05, -ry * 0.35), (rx * 0.9, -ry * 0.2), (-rx * 0.9, -ry * 0.2)],
                idn.hair,
            )
        else:
            for side in (-1, 1):
                poly(_ellipse(side * rx * 0.92, -0.05, 0.05, 0.1), idn.hair)
        self._eyes(poly, blink)
        nose = idn.nose_len
        poly([(0, -0.02), (0.025, nose), (-0.025, nose)], shade)
        self._mouth(poly, mouth)
        small = img.resize((self.size, self.size), Image.Resampling.BOX)
        return np.asarray(small)

    def _eyes(self, poly, blink: float) -> None:
        idn = self.id
        ex, ey, s = idn.eye_dx, -0.05, idn.eye_size
        for side in (-1, 1):
            cx = side * ex
            poly(_ellipse(cx, ey, 0.045 * s, 0.028 * s * max(1 - blink, 0.08)), (250, 250, 250))
            if blink < 0.7:
                iris_ry = 0.02 * s * (1 - blink)
                poly(_ellipse(cx, ey, 0.02 * s, iris_ry), idn.iris)
                poly(_ellipse(cx, ey, 0.009 * s, min(0.009 * s, iris_ry)), (10, 10, 10))
            lid = 0.03 * s * blink  # upper eyelid comes down as skin
            if blink > 0.05:
                poly(_ellipse(cx, ey - 0.03 * s + lid, 0.05 * s, lid + 0.004, math.pi, 2 * math.pi) * [1, 1], idn.skin)
            tilt = side * idn.brow_tilt
            by = ey - 0.055 * s
            poly(
                [
                    (cx - 0.05, by + tilt),
                    (cx + 0.05, by - tilt),
                    (cx + 0.05, by - tilt - 0.014),
                    (cx - 0.05, by + tilt - 0.014),
                ],
                idn.hair,
            )
            if idn.glasses:
                poly(_ellipse(cx, ey, 0.07, 0.05), outline=(30, 30, 30))
        if idn.glasses:
            poly(
                [(-ex + 0.07, ey - 0.005), (ex - 0.07, ey - 0.005), (ex - 0.07, ey + 0.003), (-ex + 0.07, ey + 0.003)],
                (30, 30, 30),
            )

    def _mouth(self, poly, mouth: np.ndarray) -> None:
        opening, width, rounding, teeth, tongue = (float(v) for v in mouth)
        my = self.id.mouth_y
        # a generous mouth (about 40% of the face width, opening to 16% of its height), so that 64 px frames
        # show it over several pixels, as a face crop at LRS3's usual resolution does
        half_w = (0.075 + 0.055 * width) * (1 - 0.35 * rounding)
        gap = 0.005 + 0.11 * opening
        lip_u, lip_l = 0.02 + 0.007 * rounding, 0.025 + 0.01 * rounding
        outer = _ellipse(0, my, half_w + 0.01, gap / 2 + (lip_u + lip_l) / 2, n=48)
        outer[:, 1] += np.where(outer[:, 1] > my, (lip_l - lip_u) / 2, -(lip_l - lip_u) / 2 * 0)
        poly(outer, self.id.lips)
        cavity_rx = half_w * (0.85 - 0.25 * rounding)
        cavity_ry = gap / 2
        if opening < 0.05:  # closed lips: a dark line between them
            poly(
                [(-half_w, my - 0.002), (half_w, my - 0.002), (half_w, my + 0.002), (-half_w, my + 0.002)], (90, 30, 35)
            )
            return
        poly(_ellipse(0, my, cavity_rx, cavity_ry), (45, 12, 18))
        if teeth > 0.05:  # upper teeth: the part of the cavity above a chord
            c = min(-cavity_ry + 0.012 * teeth + 0.004, cavity_ry)
            s = c / cavity_ry
            poly(
                _ellipse(0, my, cavity_rx, cavity_ry, math.pi - math.asin(s), 2 * math.pi + math.asin(s), 24),
                (240, 238, 230),
            )
        if tongue > 0.05:
            poly(_ellipse(0, my + cavity_ry * 0.45, cavity_rx * 0.6, cavity_ry * 0.5 * tongue), (205, 90, 100))
