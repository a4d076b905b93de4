"""Temporal behaviour: frame-difference flicker (and its gap to ground truth), seam error at window borders, and
mouth motion against the ground truth's (a lip-sync check that needs no expert weights).

All differences are mean absolute pixel differences on the [0,1] scale (frames as ``metrics.image.to_unit``
accepts them). ``compute()`` and ``seam_error`` return plain floats / ints (``json_float`` for ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from temposyncdiff.metrics.image import json_float, to_unit
from temposyncdiff.regions import crop


def frame_differences(frames: Tensor | np.ndarray) -> Tensor:
    """``[T-1]`` mean absolute differences between consecutive frames; entry ``b - 1`` is frames b-1 -> b."""
    x = to_unit(frames)
    if len(x) < 2:
        raise ValueError(f"need at least 2 frames, got {len(x)}")
    return x.diff(dim=0).abs().mean(dim=(1, 2, 3))


def flicker(frames: Tensor | np.ndarray) -> float:
    """Mean absolute frame-to-frame difference on the [0,1] scale (0 for a still video)."""
    return float(frame_differences(frames).mean())


def seam_error(frames: Tensor | np.ndarray, borders: Sequence[int]) -> dict[str, Any]:
    """Frame difference across window borders (frame b-1 -> b for each border b) vs inside windows.

    Returns ``border``, ``inside`` (means), ``ratio`` = border / inside (a seam shows as ratio >> 1; ``"inf"``
    when only borders change, None when nothing changes) and ``num_borders``.
    """
    d = frame_differences(frames).double()
    at = sorted(set(int(b) for b in borders))
    if not at or at[0] < 1 or at[-1] > len(d):
        raise ValueError(f"borders must be frame indices in [1, {len(d)}], got {list(borders)}")
    is_border = torch.zeros(len(d), dtype=torch.bool)
    is_border[[b - 1 for b in at]] = True
    if is_border.all():
        raise ValueError("every frame pair is a border: nothing inside windows to compare with")
    border, inside = float(d[is_border].mean()), float(d[~is_border].mean())
    ratio = border / inside if inside > 0 else (float("inf") if border > 0 else float("nan"))
    return {"border": border, "inside": inside, "ratio": json_float(ratio), "num_borders": len(at)}


def seam_ratio(frames: Tensor | np.ndarray, borders: Sequence[int]) -> float:
    """``seam_error``'s ratio as a float to average over clips: NaN when the clip has no window border (it fits in
    one window) or does not change at all, inf when only its borders change."""
    if not borders:
        return float("nan")
    ratio = seam_error(frames, borders)["ratio"]
    return float("nan") if ratio is None else float(ratio)


class FlickerMetric(Metric):
    """Flicker of predicted and ground-truth videos: ``update(pred, target)`` once per clip (same frame count).

    ``compute()`` -> ``flicker_pred``, ``flicker_gt`` (means over all frame pairs), ``flicker_gap`` = pred - gt
    (positive: the model flickers more than real video) and ``num_clips``; values are None before any update.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("pred_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gt_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pairs", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_clips", default=torch.tensor(0), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add one clip's predicted and ground-truth frames."""
        dp, dt = frame_differences(pred), frame_differences(target)
        if len(dp) != len(dt):
            raise ValueError(f"pred has {len(dp) + 1} frames, target {len(dt) + 1}")
        self.pred_sum += dp.sum().double().to(self.device)
        self.gt_sum += dt.sum().double().to(self.device)
        self.num_pairs += len(dp)
        self.num_clips += 1

    def compute(self) -> dict[str, Any]:
        """Plain floats / ints for the eval report."""
        n = int(self.num_pairs)
        pred, gt = (float(s) / n if n else None for s in (self.pred_sum, self.gt_sum))
        gap = pred - gt if n else None
        return {"flicker_pred": pred, "flicker_gt": gt, "flicker_gap": gap, "num_clips": int(self.num_clips)}


def mouth_signal(frames: Tensor | np.ndarray, box: Sequence[float]) -> Tensor:
    """``[T]`` mean luminance of the mouth region ``box`` (``regions.Box``) per frame, on [0,1].

    An opening mouth shows its dark cavity (and teeth), so the signal moves with articulation.
    """
    x = crop(to_unit(frames), box).double()
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))


class MouthMotion(Metric):
    """How a generated mouth moves against the ground truth's: ``update(pred, target)`` once per clip.

    Per clip, over frames: the Pearson correlation of the two ``mouth_signal`` series (1: opens and closes when
    the truth does; about 0 for a still mouth or one moving to other speech) and the ratio of their standard
    deviations (1: as much motion as the truth). ``compute()`` -> ``corr`` and ``amplitude`` (means over clips
    with a moving ground truth and at least 3 frames; None without any) and ``num_clips``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, box: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.box = tuple(box)
        self.add_state("corr_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("amp_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_clips", default=torch.tensor(0), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        p, t = mouth_signal(pred, self.box), mouth_signal(target, self.box)
        if len(p) != len(t):
            raise ValueError(f"pred has {len(p)} frames, target {len(t)}")
        if len(t) < 3 or float(t.std()) < 1e-6:
            return  # a still truth (or too short a clip) says nothing about sync
        amp = float(p.std() / t.std())
        corr = float(torch.corrcoef(torch.stack([p, t]))[0, 1]) if float(p.std()) > 1e-6 else 0.0
        self.corr_sum += corr
        self.amp_sum += amp
        self.num_clips += 1

    def compute(self) -> dict[str, Any]:
        n = int(self.num_clips)
        return {
            "corr": float(self.corr_sum) / n if n else None,
            "amplitude": float(self.amp_sum) / n if n else None,
            "num_clips": n,
        }
