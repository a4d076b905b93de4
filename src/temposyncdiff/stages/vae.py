"""Stage 1: the frame VAE (L1/Charbonnier + KL), validated with PSNR/SSIM on the posterior mean."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from temposyncdiff.data.batch import Batch
from temposyncdiff.diffusion.losses import weigh_pixels
from temposyncdiff.nets.vae import FrameVAE, kl_divergence
from temposyncdiff.regions import check_box, crop, region_weight
from temposyncdiff.stages.base import StageModule
from temposyncdiff.utils.task import log

FROZEN_PSNR_WARN_DB = 20.0  # a pretrained autoencoder below this on the footage is the wrong weights or kind


def reconstruction_loss(
    x: torch.Tensor, y: torch.Tensor, kind: str = "l1", pixel_weight: torch.Tensor | None = None, eps: float = 1e-3
) -> torch.Tensor:
    """Mean per-pixel error; ``pixel_weight [H,W]`` (mean-normalised here) emphasises regions."""
    if kind == "l1":
        err = (x - y).abs()
    elif kind == "charbonnier":
        err = torch.sqrt((x - y) ** 2 + eps**2)
    elif kind == "mse":
        err = (x - y) ** 2
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r} (l1 | charbonnier | mse)")
    return weigh_pixels(err, pixel_weight).mean()


def frames_of(batch: Batch) -> torch.Tensor:
    """All valid frames of a batch as ``[N,3,H,W]``."""
    return batch.frames[batch.mask]


class VAEStage(StageModule):
    kind = "vae"
    export_names = {"best": "vae_pretrained.pt"}

    def __init__(
        self,
        net: FrameVAE,
        optimizer: Callable[..., torch.optim.Optimizer],
        mouth_box: tuple[float, float, float, float],
        scheduler: Callable | None = None,
        recon_loss: str = "l1",
        kl_weight: float = 1e-6,
        mouth_weight: float = 1.0,
        scale_fit_batches: int = 20,
        log_images: int = 8,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.mouth_box = check_box("mouth_box", mouth_box)
        self.val_psnr = PeakSignalNoiseRatio(data_range=(0.0, 1.0))
        self.val_psnr_mouth = PeakSignalNoiseRatio(data_range=(0.0, 1.0))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    @property
    def frozen(self) -> bool:
        """A pretrained first stage kept as it is (experiment=own/vae_pretrained): validated and exported only."""
        return not any(p.requires_grad for p in self.net.parameters())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if self.frozen:
            return None
        x = frames_of(batch)
        recon, mean, logvar = self.net(x)
        weight = region_weight(*x.shape[-2:], self.mouth_box, self.hparams.mouth_weight, self.device)
        rec = reconstruction_loss(recon, x, self.hparams.recon_loss, weight)
        kl = kl_divergence(mean, logvar)
        loss = rec + self.hparams.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/recon": rec, "train/kl": kl}, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x = frames_of(batch)
        recon = self.net.decode(self.net.encode(x)[0]).clamp(-1, 1)
        pred, target = (recon + 1) / 2, (x + 1) / 2
        self.val_psnr(pred, target)
        self.val_ssim(pred, target)
        self.val_psnr_mouth(crop(pred, self.mouth_box), crop(target, self.mouth_box))
        self.log("val/loss", reconstruction_loss(recon, x, self.hparams.recon_loss), batch_size=len(x))
        self.log_dict({"val/psnr": self.val_psnr, "val/ssim": self.val_ssim}, prog_bar=True, batch_size=len(x))
        self.log("val/psnr_mouth", self.val_psnr_mouth, batch_size=len(x))
        if batch_idx == 0 and self.hparams.log_images:
            self._log_reconstructions(target[: self.hparams.log_images], pred[: self.hparams.log_images])

    def _log_reconstructions(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        grid = torch.cat([torch.cat(list(target), dim=-1), torch.cat(list(pred), dim=-1)], dim=-2)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image("val/reconstructions", [grid], step=self.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("val/reconstructions", grid, self.global_step)

    def on_validation_epoch_end(self) -> None:
        psnr = self.trainer.callback_metrics.get("val/psnr")
        if self.frozen and psnr is not None and float(psnr) < FROZEN_PSNR_WARN_DB and not self.trainer.sanity_checking:
            log.warning(
                "the pretrained first stage reconstructs the val frames at %.1f dB PSNR (under %.0f dB): check "
                "model.net.path and model.net.kind; later stages cannot draw better than this",
                float(psnr),
                FROZEN_PSNR_WARN_DB,
            )

    @torch.no_grad()
    def before_export(self) -> None:
        """Fit the latent scale factor: 1 / std of posterior means over some training batches."""
        loader = self.trainer.datamodule.train_dataloader()
        was_training = self.net.training
        self.net.eval()
        means = []
        for i, batch in enumerate(loader):
            if i >= self.hparams.scale_fit_batches:
                break
            means.append(self.net.encode(frames_of(batch).to(self.device))[0].flatten())
        std = torch.cat(means).std()
        self.net.scale_factor.fill_(1.0 / float(std.clamp_min(1e-6)))
        self.net.train(was_training)

    def export_meta(self) -> dict[str, Any]:
        return {
            "scale_factor": float(self.net.scale_factor),
            "downsample": self.net.downsample,
            "latent_channels": self.net.latent_channels,
            "val_psnr": _float(self.trainer.callback_metrics.get("val/psnr")),
        }


def _float(x: Any) -> float | None:
    return None if x is None else float(x)
