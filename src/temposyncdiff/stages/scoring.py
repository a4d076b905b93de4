"""Held-out utterances generated and scored one way. Every run (a ``generate`` with its sampler bound) makes each
utterance from its reference with its own and with the next utterance's audio, from the same noise for every run;
``evaluation.scorer.GenerationScorer`` scores the frames as tsd-eval does. The teacher's and the student's sampled
validation, the student's rendered lip gain and the student ablation all generate here."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from temposyncdiff.data.audio import AudioFeatures, load_audio
from temposyncdiff.data.clips import clip_mel_windows
from temposyncdiff.data.video import write_side_by_side
from temposyncdiff.data.visemes import SILENCE
from temposyncdiff.diffusion.sampling import generate_long, window_borders
from temposyncdiff.evaluation.scorer import GenerationScorer, TruthSync, flat_scores
from temposyncdiff.metrics.identity import as_uint8_frames
from temposyncdiff.metrics.image import FidelityMetrics
from temposyncdiff.metrics.sync import SyncExpert
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.regions import RegionBoxes


@dataclass(frozen=True)
class ScoreSettings:
    """How held-out utterances are generated and scored (``score_runs``)."""

    regions: RegionBoxes
    window: int  # the generation windows: where the seams are
    overlap: int
    seed: int = 0  # utterance i's noise: seed + i, the same for every run
    data_visemes: bool = False  # the data's viseme labels (else the nets' own viseme heads)
    sample_videos: int = 0  # side-by-side mp4s (truth | each run) of the first utterances
    vshift: int = 15  # LSE's offsets


@torch.no_grad()
def generate(
    net: Denoiser,
    ref_latent: Tensor,
    mel_windows: Tensor,
    visemes: Tensor | None,
    generator: torch.Generator,
    make_scheduler: Callable,
    steps: int,
    guidance_scale: float,
    overlap: int,
    pose: Tensor | None = None,
) -> Tensor:
    """Latents ``[B,N,C,h,w]`` from whole-utterance mel windows with ``net``'s own audio encoder (teacher or student).

    ``visemes`` None: the audio encoder's viseme head (as at inference without a transcript). ``pose``: the pose
    source latents ``[B,N,C,h,w]``, used by nets built with a ``pose_mask`` (None: the reference).
    """
    emb, logits = net.embed_audio(mel_windows)
    if visemes is None:
        visemes = logits.argmax(-1)
    pose = pose if getattr(net, "pose_mask", None) is not None else None
    return generate_long(
        net,
        ref_latent,
        emb,
        visemes,
        mel_windows.shape[1],
        net.window,
        overlap,
        tuple(ref_latent.shape[1:]),
        make_scheduler,
        steps,
        guidance_scale,
        generator,
        pose,
    )


def decode(vae: nn.Module, latents: Tensor, chunk: int = 64) -> Tensor:
    """Latents ``[..., C, h, w]`` -> frames ``[..., 3, H, W]`` in [-1, 1]."""
    flat = latents.flatten(0, -4)
    return torch.cat([vae.from_latent(z) for z in flat.split(chunk)]).clamp(-1, 1).unflatten(0, latents.shape[:-3])


def frame_latents(utt: dict[str, Any], vae: nn.Module, device: torch.device) -> Tensor:
    """A held-out utterance's frame latents ``[N,C,h,w]`` on ``device``: the cache's, else encoded by ``vae``."""
    z = utt["latents"] if utt["latents"] is not None else vae.to_latent(utt["frames"].to(device))
    return z.to(device)


def reference_latent(utt: dict[str, Any], vae: nn.Module, device: torch.device) -> Tensor:
    """A held-out utterance's reference latent ``[C,h,w]`` on ``device``: the cache's, else encoded by ``vae``."""
    ref = utt["ref_latent"] if utt["ref_latent"] is not None else vae.to_latent(utt["reference"][None].to(device))[0]
    return ref.to(device)


def own_and_swapped(
    utt: dict[str, Any], other: dict[str, Any], audio: AudioFeatures, data_visemes: bool, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Mel windows ``[2,N,n_mels,W]`` of ``utt``'s own audio and ``other``'s (the audio-swap control), and their
    viseme labels ``[2,N]`` (``other``'s cut or padded with silence) when ``data_visemes``, else None (the nets'
    own viseme heads)."""
    n = len(utt["frames"])
    mel = torch.stack([clip_mel_windows(audio, utt["mel"], 0, n), clip_mel_windows(audio, other["mel"], 0, n)])
    if not data_visemes:
        return mel.to(device), None
    swap = torch.full((n,), SILENCE, dtype=torch.long)
    swap[: min(n, len(other["visemes"]))] = other["visemes"][:n]
    return mel.to(device), torch.stack([utt["visemes"], swap]).to(device)


def write_comparison(path: Path, videos: list[np.ndarray], row: dict | None, audio: AudioFeatures) -> None:
    """Side-by-side mp4 of uint8 ``[N,H,W,3]`` videos (the truth first), with the utterance's own audio when its file
    is there."""
    wave = None
    if row is not None and os.path.isfile(row["video_mp4"]):
        wave = load_audio(
            row["video_mp4"], audio.sample_rate, int(round(len(videos[0]) * audio.sample_rate / audio.fps))
        )
    write_side_by_side(path, videos, wave, audio.fps, audio.sample_rate)


def _mel(utt: dict[str, Any]) -> Tensor:
    return torch.from_numpy(utt["mel"]).T


def _num(x: float | str | None) -> float:
    """A report number (``json_float``: None for NaN, ``"inf"``) as a float."""
    return float("nan") if x is None else float(x)


@torch.no_grad()
def score_runs(
    runs: dict[str, Callable[..., Tensor]],
    utterances: list[dict[str, Any]],
    vae: nn.Module,
    audio: AudioFeatures,
    settings: ScoreSettings,
    expert: SyncExpert | None = None,
    video_dir: Path | None = None,
    rows: dict[str, dict] | None = None,
    cache: dict[str, Tensor] | None = None,
    cached: Collection[str] = (),
) -> dict[str, dict[str, float]]:
    """Each run's scores (``flat_scores`` of ``GenerationScorer``, mouth region and audio-swap control included).

    ``runs[name](ref_latent [2,C,h,w], mel [2,N,n_mels,W], visemes [2,N] | None, generator, pose=) -> latents``
    (nets built with a ``pose_mask`` re-voice the utterance: its own frames are the pose source). Besides the
    scorer's numbers: ``psnr_rec``/``ssim_rec`` against the VAE reconstruction, ``psnr_vs_ref`` against the first
    run, and with an ``expert`` the truth's ``lse_c_gt`` and ``lse_c_gt_gap`` (own minus swapped audio). Latents of
    runs named in ``cached`` are kept in (and reused from) ``cache``.
    """
    s, dev = settings, next(vae.parameters()).device
    scorers = {name: GenerationScorer(s.regions, expert, vshift=s.vshift) for name in runs}
    vs_rec = {name: FidelityMetrics(s.regions) for name in runs}
    vs_ref = {name: FidelityMetrics(s.regions) for name in list(runs)[1:]}
    truth = TruthSync(expert, s.vshift) if expert is not None else None
    for i, utt in enumerate(utterances):
        other = utterances[(i + 1) % len(utterances)]
        n = len(utt["frames"])
        mel, visemes = own_and_swapped(utt, other, audio, s.data_visemes, dev)
        latents = frame_latents(utt, vae, dev)
        ref, pose = reference_latent(utt, vae, dev)[None].expand(2, -1, -1, -1), latents[None].expand(2, -1, -1, -1, -1)
        gt, rec = as_uint8_frames(utt["frames"]), as_uint8_frames(decode(vae, latents))
        borders = window_borders(n, s.window, s.overlap)
        own_mel = _mel(utt)
        if truth is not None:
            truth.update(gt, own_mel, _mel(other))
        own: dict[str, np.ndarray] = {}
        for name, fn in runs.items():
            key = f"{name}/{utt['id']}"
            z = cache.get(key) if cache is not None and name in cached else None
            if z is None:
                z = fn(ref, mel, visemes, torch.Generator(dev).manual_seed(s.seed + i), pose=pose)
                if cache is not None and name in cached:
                    cache[key] = z
            video = as_uint8_frames(decode(vae, z).flatten(0, 1)).reshape(2, n, *gt.shape[1:])
            own[name] = video[0]
            scorers[name].update(gt, video[0], None, borders, own_mel, video[1])
            vs_rec[name].update(video[0], rec)
            if name in vs_ref:
                vs_ref[name].update(video[0], own[next(iter(runs))])
        if video_dir is not None and i < s.sample_videos:
            write_comparison(
                video_dir / f"{utt['id'].replace('/', '_')}.mp4",
                [gt, *own.values()],
                (rows or {}).get(utt["id"]),
                audio,
            )
    t = truth.compute() if truth is not None else None
    out = {}
    for name, scorer in scorers.items():
        m = flat_scores(scorer.compute())
        rec_full = vs_rec[name].compute()["full"]
        m |= {"psnr_rec": _num(rec_full["psnr"]), "ssim_rec": _num(rec_full["ssim"])}
        if name in vs_ref:
            m["psnr_vs_ref"] = _num(vs_ref[name].compute()["full"]["psnr"])
        if t is not None:
            m |= {"lse_c_gt": _num(t["lse_c"]), "lse_c_gt_gap": _num(t.get("gap_lse_c"))}
        out[name] = m
    return out
