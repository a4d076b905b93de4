"""Training losses over windows ``[B,T,C,h,w]``: the noise-prediction loss and optional auxiliary terms.

Auxiliary terms act on the net's x0 estimate (``NoiseSchedule.to_x0``): identity anchoring of the upper
face against the reference, temporal regularisation of frame-to-frame differences against the ground truth,
and a sync loss from the frozen lip-sync expert on decoded frames.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from temposyncdiff.nets.syncnet import mel_context

# (top, bottom, left, right) fractions of the face-centred frame (the training losses' convention)
DEFAULT_REGIONS = {"mouth": (0.58, 0.82, 0.3, 0.7), "upper": (0.0, 0.5, 0.0, 1.0)}


def _masked_mean(err: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean of per-frame errors ``[B,T]`` over ``mask``, each sample scaled by ``weight [B]``."""
    m = mask.to(err.dtype)
    if weight is not None:
        err = err * weight[:, None]
    return (err * m).sum() / m.sum().clamp_min(1.0)


def diffusion_loss(
    pred: Tensor, target: Tensor, mask: Tensor, weight: Tensor | None = None, pixel_weight: Tensor | None = None
) -> Tensor:
    """MSE between prediction and target over frames where ``mask [B,T]`` is True (real, not given).

    ``weight [B]`` scales samples (e.g. min-SNR); ``pixel_weight [h,w]`` (mean-normalised here) emphasises regions.
    """
    err = weigh_pixels((pred - target).pow(2), pixel_weight)
    return _masked_mean(err.flatten(2).mean(-1), mask, weight)


def weigh_pixels(err: Tensor, pixel_weight: Tensor | None) -> Tensor:
    """Per-pixel errors ``[..., h, w]`` times ``pixel_weight [h,w]`` normalised to mean 1 (unchanged for None)."""
    return err if pixel_weight is None else err * (pixel_weight / pixel_weight.mean())


def region_weight(
    height: int, width: int, box: tuple[float, float, float, float], factor: float, device: torch.device | str = "cpu"
) -> Tensor | None:
    """``[height, width]`` map: ``factor`` inside ``box`` (top, bottom, left, right fractions), 1 elsewhere.

    None for ``factor == 1`` (no weighting: the losses' unweighted path).
    """
    if factor == 1.0:
        return None
    w = torch.ones(height, width, device=device)
    w[region_rows(height, box[:2]), region_rows(width, box[2:])] = factor
    return w


def region_rows(height: int, rows: tuple[float, float]) -> slice:
    """Index slice for fractions ``(start, end)`` of ``height`` (at least one row)."""
    return slice(round(rows[0] * height), max(round(rows[1] * height), round(rows[0] * height) + 1))


def crop(x: Tensor, box: tuple[float, float, float, float]) -> Tensor:
    """Region ``(top, bottom, left, right)`` (fractions of the side) of images or latents ``[..., H, W]``."""
    return x[..., region_rows(x.shape[-2], box[:2]), region_rows(x.shape[-1], box[2:])]


def identity_loss(x0_hat: Tensor, ref_latent: Tensor, mask: Tensor, rows: tuple[float, float] = (0.0, 0.5),
                  weight: Tensor | None = None) -> Tensor:  # fmt: skip
    """L1 between the predicted upper face (latent rows ``rows``) of every frame and the reference's."""
    r = region_rows(x0_hat.shape[-2], rows)
    err = (x0_hat[..., r, :] - ref_latent[:, None, :, r, :]).abs().flatten(2).mean(-1)
    return _masked_mean(err, mask, weight)


def temporal_loss(x0_hat: Tensor, x0: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """MSE between predicted and ground-truth frame-to-frame differences (pairs of real frames)."""
    d_hat, d = x0_hat[:, 1:] - x0_hat[:, :-1], x0[:, 1:] - x0[:, :-1]
    return _masked_mean((d_hat - d).pow(2).flatten(2).mean(-1), mask[:, 1:] & mask[:, :-1], weight)


def sync_loss(expert: nn.Module, frames: Tensor, mel_windows: Tensor, mask: Tensor) -> Tensor:
    """BCE pushing the expert's sync logit up for every video window of decoded frames ``[B,T,3,H,W]``.

    Audio windows are cut from the clip's mel context (``mel_context``) centred on each window's middle
    frame, as the expert was trained; windows whose audio leaves the context or that hold padded frames are skipped.
    """
    mpf, mw, nf = int(expert.mel_per_frame), expert.mel_window, expert.frames
    mel = mel_context(mel_windows, mpf)  # [B, n_mels, L]
    video = expert.video_windows(frames)  # [B, N, F, 3, h, w]
    n = video.shape[1]
    start = mel_windows.shape[-1] // 2 + (torch.arange(n, device=frames.device) + nf // 2) * mpf - mw // 2
    ok = (start >= 0) & (start + mw <= mel.shape[-1])
    real = mask.unfold(1, nf, 1).all(-1)[:, ok]  # [B, N_ok]
    idx = start[ok][:, None] + torch.arange(mw, device=frames.device)
    audio = mel[:, :, idx].permute(0, 2, 1, 3)  # [B, N_ok, n_mels, mw]
    if not real.any():
        return frames.new_zeros(())
    logits = expert(video[:, ok][real], audio[real])
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
