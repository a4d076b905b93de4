"""First stages: frames <-> latents. FrameVAE is the interface; TinyVAE the one trained here (mean/log-variance
encoder, residual blocks, group norm, optional mid attention); nets/pretrained_vae.py wraps diffusers' pretrained ones."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F


def _groups(ch: int, max_groups: int = 8) -> int:
    return math.gcd(ch, max_groups)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Single-head self-attention over spatial positions (used at the lowest resolution only)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(_groups(ch), ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        y = F.scaled_dot_product_attention(*qkv)
        return x + self.out(rearrange(y, "b 1 (h w) c -> b c h w", h=x.shape[-2]))


def _mid(ch: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), *([Attention(ch), ResBlock(ch, ch)] if attention else []))


LOGVAR_RANGE = (-30.0, 20.0)  # posterior log-variances are clamped to this


class FrameVAE(nn.Module):
    """What every first stage offers: ``encode`` -> (mean, log-variance), ``decoder`` (unscaled latents -> frames),
    ``downsample``, ``latent_channels`` and the latent ``scale_factor`` fitted on training data."""

    decoder: nn.Module
    downsample: int
    latent_channels: int

    def __init__(self) -> None:
        super().__init__()
        # latents are multiplied by this before diffusion (fitted on training data: 1 / std of the means)
        self.register_buffer("scale_factor", torch.ones(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames ``[B,3,H,W]`` in [-1,1] -> (mean, log-variance), each ``[B,C,H/f,W/f]``."""
        raise NotImplementedError

    @staticmethod
    def posterior(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An encoder's ``[B,2C,h,w]`` output -> (mean, log-variance clamped to ``LOGVAR_RANGE``)."""
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> frames in roughly [-1,1]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z), mean, logvar

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Frames -> scaled latents for diffusion (posterior mean times ``scale_factor``)."""
        return self.encode(x)[0] * self.scale_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> frames clamped to [-1,1]."""
        return self.decode(z / self.scale_factor).clamp(-1, 1)


class TinyVAE(FrameVAE):
    """Encoder -> (mean, log-variance) -> decoder; ``downsample`` = patch_size * 2 ** (len(channels) - 1)."""

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128, 128),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        decoder_channels: tuple[int, ...] | None = None,
        mid_attention: bool = False,
        patch_size: int = 2,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        dec = tuple(decoder_channels or channels)
        self.config = dict(
            channels=list(channels),
            latent_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            decoder_channels=list(dec),
            mid_attention=mid_attention,
            patch_size=patch_size,
        )
        self.latent_channels = latent_channels
        self.downsample = patch_size * 2 ** (len(channels) - 1)
        # a pixel-(un)shuffle stem: no convolution runs at full resolution, where they cost most
        enc: list[nn.Module] = [nn.PixelUnshuffle(patch_size), nn.Conv2d(3 * patch_size**2, channels[0], 3, padding=1)]
        for i, ch in enumerate(channels):
            cin = channels[max(i - 1, 0)]
            enc += [ResBlock(cin if j == 0 else ch, ch) for j in range(num_res_blocks)]
            if i < len(channels) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        top = channels[-1]
        enc += [
            _mid(top, mid_attention),
            nn.GroupNorm(_groups(top), top),
            nn.SiLU(),
            nn.Conv2d(top, 2 * latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)
        rev = dec[::-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, rev[0], 3, padding=1), _mid(rev[0], mid_attention)]
        for i, ch in enumerate(rev):
            layers += [ResBlock(ch, ch) for _ in range(num_res_blocks)]
            if i < len(rev) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, rev[i + 1], 3, padding=1)]
        layers += [
            nn.GroupNorm(_groups(rev[-1]), rev[-1]),
            nn.SiLU(),
            nn.Conv2d(rev[-1], 3 * patch_size**2, 3, padding=1),
        ]
        layers.append(nn.PixelShuffle(patch_size))
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.posterior(self.encoder(x))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per sample, summed over latent elements, averaged over the batch."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=(1, 2, 3)).mean()
