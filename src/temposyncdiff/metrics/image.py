"""Region-aware fidelity (PSNR, SSIM, MS-SSIM from torchmetrics) and LPIPS that never downloads weights.

Frames are float ``[T,3,H,W]`` in [-1,1] or uint8 ``[T,H,W,3]`` (decoded video); both are scored on [0,1].
``compute()`` outputs are JSON-ready: plain floats via ``json_float`` (PSNR of identical inputs is ``"inf"``),
ints, and ``{"status": "unavailable", "reason": ...}`` wherever a number cannot be computed honestly.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image import (
    LearnedPerceptualImagePatchSimilarity,
    MultiScaleStructuralSimilarityIndexMeasure,
    PeakSignalNoiseRatio,
    StructuralSimilarityIndexMeasure,
)
from torchmetrics.utilities import dim_zero_cat

Frac = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width / height
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def to_unit(frames: Tensor | np.ndarray) -> Tensor:
    """Float ``[T,3,H,W]`` in [0,1] from float ``[T,3,H,W]`` in [-1,1] or uint8 ``[T,H,W,3]``."""
    x = frames if isinstance(frames, Tensor) else torch.tensor(np.ascontiguousarray(frames))
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T,H,W,3], got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float().div(255)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float frames must be [T,3,H,W] in [-1,1], got {tuple(x.shape)}")
    return x.float().add(1).div(2).clamp(0, 1)


def json_float(x: float | Tensor) -> float | str | None:
    """JSON-safe number: finite -> float, +-inf -> ``"inf"`` / ``"-inf"``, NaN -> None."""
    x = float(x)
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def unavailable(reason: str) -> dict[str, str]:
    """The report entry for a metric that cannot be computed (never a made-up number)."""
    return {"status": "unavailable", "reason": reason}


@dataclass
class RegionBoxes:
    """Regions as (x0, y0, x1, y1) fractions of a face-centred square frame.

    Defaults fit LRS3-style crops as ``data.faces.square_crop_box`` makes them (margin 0.5: the dlib face box
    spans about 0.25-0.75 of the side). dlib's 68 landmarks on such a crop of grace_hopper put the closed lips
    at x 0.41-0.58, y 0.61-0.65, the eyes at y 0.41-0.44 and the brows at y 0.34-0.41; ``mouth`` leaves room
    for an open jaw and small head motion, ``upper_face`` covers brows and eyes down to above the nose tip.
    """

    full: Frac = (0.0, 0.0, 1.0, 1.0)
    mouth: Frac = (0.3, 0.55, 0.7, 0.8)
    upper_face: Frac = (0.25, 0.28, 0.75, 0.5)

    def __post_init__(self) -> None:
        for f in fields(self):
            box = tuple(float(v) for v in getattr(self, f.name))
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(f"region {f.name}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
            setattr(self, f.name, box)

    def items(self) -> Iterator[tuple[str, Frac]]:
        """(name, box) pairs in field order."""
        return zip((f.name for f in fields(self)), astuple(self))

    @staticmethod
    def crop(frames: Tensor, box: Sequence[float]) -> Tensor:
        """The pixels of ``box`` (at least one) from ``[..., H, W]`` frames."""
        h, w = frames.shape[-2:]
        x0, y0 = min(round(box[0] * w), w - 1), min(round(box[1] * h), h - 1)
        x1, y1 = max(round(box[2] * w), x0 + 1), max(round(box[3] * h), y0 + 1)
        return frames[..., y0:y1, x0:x1]


class FidelityMetrics(nn.Module):
    """PSNR, SSIM and MS-SSIM (torchmetrics, data range 1) per region between predicted and target videos.

    PSNR is torchmetrics' default: the PSNR of the MSE pooled over all frames (``"inf"`` only if every frame is
    identical); SSIM and MS-SSIM are means over frames. MS-SSIM (5 scales, 11-px kernel) needs regions of at
    least 176 px; a region where any frame was too small reports it unavailable with torchmetrics' reason.
    """

    def __init__(self, regions: RegionBoxes | None = None) -> None:
        super().__init__()
        self.regions = regions or RegionBoxes()
        self.metrics = nn.ModuleDict(
            {
                name: nn.ModuleDict(
                    {
                        "psnr": PeakSignalNoiseRatio(data_range=1.0),
                        "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
                        "ms_ssim": MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0),
                    }
                )
                for name, _ in self.regions.items()
            }
        )
        self.ms_ssim_reason: dict[str, str] = {}

    @torch.no_grad()
    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add one video pair (same shape; see ``to_unit`` for the accepted layouts)."""
        p, t = to_unit(pred), to_unit(target)
        if p.shape != t.shape:
            raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
        for name, box in self.regions.items():
            m = self.metrics[name]
            rp, rt = (RegionBoxes.crop(x, box).to(m["psnr"].device) for x in (p, t))
            m["psnr"].update(rp, rt)
            m["ssim"].update(rp, rt)
            if name in self.ms_ssim_reason:
                continue
            try:
                m["ms_ssim"].update(rp, rt)
            except ValueError as err:
                self.ms_ssim_reason[name] = f"{name} region {rp.shape[-1]}x{rp.shape[-2]} px: {err}"

    def compute(self) -> dict[str, Any]:
        """``{"num_frames": n, region: {"psnr", "ssim", "ms_ssim"}}``; ms_ssim may be an unavailable entry."""
        n = int(self.metrics["full"]["ssim"].total)
        if n == 0:
            raise ValueError("FidelityMetrics.compute() called before any update")
        out: dict[str, Any] = {"num_frames": n}
        for name, m in self.metrics.items():
            out[name] = {"psnr": json_float(m["psnr"].compute()), "ssim": json_float(m["ssim"].compute())}
            reason = self.ms_ssim_reason.get(name)
            out[name]["ms_ssim"] = unavailable(reason) if reason else json_float(m["ms_ssim"].compute())
        return out

    def reset(self) -> None:
        """Clear all accumulated frames."""
        for m in self.metrics.values():
            for metric in m.values():
                metric.reset()
        self.ms_ssim_reason.clear()


def lpips_backbone_file(torch_home: str | os.PathLike, net_type: str = "alex") -> Path:
    """Where torchvision looks for the ImageNet backbone of ``net_type`` under a ``TORCH_HOME`` folder."""
    import torchvision

    url = getattr(torchvision.models, LPIPS_BACKBONES[net_type]).DEFAULT.url
    return Path(torch_home) / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


@contextmanager
def _hub_dir(path: Path) -> Iterator[None]:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


class LPIPS(nn.Module):
    """torchmetrics LPIPS, built only when the backbone file exists under ``torch_home`` (see
    ``lpips_backbone_file``; the linear heads ship with torchmetrics), so nothing is ever downloaded.

    Otherwise ``available`` is False and ``compute()`` returns an unavailable entry with the reason.
    """

    def __init__(
        self, torch_home: str | os.PathLike | None = None, net_type: Literal["alex", "vgg", "squeeze"] = "alex"
    ) -> None:
        super().__init__()
        self.metric: LearnedPerceptualImagePatchSimilarity | None = None
        self.reason = ""
        if net_type not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPS net_type must be one of {sorted(LPIPS_BACKBONES)}, got {net_type!r}")
        if torch_home is None:
            self.reason = "no torch_home configured for the LPIPS backbone weights"
            return
        path = lpips_backbone_file(torch_home, net_type)
        if not path.is_file():
            self.reason = f"LPIPS backbone weights not found: {path}"
            return
        try:
            # torchvision unpickles the file in full (its hub loader is not weights-only): only a file that the
            # weights-only loader accepts, tensors and plain types alone, gets that far
            torch.load(path, map_location="cpu", weights_only=True)
            with _hub_dir(path.parents[1]):
                self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
            self.reason = f"could not load LPIPS backbone {path}: {str(err).splitlines()[0][:200]}"

    @property
    def available(self) -> bool:
        """Whether the backbone was loaded."""
        return self.metric is not None

    @torch.no_grad()
    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add one video pair (no-op when unavailable)."""
        if self.metric is not None:
            p, t = (to_unit(x).to(self.metric.device) for x in (pred, target))
            self.metric.update(p, t)

    def compute(self) -> dict[str, Any]:
        """``{"status": "ok", "lpips": mean, "num_frames": n}`` or an unavailable entry."""
        if self.metric is None:
            return unavailable(self.reason)
        n = dim_zero_cat(self.metric.all_scores).numel() if self.metric.all_scores else 0
        if n == 0:
            raise ValueError("LPIPS.compute() called before any update")
        return {"status": "ok", "lpips": json_float(self.metric.compute()), "num_frames": n}

    def reset(self) -> None:
        """Clear all accumulated frames."""
        if self.metric is not None:
            self.metric.reset()
