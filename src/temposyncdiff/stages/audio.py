"""Audio encoder stage: the viseme head trained with cross-entropy on per-frame viseme labels.

Validation accumulates a confusion matrix over real frames and logs ``val/viseme_acc``, the macro recall
``val/viseme_balanced_acc``, ``val/majority_acc`` (the rate of the most frequent class: the score of always
guessing it) and the matrix as an image (loggers with ``log_image`` / ``add_image``; always a PNG under the run dir).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from temposyncdiff.data.batch import Batch
from temposyncdiff.data.visemes import VISEMES
from temposyncdiff.nets.audio_encoder import AudioEncoder
from temposyncdiff.stages.base import StageModule
from temposyncdiff.stages.syncnet import augment_mel
from temposyncdiff.utils.io import atomic_path


def confusion_figure(cm: Tensor, labels: tuple[str, ...] = VISEMES, title: str = "") -> Figure:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) as a matplotlib figure."""
    rates = (cm.float() / cm.sum(1, keepdim=True).clamp_min(1)).cpu().numpy()
    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    FigureCanvasAgg(fig)  # rendering without pyplot or a GUI backend
    ax = fig.add_subplot()
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticklabels([f"{n} ({int(c)})" for n, c in zip(labels, cm.sum(1))])
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def figure_image(fig: Figure) -> np.ndarray:
    """``[H,W,3]`` uint8 RGB rendering of a figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class AudioStage(StageModule):
    kind = "audio"
    export_names = {"best": "audio_encoder.pt"}

    def __init__(
        self,
        net: AudioEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        label_smoothing: float = 0.0,
        augment_audio: dict[str, Any] | None = None,
        log_confusion: bool = True,
    ) -> None:
        super().__init__(optimizer, scheduler)
        augment_audio = dict(augment_audio) if augment_audio else None  # plain: checkpoints stay weights_only-loadable
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.confusion = MulticlassConfusionMatrix(num_classes=net.config["num_visemes"])

    def _logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Viseme logits and labels of the batch's real frames: ``[N,num_visemes]``, ``[N]`` (voice jitter in training)."""
        aug = self.hparams.augment_audio
        mel = augment_mel(batch.mel, **aug) if self.training and aug else batch.mel
        return self.net(mel, batch.mel_mean)[1][batch.mask], batch.visemes[batch.mask]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits, target = self._logits(batch)
        loss = F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(-1) == target).float().mean()
        self.log_dict({"train/loss": loss, "train/viseme_acc": acc}, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits, target = self._logits(batch)
        self.log(f"{self._split()}/loss", F.cross_entropy(logits, target), batch_size=len(batch))
        self.confusion.update(logits, target)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        split, cm = self._split(), self.confusion.compute()
        self.confusion.reset()
        total, rows = cm.sum().clamp_min(1), cm.sum(1)
        recall = cm.diagonal()[rows > 0] / rows[rows > 0]
        self.log_dict(
            {
                f"{split}/viseme_acc": cm.diagonal().sum() / total,
                f"{split}/majority_acc": rows.max() / total,
                f"{split}/viseme_balanced_acc": recall.mean(),
            }
        )
        if self.hparams.log_confusion and not self.trainer.sanity_checking:
            self._log_confusion(f"{split}/viseme_confusion", cm)

    on_test_epoch_end = on_validation_epoch_end

    def _split(self) -> str:
        return "test" if self.trainer.testing else "val"

    def _log_confusion(self, key: str, cm: Tensor) -> None:
        step = self.global_step
        fig = confusion_figure(cm, title=f"{key} @ step {step}")
        image = figure_image(fig)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key, [image], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image(key, image, step, dataformats="HWC")
        path = Path(self.trainer.default_root_dir) / "confusion" / f"{key.replace('/', '_')}_{step:06d}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
