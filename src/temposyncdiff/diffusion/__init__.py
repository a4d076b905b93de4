"""Diffusion core: noise schedule and targets (``schedule``), losses (``losses``), samplers and long audio (``sampling``)."""

from temposyncdiff.diffusion.sampling import generate_long, make_sampler, sample, seam_error, window_plan
from temposyncdiff.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "generate_long", "make_sampler", "sample", "seam_error", "window_plan"]
