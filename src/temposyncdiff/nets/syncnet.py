"""Lip-sync expert (SyncNet-style): lower-face frame stacks and mel windows -> L2-normalised embeddings.

Alignment: video window t holds frames t..t+F-1 (F = ``frames``); its audio window is the ``mel_window``
mel frames centred on the middle frame t + F//2 (mel frame round(k * mel_per_frame) stands for video
frame k, as in ``AudioFeatures.frame_windows``). With an ``offset`` o the audio window is centred on
frame t + F//2 + o instead (o > 0: audio taken from later). Mel outside the audio is silence.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from temposyncdiff.utils.weights import load_net, save_weights

SILENCE = math.log(1e-5)  # AudioFeatures' log-mel floor


def lower_face(frames: Tensor, top: float = 0.5, side: float = 0.0) -> Tensor:
    """Rows from ``round(top * H)`` to the bottom, columns without ``round(side * W)`` on each side, of frames ``[..., H, W]``."""
    cut = round(side * frames.shape[-1])
    return frames[..., round(top * frames.shape[-2]) :, cut : frames.shape[-1] - cut]


def mel_from_windows(mel_windows: Tensor, mel_per_frame: int = 4) -> Tensor:
    """Per-frame windows ``[..., T, n_mels, W]`` (``AudioFeatures.frame_windows``) -> log-mel ``[..., n_mels, T * mel_per_frame]``.

    Keeps each frame's own ``mel_per_frame`` columns, starting at its window centre.
    """
    w = mel_windows.shape[-1]
    return mel_windows[..., w // 2 : w // 2 + mel_per_frame].transpose(-3, -2).flatten(-2)


def mel_context(mel_windows: Tensor, mel_per_frame: int = 4) -> Tensor:
    """Per-frame windows ``[..., T, n_mels, W]`` -> contiguous log-mel ``[..., n_mels, W + (T-1) * mel_per_frame]``.

    Unlike ``mel_from_windows`` it keeps the context before the first and after the last frame: frame k's
    centre is column ``W // 2 + k * mel_per_frame``.
    """
    tail = mel_windows[..., 1:, :, -mel_per_frame:].transpose(-3, -2).flatten(-2)
    return torch.cat([mel_windows[..., 0, :, :], tail], dim=-1)


def _conv2d(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv1d(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """Two-stream lip-sync expert; ``forward(video, mel)`` gives sync logits for ``BCEWithLogits`` (1 = in sync).

    Video stream: ``[B,F,3,h,w]`` lower-face crops (``video_windows``), frames stacked as channels, conv
    stages halving the resolution down to ~4 px. Audio stream: ``[B,n_mels,mel_window]`` mel (``audio_windows``),
    BatchNorm over mel bins, 1D convs, linear. Both give unit-norm ``[B,dim]`` embeddings.
    """

    def __init__(
        self,
        image_size: int = 64,
        n_mels: int = 80,
        mel_window: int = 20,
        frames: int = 5,
        dim: int = 128,
        crop_top: float = 0.5,
        crop_side: float = 0.0,
        mel_per_frame: float = 4.0,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.config = dict(
            image_size=image_size,
            n_mels=n_mels,
            mel_window=mel_window,
            frames=frames,
            dim=dim,
            crop_top=crop_top,
            crop_side=crop_side,
            mel_per_frame=mel_per_frame,
            width=width,
        )
        self.frames, self.n_mels, self.mel_window = frames, n_mels, mel_window
        self.crop_top, self.crop_side, self.mel_per_frame = crop_top, crop_side, mel_per_frame
        self.crop_hw = (image_size - round(crop_top * image_size), image_size - 2 * round(crop_side * image_size))
        chans = [min(width * 2**i, 256) for i in range(max(1, int(math.log2(min(self.crop_hw) / 4))))]
        layers, cin = [], 3 * frames
        for c in chans:
            layers += _conv2d(cin, c, 2) + _conv2d(c, c, 1)
            cin = c
        self.video_net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, dim))
        aw = 4 * width
        self.audio_net = nn.Sequential(
            nn.BatchNorm1d(n_mels),
            *_conv1d(n_mels, aw, 1),
            *_conv1d(aw, aw, 2),
            *_conv1d(aw, 2 * aw, 2),
            nn.Flatten(),
            nn.Linear(2 * aw * ((mel_window + 3) // 4), dim),
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.logit_bias = nn.Parameter(torch.zeros(()))

    def embed_video(self, video: Tensor) -> Tensor:
        """``[B,F,3,h,w]`` lower-face crop stacks -> ``[B,dim]`` unit vectors."""
        if tuple(video.shape[1:]) != (self.frames, 3, *self.crop_hw):
            raise ValueError(
                f"SyncNet video input {tuple(video.shape)}, expected [B,{self.frames},3,{self.crop_hw[0]},{self.crop_hw[1]}]"
            )
        return F.normalize(self.video_net(video.flatten(1, 2)), dim=-1)

    def embed_audio(self, mel: Tensor) -> Tensor:
        """``[B,n_mels,mel_window]`` log-mel -> ``[B,dim]`` unit vectors."""
        if tuple(mel.shape[1:]) != (self.n_mels, self.mel_window):
            raise ValueError(f"SyncNet audio input {tuple(mel.shape)}, expected [B,{self.n_mels},{self.mel_window}]")
        return F.normalize(self.audio_net(mel), dim=-1)

    def score(self, video_emb: Tensor, audio_emb: Tensor) -> Tensor:
        """Sync logits from paired embeddings: exp(logit_scale) * cos(video, audio) + logit_bias."""
        return self.logit_scale.exp() * (video_emb * audio_emb).sum(-1) + self.logit_bias

    def forward(self, video: Tensor, mel: Tensor) -> Tensor:
        """Sync logits ``[B]`` for video stacks and mel windows (see ``score``)."""
        return self.score(self.embed_video(video), self.embed_audio(mel))

    def video_windows(self, frames: Tensor) -> Tensor:
        """Face-centred frames ``[..., T,3,H,W]`` -> lower-face stacks ``[..., T-F+1, F,3,h,w]`` (empty if T < F)."""
        crop = lower_face(frames, self.crop_top, self.crop_side)
        if tuple(crop.shape[-2:]) != self.crop_hw:
            raise ValueError(
                f"frames are {tuple(frames.shape[-2:])}, SyncNet expects {self.config['image_size']} px squares"
            )
        n = crop.shape[-4] - self.frames + 1
        if n <= 0:
            return crop.new_empty((*crop.shape[:-4], 0, self.frames, *crop.shape[-3:]))
        return crop.unfold(-4, self.frames, 1).movedim(-1, -4)

    def audio_windows(self, mel: Tensor) -> Tensor:
        """Log-mel ``[..., n_mels, M]`` -> ``[..., N, n_mels, mel_window]``, window t aligned with video window t.

        N = round(M / mel_per_frame) - F + 1: one window per video window the audio covers.
        """
        n = max(0, round(mel.shape[-1] / self.mel_per_frame) - self.frames + 1)
        centres = torch.round((torch.arange(n, device=mel.device) + self.frames // 2) * self.mel_per_frame).long()
        idx = centres[:, None] + torch.arange(self.mel_window, device=mel.device) - self.mel_window // 2
        lo = min(0, int(idx.min())) if n else 0
        hi = max(mel.shape[-1], int(idx.max()) + 1) if n else mel.shape[-1]
        padded = F.pad(mel, (-lo, hi - mel.shape[-1]), value=SILENCE)
        return padded[..., idx - lo].transpose(-3, -2)

    def windows(self, frames: Tensor, mel: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Aligned pairs from one clip (or a batch with equal T): video window t with audio window t + ``offset``.

        ``frames [..., T,3,H,W]``, ``mel [..., n_mels, M]`` (full log-mel, ``mel_per_frame`` per frame; see
        ``mel_from_windows``) -> ``([..., N,F,3,h,w], [..., N,n_mels,mel_window])`` over every t where both exist.
        """
        v, a = self.video_windows(frames), self.audio_windows(mel)
        start = max(0, -offset)
        n = max(0, min(v.shape[-5], a.shape[-3] - offset) - start)
        return v.narrow(-5, start if n else 0, n), a.narrow(-3, start + offset if n else 0, n)


def export_expert(model: SyncNet, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write the expert as a weights-only ``syncnet`` export (``utils.weights.save_weights``)."""
    return save_weights(path, "syncnet", model, meta)


def load_expert(path: str | os.PathLike) -> SyncNet:
    """Rebuild a SyncNet (eval mode) from a ``syncnet`` export; bad files raise ``WeightsError``."""
    return load_net(path, "syncnet")[0]
