"""Diffusion core: schedule and targets, losses, samplers with guidance, long-audio windows."""

from temposyncdiff.diffusion.sampling import generate_long, make_sampler, sample, window_plan
from temposyncdiff.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "generate_long", "make_sampler", "sample", "window_plan"]
