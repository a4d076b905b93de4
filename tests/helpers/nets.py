"""Tiny random nets, exported as the stages export them, and the inputs each stage's tiny run needs."""

from __future__ import annotations

from pathlib import Path

import torch

from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.syncnet import SyncNet
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.utils.weights import save_weights
from tests.helpers.configs import TINY_STUDENT, TINY_TEACHER, compose_config

WINDOW, LATENT_CHANNELS = 4, 4
AUDIO = {"n_mels": 80, "window": 16, "dim": 16, "context": 1, "num_visemes": 15, "width": 16}


def tiny_denoiser(channels=(8, 16), seed: int = 0, mel_norm: str = "none") -> Denoiser:
    """A window-4 denoiser with its own audio encoder (built with ``mel_norm``); zero-initialised output layers
    randomised (a fresh net would otherwise hide its conditioning)."""
    torch.manual_seed(seed)
    net = Denoiser(
        latent_channels=LATENT_CHANNELS,
        channels=channels,
        attention_levels=(1,),
        cross_attention_levels=(1,),
        temporal_levels=(0, 1),
        heads=2,
        cond_dim=16,
        audio_dim=16,
        window=WINDOW,
        audio_encoder={**AUDIO, "mel_norm": mel_norm},
    )
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


def tiny_vae() -> TinyVAE:
    torch.manual_seed(0)
    return TinyVAE(channels=(8,), latent_channels=LATENT_CHANNELS, patch_size=4)


def teacher_run(data_root: Path, tmp_path: Path, latents: bool):
    """A tiny random VAE exported under tmp_path/ckpt (its latents cached when ``latents``), and the composed
    teacher config."""
    from temposyncdiff.data.cache import add_latents

    ckpt, vae = tmp_path / "ckpt", tiny_vae()
    save_weights(ckpt / "vae_pretrained.pt", "vae", vae, {"scale_factor": 1.0})
    overrides = [*TINY_TEACHER, f"paths.checkpoint_dir={ckpt}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config("train", overrides, data_root, tmp_path / "run")
    if latents:
        import hydra

        dm = hydra.utils.instantiate(cfg.data)
        dm.prepare_data()
        for split in ("train", "val"):
            add_latents(dm.cache_path(split), vae.eval().to_latent, log=lambda *_: None)
    return cfg, ckpt


def student_run(data_root: Path, tmp_path: Path, overrides=()):
    """A tiny random VAE, teacher and lip-sync expert exported under tmp_path/ckpt, and the composed student config."""
    ckpt = tmp_path / "ckpt"
    save_weights(ckpt / "vae_pretrained.pt", "vae", tiny_vae(), {"scale_factor": 1.0})
    sch = NoiseSchedule().scheduler.config
    meta = {
        "schedule": {k: sch[k] for k in SCHEDULE_KEYS},
        "sampler": "ddim",
        "steps": 50,
        "guidance_scale": 2.0,
        "overlap": 1,
    }
    save_weights(ckpt / "teacher_best.pt", "teacher", tiny_denoiser((16, 16)), meta)
    save_weights(ckpt / "syncnet.pt", "syncnet", SyncNet(image_size=64, frames=3, mel_window=12, width=8, dim=16), {})
    extra = [f"paths.checkpoint_dir={ckpt}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    return compose_config("train", [*TINY_STUDENT, *extra], data_root, tmp_path / "run"), ckpt


def save_tiny_exports(
    out: Path,
    kinds: tuple[str, ...] = ("teacher",),
    pose_mask: tuple[float, float, float, float] | None = None,
    lip_dim: int = 0,
    guidance_scale: float = 1.0,
) -> None:
    """A tiny random VAE and denoiser exported as the stages export them (32 px): ``vae_pretrained.pt`` and
    ``<kind>_best.pt`` for each of ``kinds``; ``pose_mask`` builds a re-voicing denoiser, ``lip_dim`` one that draws
    lip shapes, ``guidance_scale`` the sampling default stored with it."""

    torch.manual_seed(0)
    vae = TinyVAE(channels=(8,), patch_size=4)
    net = Denoiser(
        channels=(16, 16),
        attention_levels=(),
        cross_attention_levels=(1,),
        temporal_levels=(1,),
        heads=2,
        cond_dim=32,
        audio_dim=16,
        window=4,
        audio_encoder={"dim": 16, "width": 16},
        pose_mask=pose_mask,
        lip_dim=lip_dim,
    )
    schedule = dict(NoiseSchedule().scheduler.config)
    meta = {
        "schedule": {k: schedule[k] for k in SCHEDULE_KEYS},
        "sampler": "ddim",
        "steps": 2,
        "guidance_scale": guidance_scale,
        "overlap": 1,
        "image_size": 32,
    }
    save_weights(out / "vae_pretrained.pt", "vae", vae, {"image_size": 32})
    for kind in kinds:
        save_weights(out / f"{kind}_best.pt", kind, net, meta)
