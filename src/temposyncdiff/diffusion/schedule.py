"""The training noise schedule and objective, on a diffusers ``DDPMScheduler`` so training and sampling agree.

``NoiseSchedule.scheduler.config`` is what the samplers (``diffusion.sampling.make_sampler``) are built from:
same betas, same prediction type. Prediction types: ``epsilon`` (noise), ``v_prediction``
(v = sqrt(a) * noise - sqrt(1 - a) * x0) and ``sample`` (x0). Epsilon prediction is ill-conditioned at the
near-zero terminal SNR of ``squaredcos_cap_v2``; pair it with ``scaled_linear`` or ``linear``.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# the schedule settings an export stores so samplers can be rebuilt without the training config
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "timestep_spacing",
)


def _expand(x: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> broadcastable against ``like [B, ...]``."""
    return x.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Forward process q(x_t | x_0), regression targets and per-sample loss weights (optional min-SNR-gamma)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "v_prediction",
        timestep_spacing: str = "trailing",
        snr_gamma: float | None = 5.0,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            clip_sample=False,
        )
        self.prediction_type, self.snr_gamma = prediction_type, snr_gamma
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()

    def sample_timesteps(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` uniform training timesteps (int64)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(device)

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        return _expand(self.alphas_cumprod[t.cpu()], like)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise for ``x0 [B, ...]`` and ``t [B]``."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the net regresses: noise, v or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The net's prediction turned into an estimate of x0 (for auxiliary losses)."""
        if self.prediction_type == "sample":
            return pred
        ab = self._ab(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - ab).sqrt() * pred) / ab.sqrt().clamp_min(1e-4)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * pred

    def snr(self, t: Tensor) -> Tensor:
        ab = self.alphas_cumprod[t.cpu()].to(t.device)
        return ab / (1 - ab)

    def loss_weight(self, t: Tensor) -> Tensor:
        """``[B]`` weights: min-SNR-gamma (Hang et al. 2023) expressed for the prediction type, or ones."""
        if not self.snr_gamma:
            return torch.ones(len(t), device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr.clamp_min(1e-8)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped
