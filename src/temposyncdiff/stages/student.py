"""Stage 3: the few-step student, distilled from the frozen teacher by trajectory distillation (``diffusion.distill``).

``self.net`` is a smaller ``Denoiser`` (the teacher's interface, its own audio encoder; optionally initialised from
every teacher tensor of the same name and shape) that predicts x0. The teacher, the VAE and the optional lip-sync
expert are plain attributes: not optimised, averaged or checkpointed, and the teacher exists once. Before the first
step on a split the teacher's guided ODE couplings of all its clips are made, or loaded from ``couplings_dir``
(keyed by the teacher's weights, the settings and the clips). Training regresses the teacher's samples from their
interpolants at the student's 1/2/4-step timesteps, plus optional identity, temporal and sync terms on the student's
x0. Validation (``stages.scoring``): the student at each of ``val_steps`` and the teacher at ``teacher_eval_steps``
generate the same held-out utterances from the same noise, scored as tsd-eval scores them, plus fidelity vs the VAE
reconstruction and side-by-side mp4s (truth | teacher | students).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.batch import Batch, collate
from temposyncdiff.data.clips import clip_mel_windows
from temposyncdiff.diffusion.distill import (
    Couplings,
    student_sampler,
    student_timesteps,
    teacher_couplings,
    trajectory_loss,
)
from temposyncdiff.diffusion.losses import diffusion_loss, identity_loss, lip_shape_loss, sync_loss, temporal_loss
from temposyncdiff.diffusion.sampling import make_sampler
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.metrics.mouth import LipLandmarks
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.regions import region_weight
from temposyncdiff.stages.base import embed_batch_audio, weights_digest
from temposyncdiff.stages.latent import LatentDiffusionStage, frozen_net, held_out_utterances, model_stats
from temposyncdiff.stages.lip_gain import calibrate_lip_gain, calibrate_rendered_gain
from temposyncdiff.stages.lip_reader import fit_lip_reader
from temposyncdiff.stages.scoring import decode, frame_latents, generate, reference_latent, score_runs
from temposyncdiff.utils.io import atomic_path


def clip_keys(dataset: Dataset) -> list[str]:
    """``"<utterance id>@<start>"`` of every item of a ``ClipDataset`` (or a ``Subset`` of one), in order, with
    ``~m`` for a mirrored item (``data.mirror``): what the couplings were made from."""
    idx = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        idx, dataset = [dataset.indices[i] for i in idx], dataset.dataset
    keys = []
    for i in idx:
        u, start = dataset.items[i]
        keys.append(f"{dataset.src.ids[u]}@{start}" + ("~m" if dataset.mirrored(i) else ""))
    return keys


def batch_keys(batch: Batch) -> list[str]:
    return [f"{i}@{int(s)}" for i, s in zip(batch.ids, batch.start)]


class StudentStage(LatentDiffusionStage):
    kind = "student"
    export_names = {"best": "student_best.pt", "last": "student_last.pt"}

    def __init__(
        self,
        net: Denoiser,
        optimizer: Callable[..., torch.optim.Optimizer],
        regions: dict[str, list[float]],
        scheduler: Callable | None = None,
        teacher_weights: str = "checkpoints/teacher_best.pt",
        vae_weights: str = "checkpoints/vae_pretrained.pt",
        syncnet_weights: str | None = None,
        init_from_teacher: bool = True,
        max_flops_ratio: float | None = 0.5,
        teacher_sampler: str = "dpmpp",
        teacher_steps: int = 8,
        guidance_scale: float | None = None,
        couplings_dir: str | None = None,
        coupling_batch: int = 16,
        coupling_seed: int = 0,
        motion_prob: float = 0.5,
        audio_visemes_prob: float = 0.2,
        train_steps: tuple[int, ...] = (1, 2, 4),
        steps: int = 2,
        viseme_weight: float = 0.1,
        mouth_weight: float = 1.0,
        lip_weight: float = 1.0,
        lip_truth_prob: float = 0.5,
        lip_read_weight: float = 0.0,
        lip_reader_steps: int = 1500,
        data_weight: float = 0.0,
        identity_weight: float = 0.0,
        temporal_weight: float = 0.0,
        sync_weight: float = 0.0,
        overlap: int | None = None,
        eval_visemes: str = "audio",
        val_steps: tuple[int, ...] = (1, 2, 4),
        teacher_eval_steps: int = 50,
        val_utterances: int = 3,
        val_frames: int | None = None,
        sample_videos: int = 2,
        eval_seed: int = 0,
        lip_render: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(net, optimizer, regions, scheduler, eval_visemes, val_utterances, lip_read_weight)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        if not set(val_steps) | {steps} <= set(train_steps):
            raise UserError(
                f"model.steps / val_steps {sorted(set(val_steps) | {steps})} must be among train_steps {list(train_steps)}"
            )
        # the student runs without guidance, so its null audio token is never used: frozen, so that DDP (which
        # wants a gradient for every trainable parameter) needs no find_unused_parameters
        self.net.null_audio.requires_grad_(False)
        self._couplings: dict[str, Couplings] = {}
        self._teacher_eval: dict[str, Tensor] = {}  # the teacher's validation latents (fixed: computed once)
        self.teacher_meta: dict[str, Any] = {}
        self.lip_calibration: dict[str, Any] | None = None  # calibrate_rendered_gain's result, in the export's meta
        self._calibrated: dict[str, tuple[Tensor, dict[str, Any] | None]] = {}  # weights digest -> lip gain, result

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if "teacher" not in self._frozen:
            self._frozen["teacher"], self.teacher_meta = frozen_net(hp.teacher_weights, "teacher")
            self._frozen["vae"], _ = frozen_net(hp.vae_weights, "vae")
        teacher, vae = self._frozen["teacher"], self._frozen["vae"]
        for name, mine, theirs in (
            ("latent_channels", self.net.latent_channels, teacher.latent_channels),
            ("window", self.net.window, teacher.window),
            ("pose_mask", self.net.pose_mask, teacher.pose_mask),
            ("lip_dim", self.net.lip_dim, teacher.lip_dim),
            ("audio_encoder.mel_norm", self.net.audio.mel_norm, teacher.audio.config.get("mel_norm", "none")),
            ("VAE latent channels", vae.latent_channels, teacher.latent_channels),
        ):
            if mine != theirs:
                raise UserError(f"{hp.teacher_weights}: teacher has {name}={theirs}, the student setup has {mine}")
        self.load_expert()
        sch = {k: self.teacher_meta["schedule"][k] for k in SCHEDULE_KEYS}
        self.teacher_schedule = NoiseSchedule(**sch, snr_gamma=None)
        self.schedule = NoiseSchedule(
            **{**sch, "prediction_type": "sample", "timestep_spacing": "trailing"}, snr_gamma=None
        )
        self.grid = student_timesteps(self.schedule.scheduler.config, hp.train_steps)
        self.guidance = self.teacher_meta.get("guidance_scale", 1.0) if hp.guidance_scale is None else hp.guidance_scale
        self.overlap = self.teacher_meta.get("overlap", 2) if hp.overlap is None else hp.overlap
        if stage != "fit":
            return
        if self.net.lip_dim:  # the teacher's standardisation: the lip shapes in its couplings are in its units
            if self.net.lip_relative != getattr(teacher, "lip_relative", "none"):
                raise ValueError(
                    f"model.net.lip_relative={self.net.lip_relative} but the teacher's is {teacher.lip_relative}: "
                    "the student draws the teacher's lip shapes, so both must measure them alike"
                )
            self.net.lip_norm.copy_(teacher.lip_norm)
        if self.net.lip_reader is not None:  # the teacher's reader reads the same VAE's latents: fitted already
            if getattr(teacher, "lip_reader", None) is not None:
                self.net.lip_reader.load_state_dict(teacher.lip_reader.state_dict())
            fit_lip_reader(self.net, self.trainer.datamodule, self.device, "student", hp.lip_reader_steps)
        if hp.init_from_teacher:
            own = self.net.state_dict()
            same = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
            self.net.load_state_dict(same, strict=False)
            rank_zero_info(f"student: {len(same)}/{len(own)} tensors initialised from {hp.teacher_weights}")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            size = dm.hparams.image_size // vae.downsample
            shapes = (vae.latent_channels, size, size), (dm.audio.n_mels, dm.audio.window_frames)
            s, t = model_stats(self.net, *shapes), model_stats(teacher, *shapes)
            ratio = s["flops_per_frame"] / t["flops_per_frame"]
            rank_zero_info(
                f"student: denoiser {s['params_denoiser'] / 1e6:.2f} M params (teacher "
                f"{t['params_denoiser'] / 1e6:.2f}), {s['flops_per_frame'] / 1e6:.1f} MFLOP per frame per step "
                f"(teacher {t['flops_per_frame'] / 1e6:.1f}, ratio {ratio:.2f})"
            )
            if hp.max_flops_ratio is not None and ratio > hp.max_flops_ratio:
                raise UserError(
                    f"the student needs {ratio:.2f}x the teacher's FLOPs per frame; model.max_flops_ratio "
                    f"is {hp.max_flops_ratio} (make model.net smaller)"
                )

    # ---- teacher couplings --------------------------------------------------------------------------------------
    def couplings(self, split: str, dataset: Dataset | None = None) -> Couplings:
        """The teacher couplings of every clip of ``split`` (default dataset: the datamodule's), made once."""
        if split in self._couplings:
            return self._couplings[split]
        hp = self.hparams
        if dataset is None:
            dataset = getattr(self.trainer.datamodule, f"{split}_dataloader")().dataset
        keys = clip_keys(dataset)
        keys_used = "teacher_sampler teacher_steps coupling_seed motion_prob audio_visemes_prob lip_truth_prob"
        settings = {k: hp[k] for k in keys_used.split()}
        ident = json.dumps(
            {"teacher": weights_digest(self._frozen["teacher"]), "guidance": self.guidance, **settings, "keys": keys},
            sort_keys=True,
        )
        path = (
            Path(hp.couplings_dir) / f"{split}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.pt"
            if hp.couplings_dir
            else None
        )
        if path is not None and path.is_file():
            self._couplings[split] = Couplings(**torch.load(path, map_location="cpu", weights_only=True))
            rank_zero_info(f"student: {len(keys)} {split} teacher couplings from {path}")
            return self._couplings[split]
        rank_zero_info(
            f"student: teacher couplings of {len(keys)} {split} clips ({hp.teacher_sampler}, {hp.teacher_steps} steps)"
        )
        start, gen = (
            time.perf_counter(),
            torch.Generator(self.device).manual_seed(hp.coupling_seed + (split != "train")),
        )
        parts = [
            self._couple(b.to(self.device), gen) for b in DataLoader(dataset, hp.coupling_batch, collate_fn=collate)
        ]
        self._couplings[split] = couplings = Couplings.cat(parts)
        rank_zero_info(f"student: {split} couplings made in {time.perf_counter() - start:.0f} s")
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save(couplings.state(), tmp)
        return couplings

    @torch.no_grad()
    def _couple(self, batch: Batch, generator: torch.Generator) -> dict:
        """One batch of couplings: conditions drawn as in teacher training, then the teacher's guided ODE solve."""
        hp, teacher = self.hparams, self.frozen("teacher")
        x0, ref = self.latents(batch)
        b, t = x0.shape[:2]
        emb, logits = embed_batch_audio(teacher, batch)
        r = torch.rand(b, 4, generator=generator, device=self.device)
        visemes = torch.where(r[:, :1] < hp.audio_visemes_prob, logits.argmax(-1), batch.visemes)
        known = torch.where(r[:, 1] < hp.motion_prob, (r[:, 2] * (t - 1)).long() + 1, 0)
        cond = {
            "ref_latent": ref,
            "audio_emb": emb,
            "visemes": visemes,
            "motion": x0,
            "motion_mask": torch.arange(t, device=self.device) < known[:, None],
        }
        if teacher.pose_mask is not None:
            cond["pose"] = x0
        lips = x0.new_zeros(b, t, teacher.lip_dim)
        if teacher.lip_dim:  # as in teacher training: the true shapes part of the time, else the teacher's guess
            lips = teacher.predict_lips(emb, visemes)
            if batch.lips is not None:
                lips = torch.where(
                    r[:, 3, None, None] < hp.lip_truth_prob,
                    teacher.standardize_lips(batch.lips, batch.lip_person),
                    lips,
                )
            cond["lips"] = lips
        scheduler = make_sampler(hp.teacher_sampler, self.teacher_schedule.scheduler.config)
        noise, sample = teacher_couplings(
            teacher, tuple(x0.shape), cond, scheduler, hp.teacher_steps, self.guidance, generator
        )
        return {
            "keys": batch_keys(batch),
            "noise": noise,
            "sample": sample,
            "ref_latent": ref,
            "visemes": visemes,
            "known": known,
            "lips": lips,
        }

    # ---- training -----------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, split: str = "train", generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """All losses of one batch against the teacher couplings of ``split``."""
        hp = self.hparams
        c = self.couplings(split).rows(batch_keys(batch), self.device)
        x0, _ = self.latents(batch)
        b, t = x0.shape[:2]
        emb, logits = embed_batch_audio(self.net, batch)
        mask = batch.mask
        known = torch.arange(t, device=self.device) < c["known"][:, None]
        target_mask = mask & ~known
        ts = self.grid[torch.randint(len(self.grid), (b,), generator=generator)].to(self.device)
        cond = {
            "ref_latent": c["ref_latent"],
            "audio_emb": emb,
            "visemes": c["visemes"],
            "motion": x0,
            "motion_mask": known,
        }
        if self.net.pose_mask is not None:
            cond["pose"] = x0
        lip_loss = None
        if self.net.lip_dim:  # draw the teacher's shapes; the head learns the truth's (else the teacher's guesses)
            cond["lips"] = c["lips"]
            truth = c["lips"] if batch.lips is None else self.net.standardize_lips(batch.lips, batch.lip_person)
            guess = self.net.predict_lips(emb, c["visemes"])
            lip_loss = F.mse_loss(guess[mask], truth[mask]) if mask.any() else guess.sum() * 0
        pixel_weight = region_weight(*x0.shape[-2:], self.regions.mouth, hp.mouth_weight, self.device)
        distill, x0_hat = trajectory_loss(
            self.net, self.schedule, c["noise"], c["sample"], ts, target_mask, cond, pixel_weight
        )
        out = {
            "distill": distill,
            "viseme_ce": F.cross_entropy(logits[mask], batch.visemes[mask]) if mask.any() else logits.sum() * 0,
        }
        if lip_loss is not None:
            out["lips"] = lip_loss
        if hp.lip_read_weight and batch.lips is not None:  # draw the shapes asked for
            drawn = self.net.read_lips(x0_hat, batch.lip_person)
            out["lip_read"] = lip_shape_loss(drawn, c["lips"], target_mask)
        if hp.data_weight:  # the ground truth as a second target: sharper where the teacher's samples are soft
            out["data"] = diffusion_loss(x0_hat, x0, target_mask, pixel_weight=pixel_weight)
        full = torch.where(
            known[..., None, None, None], x0, x0_hat
        )  # known frames as given (continuation borders count)
        if hp.identity_weight:
            out["identity"] = identity_loss(x0_hat, c["ref_latent"], target_mask, self.regions.upper_face)
        if hp.temporal_weight:
            out["temporal"] = temporal_loss(full, x0, mask)
        if hp.sync_weight:
            frames = self.frozen("vae").from_latent(full.flatten(0, 1)).unflatten(0, (b, t))
            out["sync"] = sync_loss(self.frozen("syncnet"), frames, batch.mel, mask)
        weights = {
            "distill": 1.0,
            "viseme_ce": hp.viseme_weight,
            "lips": hp.lip_weight,
            "lip_read": hp.lip_read_weight,
            "data": hp.data_weight,
            "identity": hp.identity_weight,
            "temporal": hp.temporal_weight,
            "sync": hp.sync_weight,
        }
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out

    # ---- generation and validation -----------------------------------------------------------------------------
    def runs(self, steps: Collection[int], teacher_steps: Collection[int] = ()) -> dict[str, Callable[..., Tensor]]:
        """``generate`` functions: ``teacher<N>`` (its own sampler, guided) and ``student<n>`` (one call per step)."""
        meta = self.teacher_meta
        teacher_sampler = partial(make_sampler, meta.get("sampler", "ddim"), self.teacher_schedule.scheduler.config)
        out = {
            f"teacher{n}": partial(
                generate,
                self.frozen("teacher"),
                make_scheduler=teacher_sampler,
                steps=n,
                guidance_scale=meta.get("guidance_scale", 1.0),
                overlap=self.overlap,
            )
            for n in teacher_steps
        }
        student = partial(student_sampler, self.schedule.scheduler.config)
        for n in steps:
            out[f"student{n}"] = partial(
                generate, self.net, make_scheduler=student, steps=n, guidance_scale=1.0, overlap=self.overlap
            )
        return out

    def held_out(self) -> list[dict[str, Any]]:
        utts = held_out_utterances(self.trainer.val_dataloaders.dataset, self.hparams.val_utterances)
        return [truncate(u, self.hparams.val_frames) for u in utts]

    def sampled_validation(
        self, utterances: list[dict[str, Any]], audio: AudioFeatures, video_dir: Path, rows: dict[str, dict]
    ) -> dict[str, float]:
        """The student at ``val_steps`` beside the teacher (``score_runs``): ``<run>/<metric>``."""
        hp = self.hparams
        teacher = f"teacher{hp.teacher_eval_steps}"
        metrics = score_runs(
            self.runs(hp.val_steps, [hp.teacher_eval_steps]),
            utterances,
            self.frozen("vae"),
            audio,
            self.score_settings(self.overlap),
            self.frozen("syncnet"),
            video_dir,
            rows,
            self._teacher_eval,
            {teacher},
        )
        return {f"{run}/{k}": v for run, m in metrics.items() for k, v in m.items()}

    def before_export(self) -> None:
        if not self.net.lip_dim:
            return
        key = weights_digest(self.net)  # the best and last exports are often the same weights: calibrate them once
        if key not in self._calibrated:
            dm = getattr(self._trainer, "datamodule", None)
            calibrate_lip_gain(self.net, dm, self.device, "student")
            calibration = self.calibrate_rendered_gain(dm)  # first: it scales the gain that is kept
            self._calibrated[key] = self.net.lip_gain.clone(), calibration
        gain, self.lip_calibration = self._calibrated[key]
        self.net.lip_gain.copy_(gain)

    def calibrate_rendered_gain(self, dm: Any) -> dict[str, Any] | None:
        """``lip_render``: scale the lip gain until the val utterances' rendered lips swing as the truth's do."""
        hp, cfg = self.hparams, self.hparams.lip_render
        if not cfg or dm is None or "val" not in getattr(dm, "datasets", {}):
            return None
        try:
            landmarks = LipLandmarks()
        except (ImportError, OSError, RuntimeError) as err:
            rank_zero_info(f"student: rendered lip gain not calibrated: {err}")
            return {"multiplier": 1.0, "reason": f"unavailable: {err}"}
        vae, dev, was_training = self.frozen("vae"), self.device, self.net.training
        sampler = partial(student_sampler, self.schedule.scheduler.config)

        def render(utt: dict[str, Any]) -> Tensor:
            n = len(utt["frames"])
            mel = clip_mel_windows(dm.audio, utt["mel"], 0, n)[None].to(dev)
            visemes = utt["visemes"][None].to(dev) if hp.eval_visemes == "data" else None
            out = generate(
                self.net,
                reference_latent(utt, vae, dev)[None],
                mel,
                visemes,
                torch.Generator(dev).manual_seed(hp.eval_seed),
                sampler,
                hp.steps,
                1.0,
                self.overlap,
                pose=frame_latents(utt, vae, dev)[None],
            )
            return (decode(vae, out)[0].cpu() + 1) / 2

        utts = held_out_utterances(dm.datasets["val"], int(cfg["utterances"]))
        self.net.eval()
        try:
            return calibrate_rendered_gain(
                self.net, render, utts, list(cfg["gains"]), landmarks, float(cfg.get("target", 1.0)), "student"
            )
        finally:
            self.net.train(was_training)

    def export_meta(self) -> dict[str, Any]:
        hp, sch = self.hparams, self.schedule.scheduler.config
        return {
            "schedule": {k: sch[k] for k in SCHEDULE_KEYS},
            "sampler": "ddim",
            "sampler_kwargs": {"set_alpha_to_one": True},
            "steps": hp.steps,
            "guidance_scale": 1.0,
            "overlap": self.overlap,
            "vae_weights": str(hp.vae_weights),
            "teacher_weights": str(hp.teacher_weights),
            "teacher_sha256": weights_digest(self._frozen["teacher"]),
            "lip_calibration": self.lip_calibration,
            "distillation": {
                "method": "trajectory",
                "teacher_sampler": hp.teacher_sampler,
                "teacher_steps": hp.teacher_steps,
                "guidance_scale": self.guidance,
                "train_steps": list(hp.train_steps),
            },
        }


def truncate(utt: dict[str, Any], frames: int | None) -> dict[str, Any]:
    """A held-out utterance (``held_out_utterances``) cut to its first ``frames`` frames (None: whole)."""
    n = len(utt["frames"]) if frames is None else min(frames, len(utt["frames"]))
    return {k: v[:n] if k in ("frames", "visemes", "latents") and v is not None else v for k, v in utt.items()}
