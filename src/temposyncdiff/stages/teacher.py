"""Stage 2: the latent-diffusion teacher, trained on cached VAE latents and validated end to end on whole utterances.

``self.net`` is a ``Denoiser`` that owns its audio encoder (``net.audio``), so the audio path is trained jointly
(diffusion loss + a viseme-classification loss), averaged by EMA and exported with the denoiser in
``teacher_{best,last}.pt``. The frozen VAE (``vae_weights``) and the optional lip-sync expert
(``syncnet_weights``) are plain attributes, not sub-modules: they are neither optimised, averaged nor saved in
Lightning checkpoints. Training: random timesteps, condition dropout for classifier-free guidance (audio and
visemes together), and, with probability ``motion_prob``, the first k frames of a clip given as motion frames
(so the net learns to continue earlier windows). Validation samples ``val_utterances`` held-out utterances
with their own and with another utterance's audio and scores them as tsd-eval does (``stages.scoring``): region
PSNR/SSIM, the audio-swap gaps, mouth motion, flicker, seams, LSE-C/D when the expert is there, and mp4s.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn import functional as F

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.batch import Batch
from temposyncdiff.diffusion.losses import diffusion_loss, identity_loss, lip_shape_loss, sync_loss, temporal_loss
from temposyncdiff.diffusion.sampling import make_sampler
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.regions import region_weight
from temposyncdiff.stages.base import embed_batch_audio
from temposyncdiff.stages.latent import LatentDiffusionStage, frozen_net, held_out_utterances, model_stats
from temposyncdiff.stages.lip_gain import calibrate_lip_gain, set_lip_norm
from temposyncdiff.stages.lip_reader import fit_lip_reader
from temposyncdiff.stages.scoring import generate, score_runs
from temposyncdiff.utils.weights import load_net


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two 1-D tensors (0 when either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


class TeacherStage(LatentDiffusionStage):
    kind = "teacher"
    export_names = {"best": "teacher_best.pt", "last": "teacher_last.pt"}

    def __init__(
        self,
        net: Denoiser,
        schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        regions: dict[str, list[float]],
        scheduler: Callable | None = None,
        vae_weights: str = "checkpoints/vae_pretrained.pt",
        syncnet_weights: str | None = None,
        audio_weights: str | None = None,
        cond_drop: float = 0.1,
        motion_prob: float = 0.5,
        audio_visemes_prob: float = 0.2,
        viseme_weight: float = 0.1,
        mouth_weight: float = 1.0,
        lip_weight: float = 1.0,
        lip_truth_prob: float = 0.5,
        lip_read_weight: float = 0.0,
        lip_reader_steps: int = 1500,
        identity_weight: float = 0.0,
        temporal_weight: float = 0.0,
        sync_weight: float = 0.0,
        sampler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 2.0,
        overlap: int = 2,
        eval_visemes: str = "audio",
        val_utterances: int = 4,
        sample_videos: int = 2,
        eval_seed: int = 0,
    ) -> None:
        super().__init__(net, optimizer, regions, scheduler, eval_visemes, val_utterances, lip_read_weight)
        self.save_hyperparameters(ignore=["net", "schedule", "optimizer", "scheduler"], logger=False)
        self.schedule = schedule

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if "vae" not in self._frozen:
            self._frozen["vae"], _ = frozen_net(hp.vae_weights, "vae")
        vae = self._frozen["vae"]
        if vae.latent_channels != self.net.latent_channels:
            raise UserError(
                f"{hp.vae_weights}: {vae.latent_channels} latent channels, model.net has {self.net.latent_channels}"
            )
        self.load_expert()
        if stage == "fit" and hp.audio_weights:
            audio, _ = load_net(hp.audio_weights, "audio")
            self.net.audio.load_state_dict(audio.state_dict())
            rank_zero_info(f"teacher: audio encoder initialised from {hp.audio_weights}")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.net.lip_dim:
            set_lip_norm(self.net, dm)
        if stage == "fit" and self.net.lip_reader is not None:
            fit_lip_reader(self.net, dm, self.device, "teacher", hp.lip_reader_steps)
        if stage == "fit" and dm is not None:
            size = dm.hparams.image_size // vae.downsample
            s = model_stats(self.net, (vae.latent_channels, size, size), (dm.audio.n_mels, dm.audio.window_frames))
            rank_zero_info(
                f"teacher: denoiser {s['params_denoiser'] / 1e6:.2f} M params, {s['flops_per_frame'] / 1e6:.1f} MFLOP "
                f"per frame per step; audio encoder {s['params_audio'] / 1e6:.2f} M params, "
                f"{s['audio_flops_per_frame'] / 1e6:.1f} MFLOP per frame"
            )

    # ---- training -----------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, split: str = "train", generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """All training losses of one batch (random draws from ``generator`` when given)."""
        hp, sch = self.hparams, self.schedule
        x0, ref = self.latents(batch)
        b, t = x0.shape[:2]

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator).to(self.device)

        emb, logits = embed_batch_audio(self.net, batch)
        mask = batch.mask
        viseme_ce = F.cross_entropy(logits[mask], batch.visemes[mask]) if mask.any() else logits.sum() * 0
        visemes = torch.where(rand(b)[:, None] < hp.audio_visemes_prob, logits.detach().argmax(-1), batch.visemes)
        known_n = torch.where(rand(b) < hp.motion_prob, (rand(b) * (t - 1)).long() + 1, 0)
        known = torch.arange(t, device=self.device)[None] < known_n[:, None]
        ts = sch.sample_timesteps(b, generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        x_t = sch.add_noise(x0, noise, ts)
        pose = x0 if self.net.pose_mask is not None else None  # the target's own pose, its mouth masked by the net
        lips, lip_loss = None, None
        if self.net.lip_dim and batch.lips is not None:  # draw the true shape or the head's (detached) prediction
            truth, guess = self.net.standardize_lips(batch.lips, batch.lip_person), self.net.predict_lips(emb, visemes)
            lip_loss = F.mse_loss(guess[mask], truth[mask]) if mask.any() else guess.sum() * 0
            lips = torch.where(rand(b)[:, None, None] < hp.lip_truth_prob, truth, guess.detach())
        drop = rand(b) < hp.cond_drop
        pred = self.net(x_t, ts, ref, emb, visemes, motion=x0, motion_mask=known, drop_cond=drop, pose=pose, lips=lips)
        target_mask = mask & ~known
        pixel_weight = region_weight(*x0.shape[-2:], self.regions.mouth, hp.mouth_weight, self.device)
        target = sch.target(x0, noise, ts)
        out = {
            "diffusion": diffusion_loss(pred, target, target_mask, sch.loss_weight(ts), pixel_weight),
            "viseme_ce": viseme_ce,
        }
        if lip_loss is not None:
            out["lips"] = lip_loss
            with torch.no_grad():  # how well the head follows the true inner-lip opening (not a loss term)
                out["lip_corr"] = _pearson(guess[..., 0][mask], truth[..., 0][mask])
        read_lips = bool(hp.lip_read_weight) and lips is not None
        if hp.identity_weight or hp.temporal_weight or hp.sync_weight or read_lips:
            x0_hat = sch.to_x0(x_t, pred, ts)
            ab = sch.alphas_cumprod.to(self.device)[ts]  # trust the x0 estimate where it is sharp
            if read_lips:  # draw the shapes asked for (not where the condition is dropped)
                drawn = self.net.read_lips(x0_hat, batch.lip_person)
                out["lip_read"] = lip_shape_loss(drawn, lips, target_mask & ~drop[:, None], ab)
            if hp.identity_weight:
                out["identity"] = identity_loss(x0_hat, ref, target_mask, self.regions.upper_face, ab)
            if hp.temporal_weight:
                out["temporal"] = temporal_loss(x0_hat, x0, mask, ab)
            if hp.sync_weight:
                frames = self.frozen("vae").from_latent(x0_hat.flatten(0, 1)).unflatten(0, (b, t))
                out["sync"] = sync_loss(self.frozen("syncnet"), frames, batch.mel, mask)
        weights = {
            "diffusion": 1.0,
            "viseme_ce": hp.viseme_weight,
            "lips": hp.lip_weight,
            "lip_read": hp.lip_read_weight,
            "identity": hp.identity_weight,
            "temporal": hp.temporal_weight,
            "sync": hp.sync_weight,
        }
        out["loss"] = sum(weights[k] * v for k, v in out.items() if k in weights)
        return out

    # ---- sampled validation --------------------------------------------------------------------------------------
    def held_out(self) -> list[dict[str, Any]]:
        return held_out_utterances(self.trainer.val_dataloaders.dataset, self.hparams.val_utterances)

    def sampled_validation(
        self,
        utterances: list[dict[str, Any]],
        audio: AudioFeatures,
        video_dir: Path | None = None,
        rows: dict[str, dict] | None = None,
    ) -> dict[str, float]:
        """Each utterance with its own and with the next one's audio, scored and written as mp4s (``score_runs``)."""
        hp = self.hparams
        run = partial(
            generate,
            self.net,
            make_scheduler=partial(make_sampler, hp.sampler, self.schedule.scheduler.config),
            steps=hp.steps,
            guidance_scale=hp.guidance_scale,
            overlap=hp.overlap,
        )
        return score_runs(
            {"teacher": run},
            utterances,
            self.frozen("vae"),
            audio,
            self.score_settings(hp.overlap),
            self.frozen("syncnet"),
            video_dir,
            rows,
        )["teacher"]

    def before_export(self) -> None:
        if self.net.lip_dim:
            calibrate_lip_gain(self.net, getattr(self._trainer, "datamodule", None), self.device, "teacher")

    def export_meta(self) -> dict[str, Any]:
        sch = self.schedule.scheduler.config
        return {
            "schedule": {k: sch[k] for k in SCHEDULE_KEYS},
            "sampler": self.hparams.sampler,
            "steps": self.hparams.steps,
            "guidance_scale": self.hparams.guidance_scale,
            "overlap": self.hparams.overlap,
            "vae_weights": str(self.hparams.vae_weights),
        }
