"""What every stage shares: optimiser/scheduler from config partials and the weights-only export."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from temposyncdiff.errors import UserError
from temposyncdiff.utils.checkpoints import own_checkpoint, read_checkpoint
from temposyncdiff.utils.task import log
from temposyncdiff.utils.weights import keep_previous, save_weights


def embed_batch_audio(net: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``net.embed_audio`` of a training batch's windows, with their utterances' mean log-mel (``Batch.mel_mean``)."""
    if batch.mel_mean is None and net.audio.mel_norm != "none":
        raise UserError(
            "this audio encoder (mel_norm=utterance) needs each clip's utterance mean log-mel, which LitData shards "
            "written before it lack: rewrite them (tsd-data shards force=true)"
        )
    return net.embed_audio(batch.mel, batch.mel_mean)


class StageModule(L.LightningModule):
    """Base stage: ``self.net`` is the trained (and EMA-averaged) net; frozen helpers live elsewhere."""

    kind: str = "stage"  # export format name, e.g. "vae"
    export_names: dict[str, str] = {}  # which checkpoint ("best" / "last") goes to which file under checkpoints/
    compile_net: bool = False  # torch.compile the trained net (tsd-train compile=true)

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable | None = None) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log`` that averages values logged outside training steps (validation, test) over ranks."""
        kwargs["sync_dist"] = kwargs.get("sync_dist") or not self.training
        super().log(name, value, *args, **kwargs)

    def configure_model(self) -> None:
        if self.compile_net:
            self.net.compile()  # in place: parameter names, checkpoints and exports stay as they are

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stage"] = self.kind

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("stage", self.kind) != self.kind:
            path = getattr(self._trainer, "ckpt_path", None)
            raise UserError(f"{path}: a checkpoint of the '{checkpoint['stage']}' stage, not of '{self.kind}'")

    def configure_optimizers(self) -> dict[str, Any] | None:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:  # a frozen pretrained net (e.g. a diffusers first stage): validated and exported only
            return None
        opt = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return {"optimizer": opt}
        try:
            sched = self.scheduler_factory(optimizer=opt)
        except ZeroDivisionError:  # OneCycleLR whose warm-up rounds to exactly one step
            raise UserError(
                "the learning-rate schedule has a warm-up of exactly one step: change trainer.max_steps "
                "or model.scheduler.pct_start"
            ) from None
        if isinstance(
            sched, torch.optim.lr_scheduler.OneCycleLR | torch.optim.lr_scheduler.CosineAnnealingLR
        ) or getattr(sched, "step_per_batch", False):
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def image_size(self) -> int | None:
        """The frame size the stage trained on (the data module's), stored with every export: inference and
        evaluation generate at it."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(dm, "hparams", None) or {}
        return int(hparams["image_size"]) if "image_size" in hparams else None

    def export_meta(self) -> dict[str, Any]:
        """Extra plain-typed facts stored beside the weights (stages add their own)."""
        return {}

    def before_export(self) -> None:
        """Runs after the exported weights are loaded into ``self.net`` (e.g. to fit the VAE's latent scale)."""

    def export(self, directory: str | Path, checkpoint: ModelCheckpoint | None) -> list[Path]:
        """Write the seed's files (e.g. ``vae_pretrained.pt``) from this run's best/last checkpoints' (EMA) weights.

        Reads only checkpoints inside ``checkpoint``'s own folder, weights-only; a run with no best one there
        gets a one-line error. Without a last one (or with ``checkpoint=None``) the live weights are exported:
        after ``fit`` they are the final (EMA) weights a last checkpoint holds. A replaced export is kept
        beside the new one (``keep_previous``).
        """
        sources: dict[str, Path | None] = {}
        if checkpoint is not None:
            sources = {which: own_checkpoint(checkpoint, which) for which in ("best", "last")}
            if sources["best"] is None:
                raise UserError(
                    f"no best checkpoint of this run in {checkpoint.dirpath} (ModelCheckpoint saved none after "
                    "validating; see callbacks.model_checkpoint): nothing exported"
                )
        written = []
        live = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        for which, filename in self.export_names.items():
            path = sources.get(which)
            if path is None:
                self.net.load_state_dict(live)
            else:
                state = read_checkpoint(path)["state_dict"]
                self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
            self.before_export()
            source = {"stage": self.kind, "source": which if path else "live", "checkpoint": str(path or "")}
            meta = {**source, "image_size": self.image_size(), **self.export_meta()}
            meta["sha256"] = weights_digest(self.net)
            target = Path(directory) / filename
            kept = keep_previous(target)
            written.append(save_weights(target, self.kind, self.net, meta))
            if kept is not None:
                log.info("%s replaced; the previous export is kept as %s", target, kept.name)
        self.net.load_state_dict(live)
        return written


def weights_digest(net: nn.Module) -> str:
    """A short, stable hash of a net's weights (names and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
