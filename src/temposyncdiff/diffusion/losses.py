"""Training losses over windows ``[B,T,C,h,w]``: the noise-prediction loss and optional auxiliary terms.

Auxiliary terms act on the net's x0 estimate (``NoiseSchedule.to_x0``): identity anchoring of the upper
face against the reference, temporal regularisation of frame-to-frame differences against the ground truth,
a sync loss from the frozen lip-sync expert on decoded frames, and the lip shapes read back from it
(``Denoiser.read_lips``) against the shapes the net was asked to draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from temposyncdiff.nets.syncnet import mel_context
from temposyncdiff.regions import crop


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

    ``weight [B]`` scales samples (e.g. min-SNR); ``pixel_weight [h,w]`` (mean-normalised here) emphasises regions (``regions.region_weight``).
    """
    err = weigh_pixels((pred - target).pow(2), pixel_weight)
    return _masked_mean(err.flatten(2).mean(-1), mask, weight)


def weigh_pixels(err: Tensor, pixel_weight: Tensor | None) -> Tensor:
    """Per-pixel errors ``[..., h, w]`` times ``pixel_weight [h,w]`` normalised to mean 1 (unchanged for None)."""
    return err if pixel_weight is None else err * (pixel_weight / pixel_weight.mean())


def identity_loss(
    x0_hat: Tensor, ref_latent: Tensor, mask: Tensor, box: Sequence[float], weight: Tensor | None = None
) -> Tensor:
    """L1 between the predicted upper face (latent cells of ``box``, ``regions.Box``) of every frame and the
    reference's."""
    err = (crop(x0_hat, box) - crop(ref_latent[:, None], box)).abs().flatten(2).mean(-1)
    return _masked_mean(err, mask, weight)


def temporal_loss(x0_hat: Tensor, x0: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """MSE between predicted and ground-truth frame-to-frame differences (pairs of real frames)."""
    d_hat, d = x0_hat[:, 1:] - x0_hat[:, :-1], x0[:, 1:] - x0[:, :-1]
    return _masked_mean((d_hat - d).pow(2).flatten(2).mean(-1), mask[:, 1:] & mask[:, :-1], weight)


def lip_shape_loss(read: Tensor, lips: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """MSE between lip shapes ``[B,T,lip_dim]`` (standardised) read from latents and the ones they should show."""
    return _masked_mean((read - lips).pow(2).mean(-1), mask, weight)


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
