"""Sampling with diffusers schedulers, classifier-free guidance on the audio condition, and long-audio windows.

Long audio: windows of T frames; every window after the first starts ``overlap`` frames before the end of
the frames made so far and receives those frames as motion frames (clean latents + known mask), so the net
continues the motion instead of starting afresh; the last window is moved back to end at the last frame
(more known frames). Every frame is generated exactly once; the audio embeddings are computed over the whole
utterance once, so the condition has no seam either. ``metrics.temporal.seam_error`` measures what is left at the borders.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

SAMPLERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "lcm": (LCMScheduler, {}),
}
GUIDED = ("audio_emb", "visemes", "lips")  # the condition that classifier-free guidance drops


def make_sampler(kind: str, train_config: dict, **overrides) -> SchedulerMixin:
    """A fresh diffusers scheduler of ``kind`` (ddpm | ddim | dpmpp | lcm) on the training schedule's config."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r} ({' | '.join(SAMPLERS)})")
    cls, defaults = SAMPLERS[kind]
    # latents are not in [-1, 1]: never clip x0 (diffusers' DDPM/DDIM default clip_sample=True), whatever the config omits
    return cls.from_config({"clip_sample": False, **dict(train_config)}, **{**defaults, **overrides})


@torch.no_grad()
def sample(
    denoise_fn: Callable[..., Tensor],
    shape: tuple[int, ...],
    cond: dict,
    scheduler: SchedulerMixin,
    steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Run ``scheduler`` for ``steps`` from Gaussian noise of ``shape``; ``denoise_fn(x_t, t [B], **cond)``."""
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma
    return run_steps(denoise_fn, x, cond, scheduler, guidance_scale, generator)


@torch.no_grad()
def run_steps(
    denoise_fn: Callable[..., Tensor],
    x: Tensor,
    cond: dict,
    scheduler: SchedulerMixin,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Step ``x`` through the scheduler's timesteps (already set); ``denoise_fn(x_t, t [B], **cond)``.

    With ``guidance_scale != 1`` each step also evaluates the net without the ``GUIDED`` condition and
    returns uncond + scale * (cond - uncond); at scale 1 there is exactly one net call per step.
    """
    uncond = {**cond, **{k: None for k in GUIDED}}
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        tt = t.to(x.device).expand(x.shape[0])
        pred = denoise_fn(x_in, tt, **cond)
        if guidance_scale != 1.0:
            base = denoise_fn(x_in, tt, **uncond)
            pred = base + guidance_scale * (pred - base)
        x = scheduler.step(pred, t, x, **kwargs).prev_sample
    return x


def next_window(end: int, window: int, overlap: int, num_frames: int | None = None) -> tuple[int, int]:
    """``(start, known)`` of the window after frames [0, end) exist: the first starts at 0, the others ``overlap``
    frames before ``end``, moved back to end on the last frame when the length ``num_frames`` is known (offline,
    or once a stream's audio has ended). The one placement rule of offline and streaming generation."""
    if end == 0:
        return 0, 0
    start = end - overlap if num_frames is None else min(end - overlap, num_frames - window)
    return start, end - start


def window_plan(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, known)`` per window (``next_window``): it covers frames [start, start + window), the first
    ``known`` are given. Clips shorter than a window get one window (padded by ``generate_long``).
    """
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    plan, end = [next_window(0, window, overlap)], window
    while end < num_frames:
        plan.append(next_window(end, window, overlap, num_frames))
        end = plan[-1][0] + window
    return plan


def window_borders(num_frames: int, window: int, overlap: int) -> list[int]:
    """First newly generated frame of every window after the first (where a seam could be) of a ``num_frames`` clip."""
    plan = window_plan(max(num_frames, window), window, overlap)
    return [start + known for start, known in plan[1:]]


def _pad_time(x: Tensor | None, length: int) -> Tensor | None:
    """Repeat the last frame along dim 1 up to ``length``."""
    if x is None or x.shape[1] >= length:
        return x
    return torch.cat([x, x[:, -1:].expand(-1, length - x.shape[1], *x.shape[2:])], dim=1)


@torch.no_grad()
def generate_long(
    denoise_fn: Callable[..., Tensor],
    ref_latent: Tensor,
    audio_emb: Tensor | None,
    visemes: Tensor | None,
    num_frames: int,
    window: int,
    overlap: int,
    latent_shape: tuple[int, int, int],
    make_scheduler: Callable[[], SchedulerMixin],
    steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    pose: Tensor | None = None,
    lips: Tensor | None = None,
) -> Tensor:
    """Latents ``[B, num_frames, C, h, w]`` for per-frame conditions of any length (``[B, num_frames, ...]``).

    Windows follow ``window_plan``; each gets the previous frames as motion frames (see module docstring).
    ``pose`` (per-frame pose source latents) is passed to nets built with a ``pose_mask``; without it such a net
    takes the reference as every frame's pose (a photo brought to life). ``lips`` (standardised lip shapes
    ``[B, num_frames, lip_dim]``) replace the lip-conditioned net's own prediction (e.g. the truth's, to tell how
    well the net draws a given shape from how well it predicts one).
    """
    b, device = ref_latent.shape[0], ref_latent.device
    length = max(num_frames, window)
    if pose is None and getattr(denoise_fn, "pose_mask", None) is not None:
        pose = ref_latent[:, None].expand(-1, length, -1, -1, -1)
    audio_emb, visemes, pose, lips = (_pad_time(x, length) for x in (audio_emb, visemes, pose, lips))
    out = torch.zeros(b, length, *latent_shape, device=device)
    for start, known in window_plan(length, window, overlap):
        sl = slice(start, start + window)
        mask = torch.zeros(b, window, dtype=torch.bool, device=device)
        mask[:, :known] = True
        cond = {
            "ref_latent": ref_latent,
            "audio_emb": None if audio_emb is None else audio_emb[:, sl],
            "visemes": None if visemes is None else visemes[:, sl],
            "motion": out[:, sl].clone(),
            "motion_mask": mask,
        }
        if pose is not None:
            cond["pose"] = pose[:, sl]
        if lips is not None:
            cond["lips"] = lips[:, sl]
        x = sample(
            denoise_fn, (b, window, *latent_shape), cond, make_scheduler(), steps, guidance_scale, generator, device
        )
        out[:, start + known : start + window] = x[:, known:]
    return out[:, :num_frames]
