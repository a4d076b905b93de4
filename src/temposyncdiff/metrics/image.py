"""Region-aware fidelity (PSNR, SSIM, MS-SSIM from torchmetrics) and LPIPS that never downloads weights.

Frames are float ``[T,3,H,W]`` in [-1,1] or uint8 ``[T,H,W,3]`` (decoded video); both are scored on [0,1].
``compute()`` outputs are JSON-ready: plain floats via ``json_float`` (PSNR of identical inputs is ``"inf"``),
ints, and ``{"status": "unavailable", "reason": ...}`` wherever a number cannot be computed honestly.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
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

from temposyncdiff.regions import RegionBoxes, crop

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


class FidelityMetrics(nn.Module):
    """PSNR, SSIM and MS-SSIM (torchmetrics, data range 1) per region between predicted and target videos.

    PSNR is torchmetrics' default: the PSNR of the MSE pooled over all frames (``"inf"`` only if every frame is
    identical); SSIM and MS-SSIM are means over frames. MS-SSIM (5 scales, 11-px kernel) needs regions of at
    least 176 px; a region where any frame was too small reports it unavailable with torchmetrics' reason.
    """

    def __init__(self, regions: RegionBoxes) -> None:
        super().__init__()
        self.regions = regions
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
            rp, rt = (crop(x, box).to(m["psnr"].device) for x in (p, t))
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
