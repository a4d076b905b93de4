"""Regions of a face-centred square frame: one box type, ``(x0, y0, x1, y1)`` fractions of width and height, for
the losses' weights, the stages' validation and tsd-eval. The boxes themselves come from ``conf/regions/face.yaml``
(interpolated into every model and eval config), so a mouth PSNR means the same pixels everywhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, fields

import torch
from torch import Tensor

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width / height


def check_box(name: str, box: Sequence[float]) -> Box:
    """``box`` as a float tuple; a clear error unless ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``."""
    out = tuple(float(v) for v in box)
    if len(out) != 4 or not (0 <= out[0] < out[2] <= 1 and 0 <= out[1] < out[3] <= 1):
        raise ValueError(
            f"region {name}: need (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}"
        )
    return out  # type: ignore[return-value]


def _span(size: int, start: float, end: float) -> slice:
    """Index slice of fractions ``[start, end)`` of ``size`` (rounded; at least one index)."""
    a = min(round(start * size), size - 1)
    return slice(a, max(round(end * size), a + 1))


def crop(x: Tensor, box: Sequence[float]) -> Tensor:
    """The pixels (or latent cells) of ``box`` from images or latents ``[..., H, W]``."""
    return x[..., _span(x.shape[-2], box[1], box[3]), _span(x.shape[-1], box[0], box[2])]


def region_weight(
    height: int, width: int, box: Sequence[float], factor: float, device: torch.device | str = "cpu"
) -> Tensor | None:
    """``[height, width]`` map: ``factor`` inside ``box``, 1 elsewhere; None for ``factor == 1`` (no weighting)."""
    if factor == 1.0:
        return None
    w = torch.ones(height, width, device=device)
    w[_span(height, box[1], box[3]), _span(width, box[0], box[2])] = factor
    return w


@dataclass(kw_only=True)
class RegionBoxes:
    """The named regions scored apart: ``full`` (the whole frame), ``mouth`` (mouth and jaw, with room for an open
    jaw and small head motion) and ``upper_face`` (what the mouth does not move)."""

    full: Box = (0.0, 0.0, 1.0, 1.0)
    mouth: Box
    upper_face: Box

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_box(f.name, getattr(self, f.name)))

    def items(self) -> Iterator[tuple[str, Box]]:
        """(name, box) pairs in field order."""
        return zip((f.name for f in fields(self)), astuple(self))

    def parts(self) -> Iterator[tuple[str, Box]]:
        """(name, box) pairs of the regions other than ``full``."""
        return ((n, b) for n, b in self.items() if n != "full")
