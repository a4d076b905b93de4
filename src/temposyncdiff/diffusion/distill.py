"""Trajectory distillation of the frozen teacher into a few-step x0-predicting student, and the student's sampler.

For every training clip the teacher solves its guided probability-flow ODE once (``teacher_couplings``: DPM-Solver++
or DDIM with classifier-free guidance folded in) from a seeded noise ``z`` to its sample ``x0*``; the pairs are kept
in ``Couplings``. The student is trained on the straight DDIM interpolants between each pair,
``x_t = sqrt(a_t) x0* + sqrt(1 - a_t) z`` at the timesteps its 1/2/4-step samplers visit (``student_timesteps``),
to return ``x0*`` (``trajectory_loss``). ``student_sampler`` (deterministic DDIM on x0 predictions) visits exactly
those interpolants when the student is exact, with one net call per step and no unconditional pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from temposyncdiff.diffusion.losses import diffusion_loss
from temposyncdiff.diffusion.sampling import make_sampler, sample
from temposyncdiff.diffusion.schedule import NoiseSchedule


def student_sampler(train_config: dict) -> SchedulerMixin:
    """DDIM (eta 0) on x0 predictions over trailing timesteps; the last step returns the x0 estimate itself."""
    return make_sampler(
        "ddim", train_config, prediction_type="sample", timestep_spacing="trailing", set_alpha_to_one=True
    )


def student_timesteps(train_config: dict, steps: Sequence[int]) -> Tensor:
    """Sorted union of the timesteps ``student_sampler`` visits for each step count in ``steps``."""
    grid: set[int] = set()
    for n in steps:
        scheduler = student_sampler(train_config)
        scheduler.set_timesteps(n)
        grid |= set(scheduler.timesteps.tolist())
    return torch.tensor(sorted(grid))


@torch.no_grad()
def teacher_couplings(
    teacher: Callable[..., Tensor],
    shape: tuple[int, ...],
    cond: dict,
    scheduler: SchedulerMixin,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``(z, x0*)``: seeded noise and the teacher's guided ODE solution from it (``sample`` draws ``z`` first)."""
    device = cond["ref_latent"].device
    twin = torch.Generator(generator.device).set_state(generator.get_state())
    noise = torch.randn(shape, generator=twin, device=device) * scheduler.init_noise_sigma
    return noise, sample(teacher, shape, cond, scheduler, steps, guidance_scale, generator, device)


def trajectory_loss(
    student: Callable[..., Tensor],
    schedule: NoiseSchedule,
    noise: Tensor,
    target: Tensor,
    t: Tensor,
    mask: Tensor,
    cond: dict,
    pixel_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(MSE of the student's x0 at the interpolant ``x_t`` of ``(noise, target)`` vs ``target`` over ``mask``, x0).

    ``pixel_weight [h,w]`` emphasises regions (``losses.region_weight``).
    """
    x0_hat = student(schedule.add_noise(target, noise, t), t, **cond)
    return diffusion_loss(x0_hat, target, mask, pixel_weight=pixel_weight), x0_hat


@dataclass
class Couplings:
    """Teacher couplings per clip (key ``"<utterance id>@<start frame>"``) and the conditions the teacher saw."""

    keys: list[str]
    noise: Tensor  # [M,T,C,h,w] z
    sample: Tensor  # [M,T,C,h,w] teacher's x0*
    ref_latent: Tensor  # [M,C,h,w]
    visemes: Tensor  # [M,T] tokens given to the teacher (labels or its audio head's)
    known: Tensor  # [M] number of leading frames given as motion frames
    lips: Tensor  # [M,T,L] standardised lip shapes given to the teacher (L = 0: a net without lip_dim)

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}

    def rows(self, keys: Sequence[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The tensors of ``keys`` (in that order) on ``device``; a clear error for a clip without a coupling."""
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"no teacher coupling for clip(s) {missing[:3]}: the couplings were built for other data")
        idx = torch.tensor([self.index[k] for k in keys])
        return {f.name: getattr(self, f.name)[idx].to(device) for f in fields(self) if f.name != "keys"}

    def state(self) -> dict:
        """Plain dict for ``torch.save`` (``weights_only`` loadable)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def cat(cls, parts: Sequence[dict]) -> Couplings:
        """Join per-batch dicts with the dataclass's fields."""
        return cls(
            **{
                f.name: [k for p in parts for k in p["keys"]]
                if f.name == "keys"
                else torch.cat([p[f.name].cpu() for p in parts])
                for f in fields(cls)
            }
        )
