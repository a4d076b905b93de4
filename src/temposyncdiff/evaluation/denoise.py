"""The denoising protocol: latents noised to a level and denoised back, scored against the VAE reconstruction."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from temposyncdiff.diffusion.sampling import make_sampler, run_steps, window_plan
from temposyncdiff.diffusion.schedule import NoiseSchedule
from temposyncdiff.evaluation.clips import Clip
from temposyncdiff.evaluation.models import runs
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings
from temposyncdiff.metrics.image import LPIPS, FidelityMetrics, to_unit, unavailable
from temposyncdiff.regions import RegionBoxes


@torch.no_grad()
def denoise_from(
    net: Callable[..., Tensor],
    x_t: Tensor,
    t: int,
    cond: dict,
    sampler: str,
    schedule: dict,
    steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latents noised to training timestep ``t`` -> x0 in ``steps`` sampler steps on evenly spaced timesteps t .. 0.

    Uses the diffusers scheduler with custom timesteps; ``ddim`` runs as first-order DPM-Solver++ (the same
    deterministic update) because ``DDIMScheduler`` takes no custom timesteps. x0 is not clipped unless ``schedule``
    says so (latents are not bounded; the training schedule has ``clip_sample=False``). Steps and guidance:
    ``diffusion.sampling.run_steps``, as ``sample``.
    """
    kind, extra = ("dpmpp", {"solver_order": 1}) if sampler == "ddim" else (sampler, {})
    scheduler = make_sampler(kind, {"clip_sample": False, **schedule}, **extra)
    scheduler.set_timesteps(timesteps=sorted({round(t * (1 - i / steps)) for i in range(steps)}, reverse=True))
    return run_steps(net, x_t, cond, scheduler, guidance_scale, generator)


def chunked(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 64) -> Tensor:
    with torch.inference_mode():
        return torch.cat([fn(c) for c in x.split(size)])


class Fidelity:
    """PSNR/SSIM/MS-SSIM per region plus LPIPS over (pred, target) pairs; one LPIPS backbone reused."""

    def __init__(self, regions: RegionBoxes, lpips: LPIPS) -> None:
        self.regions, self.lpips = regions, lpips

    def __call__(self, pairs: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        m = FidelityMetrics(self.regions)
        self.lpips.reset()
        for pred, target in pairs:
            m.update(pred.cpu(), target.cpu())
            self.lpips.update(pred.cpu(), target.cpu())
        return m.compute() | {"lpips": self.lpips.compute()}


def evaluate_denoise(
    cfg: DictConfig, clips: list[Clip], models: dict[str, TalkingHeadPipeline | str], fidelity: Fidelity
) -> dict[str, Any]:
    """Every model at every noise level and step count vs the VAE reconstruction; the noisy input as baseline.

    All models denoise the same noisy latents (the first available model's schedule; noise seeded by ``seed``).
    """
    d = cfg.eval.denoise
    first = next((p for p in models.values() if not isinstance(p, str)), None)
    if first is None:
        return unavailable("no denoiser checkpoint found")
    vae, size, dev = first.vae, first.image_size, first.device
    schedule = NoiseSchedule(**first.schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = []
    for clip in clips:
        gt = to_unit(clip.at(size)[: d.max_frames]).mul(2).sub(1).to(dev)
        z = chunked(vae.to_latent, gt)
        noisy = {
            t: schedule.add_noise(z, torch.randn(z.shape, generator=gen).to(dev), torch.full((len(z),), t))
            for t in d.noise_levels
        }
        data.append({"clip": clip, "gt": gt, "z": z, "recon": chunked(vae.from_latent, z), "noisy": noisy})
    num_frames = sum(len(x["gt"]) for x in data)
    levels: dict[str, dict] = {
        str(t): {"noisy": fidelity((chunked(vae.from_latent, x["noisy"][t]), x["recon"]) for x in data)}
        for t in d.noise_levels
    }
    conds: dict[str, list] = {}
    for name, pipe, steps, info in runs(cfg, models):
        for t in d.noise_levels:
            if isinstance(pipe, str) or pipe.image_size != size:
                reason = pipe if isinstance(pipe, str) else f"image size {pipe.image_size} != {size}"
                levels[str(t)][name] = info | unavailable(reason)
                continue
            if info["model"] not in conds:
                conds[info["model"]] = [_conditions(pipe, x["clip"], len(x["gt"]), cfg.visemes) for x in data]
            clock = [0.0]
            scores = fidelity(_denoised(pipe, data, conds[info["model"]], t, steps, cfg.seed, clock))
            levels[str(t)][name] = info | {"status": "ok", **scores, "ms_per_frame": 1e3 * clock[0] / num_frames}
    return {
        "noise_levels": list(d.noise_levels),
        "num_frames": num_frames,
        "schedule": first.schedule,
        "vae_vs_gt": fidelity((x["recon"], x["gt"]) for x in data),
        "levels": levels,
    }


def _denoised(
    pipe: TalkingHeadPipeline, data: list[dict], conds: list[dict], t: int, steps: int, seed: int, clock: list[float]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(decoded denoised frames, VAE reconstruction) per clip; denoiser seconds are added to ``clock[0]``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for x, cond in zip(data, conds):
        start = time.perf_counter()
        z = _denoise_clip(pipe, x["noisy"][t], t, cond, steps, gen, pose=x["z"])
        clock[0] += time.perf_counter() - start
        yield chunked(pipe.vae.from_latent, z), x["recon"]


def _conditions(pipe: TalkingHeadPipeline, clip: Clip, n: int, visemes: str) -> dict[str, Tensor]:
    emb, tokens = pipe.conditions(clip.wave, 0, n, len(clip.wave), Timings())
    if visemes == "data":
        tokens = torch.from_numpy(clip.visemes[:n])[None].to(pipe.device)
    return {"ref_latent": pipe.reference(clip.reference)[1], "audio_emb": emb, "visemes": tokens}


def _denoise_clip(
    pipe: TalkingHeadPipeline, z_t: Tensor, t: int, cond: dict, steps: int, gen: torch.Generator, pose: Tensor
) -> Tensor:
    """Denoise ``[N,C,h,w]`` window by window (no motion frames: every frame is noisy); the last window ends at N.

    ``pose``: the clean latents ``[N,C,h,w]``, the pose source of nets built with a ``pose_mask``."""
    n, w = len(z_t), pipe.window
    out = torch.empty_like(z_t)
    for start, known in window_plan(n, w, 0) if n >= w else [(0, 0)]:
        sl = slice(start, min(start + w, n))
        c = {"ref_latent": cond["ref_latent"], "audio_emb": cond["audio_emb"][:, sl], "visemes": cond["visemes"][:, sl]}
        if getattr(pipe.net, "pose_mask", None) is not None:
            c["pose"] = pose[None, sl]
        x = denoise_from(pipe.net, z_t[None, sl], t, c, pipe.sampler, pipe.schedule, steps, pipe.guidance_scale, gen)
        out[start + known : sl.stop] = x[0, known:]
    return out
