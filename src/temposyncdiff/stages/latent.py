"""What the teacher and the student share: a latent denoiser trained on cached VAE latents, frozen helper nets, the
face regions, one training and validation step over the stage's ``losses``, and the sampled validation's frame."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.batch import Batch
from temposyncdiff.errors import UserError
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.regions import RegionBoxes
from temposyncdiff.stages.base import StageModule
from temposyncdiff.stages.scoring import ScoreSettings, decode
from temposyncdiff.utils.weights import load_net


def frozen_net(path: str, kind: str) -> tuple[nn.Module, dict]:
    """An exported net in eval mode without gradients, and its meta."""
    net, meta = load_net(path, kind)
    net.requires_grad_(False)
    return net.eval(), meta


def model_stats(net: Denoiser, latent_shape: tuple[int, int, int], mel_shape: tuple[int, int]) -> dict[str, float]:
    """Parameter counts and forward FLOPs per frame of one denoiser call and of the audio encoder."""
    t, dev = net.window, next(net.parameters()).device
    x, ref = torch.zeros(1, t, *latent_shape, device=dev), torch.zeros(1, *latent_shape, device=dev)
    audio = torch.zeros(1, t, net.config["audio_dim"], device=dev)
    inference = [p for n, p in net.named_parameters() if not n.startswith(("audio.", "lip_reader."))]
    stats = {"params_denoiser": sum(p.numel() for p in inference)}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        visemes = torch.zeros(1, t, dtype=torch.long, device=dev)
        net(x, torch.tensor([500], device=dev), ref, audio, visemes, pose=x if net.pose_mask is not None else None)
    stats["flops_per_frame"] = fc.get_total_flops() / t
    if net.audio is not None:
        stats["params_audio"] = sum(p.numel() for p in net.audio.parameters())
        was = net.audio.training
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net.audio.eval()(torch.zeros(1, t, *mel_shape, device=dev))
        net.audio.train(was)
        stats["audio_flops_per_frame"] = fc.get_total_flops() / t
    return stats


def base_dataset(dataset: Dataset) -> Dataset:
    """The ``ClipDataset`` under any ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def cache_reader(datamodule: Any, split: str) -> Any:
    """The cache reader (``data.cache``) under a data module's ``split`` dataset, or None."""
    datasets = getattr(datamodule, "datasets", None) or {}
    ds = base_dataset(datasets[split]) if split in datasets else None
    return getattr(getattr(ds, "src", None), "reader", None)


def held_out_utterances(dataset: Dataset, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` evenly spaced whole utterances of a ``ClipDataset``: frames, mel, visemes, latents, reference.

    The reference is the one the dataset gives the utterance's first clip (deterministic outside training).
    """
    ds = base_dataset(dataset)
    src, n = ds.src, len(ds.src.num_frames)
    first = {}
    for i, (u, _) in enumerate(ds.items):
        first.setdefault(u, i)
    out = []
    for u in sorted(set(np.linspace(0, n - 1, min(n, count)).round().astype(int).tolist())):
        frames, mel, visemes, latents = src.clip(u, 0, src.num_frames[u])
        ref, ref_latent = src.frame(*ds.reference_frame(first[u]))
        out.append(
            {
                "id": src.ids[u],
                "frames": torch.from_numpy(np.array(frames, dtype=np.float32)) / 127.5 - 1.0,
                "mel": np.array(mel, dtype=np.float32),
                "visemes": torch.from_numpy(np.array(visemes, dtype=np.int64)),
                "latents": None if latents is None else torch.from_numpy(np.array(latents, dtype=np.float32)),
                "reference": torch.from_numpy(np.array(ref, dtype=np.float32)) / 127.5 - 1.0,
                "ref_latent": None if ref_latent is None else torch.from_numpy(np.array(ref_latent, dtype=np.float32)),
            }
        )
    return out


class LatentDiffusionStage(StageModule):
    """A denoiser stage: ``self.net`` (with its own audio encoder) is trained, EMA-averaged and exported; the frozen
    nets (VAE, lip-sync expert, the student's teacher) stay outside the optimiser, EMA and checkpoints.

    Subclasses give ``losses(batch, split, generator) -> {"loss": ..., <terms>}`` (one training and validation step
    here logs them) and ``sampled_validation`` (whole held-out utterances, generated and scored).
    """

    def __init__(
        self,
        net: Denoiser,
        optimizer: Any,
        regions: dict[str, list[float]],
        scheduler: Any,
        eval_visemes: str,
        val_utterances: int,
        lip_read_weight: float = 0.0,
    ) -> None:
        super().__init__(optimizer, scheduler)
        if net.audio is None:
            raise UserError(f"model.net.audio_encoder is required: the {self.kind} trains its own audio encoder")
        if eval_visemes not in ("audio", "data"):
            raise UserError(f"model.eval_visemes={eval_visemes!r}: expected audio | data")
        if val_utterances == 1:  # the audio-swap control scores each utterance with the next one's audio
            raise UserError("model.val_utterances=1: use 0 (no sampled validation) or at least 2")
        if lip_read_weight and net.lip_reader is None:  # the lip_read term's critic (stages.lip_reader)
            if not net.lip_dim:
                raise UserError("model.lip_read_weight > 0 needs a lip-conditioned net (model.net.lip_dim)")
            net.add_lip_reader()
        self.net = net
        self.regions = RegionBoxes(**regions)
        self._frozen: dict[str, nn.Module] = {}

    # ---- frozen nets -----------------------------------------------------------------------------------------------
    def frozen(self, name: str) -> nn.Module | None:
        m = self._frozen.get(name)
        return None if m is None else m.to(self.device)

    def load_expert(self) -> None:
        """The lip-sync expert (``syncnet_weights``) when its file exists; required by ``sync_weight > 0``."""
        hp = self.hparams
        if "syncnet" in self._frozen:
            return
        if hp.syncnet_weights and os.path.isfile(hp.syncnet_weights):
            self._frozen["syncnet"], _ = frozen_net(hp.syncnet_weights, "syncnet")
        elif hp.sync_weight > 0:
            raise UserError(f"model.sync_weight > 0 needs the lip-sync expert; {hp.syncnet_weights} not found")

    def latents(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Clip and reference latents: from the cache, else encoded on the fly by the frozen VAE."""
        if batch.latents is not None and batch.ref_latent is not None:
            return batch.latents, batch.ref_latent
        vae = self.frozen("vae")
        with torch.no_grad():
            clip = vae.to_latent(batch.frames.flatten(0, 1)).unflatten(0, batch.frames.shape[:2])
            return clip, vae.to_latent(batch.reference)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[..., C, h, w]`` -> frames ``[..., 3, H, W]`` in [-1, 1] with the frozen VAE."""
        return decode(self.frozen("vae"), latents)

    # ---- steps -------------------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, split: str = "train", generator: torch.Generator | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.losses(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, batch_size=len(batch))
        return out["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        split = "test" if self.trainer.testing else "val"
        out = self.losses(batch, split, torch.Generator().manual_seed(batch_idx))
        self.log_dict({f"{split}/{k}": v for k, v in out.items()}, batch_size=len(batch))

    test_step = validation_step

    # ---- sampled validation ------------------------------------------------------------------------------------------
    def held_out(self) -> list[dict[str, Any]]:
        """The whole val utterances that the sampled validation generates (``held_out_utterances``)."""
        raise NotImplementedError

    def sampled_validation(
        self, utterances: list[dict[str, Any]], audio: AudioFeatures, video_dir: Path, rows: dict[str, dict]
    ) -> dict[str, float]:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        # here, not at epoch end: StageEMA's epoch-end hook (run before the module's) swaps the averaged weights out
        self.sample_paths: list[Path] = []  # this validation's mp4s, published by callbacks.SampleVideos
        if self.trainer.sanity_checking or not self.hparams.val_utterances:
            return
        utts = self.held_out()
        if len(utts) < 2:
            rank_zero_warn(f"sampled validation skipped: the val split has {len(utts)} utterance(s), it needs 2")
            return
        dm = self.trainer.datamodule
        rows = {r["id"]: r for r in dm.rows("val")} if hasattr(dm, "rows") else {}
        video_dir = Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:06d}"
        metrics = self.sampled_validation(utts, dm.audio, video_dir, rows)
        self.sample_paths = sorted(video_dir.glob("*.mp4"))
        self.log_dict({f"val/{k}": v for k, v in metrics.items() if math.isfinite(v)})
        rank_zero_info(f"{self.kind} val: {self.val_summary(metrics)}")

    def score_settings(self, overlap: int) -> ScoreSettings:
        """How the sampled validation generates and scores (``stages.scoring.score_runs``)."""
        hp = self.hparams
        return ScoreSettings(
            self.regions, self.net.window, overlap, hp.eval_seed, hp.eval_visemes == "data", hp.sample_videos
        )

    def val_summary(self, metrics: dict[str, float]) -> str:
        """The sampled validation's log line: the key numbers of each run (``<run>/<metric>`` keys) or of the one."""
        keys = ("psnr_mouth", "psnr_mouth_gap", "psnr", "mouth_corr", "flicker_gap", "lse_c_gap")
        runs = dict.fromkeys(k.rpartition("/")[0] for k in metrics)
        return "; ".join(
            f"{run}: " * bool(run)
            + " ".join(f"{k}={metrics[p]:.3f}" for k in keys if (p := f"{run}/{k}" if run else k) in metrics)
            for run in runs
        )
