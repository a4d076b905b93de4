"""Log the validation sample videos a stage wrote (``pl_module.sample_paths``, mp4 with the audio track).

The stage samples and writes the videos itself during validation; this callback only publishes them: to W&B
(``WandbLogger.log_video``, one key per utterance) when a ``WandbLogger`` is among the trainer's loggers, and,
for every logger, as an entry in ``<run dir>/samples/index.json`` (step, epoch and paths relative to the run dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from temposyncdiff.utils.io import write_json


class SampleVideos(pl.Callback):
    def __init__(self, key: str = "val/samples", index: str = "samples/index.json") -> None:
        self.key = key
        self.index = index

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        paths = [Path(p) for p in getattr(pl_module, "sample_paths", ())]
        if trainer.sanity_checking or not trainer.is_global_zero or not paths:
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the mp4 keeps its own frame rate and audio
                for path in paths:
                    logger.log_video(f"{self.key}/{path.stem}", [str(path)], step=step, caption=[f"step {step}"])
        root = Path(trainer.default_root_dir)
        index = root / self.index
        entries = json.loads(index.read_text()) if index.is_file() else []
        videos = [os.path.relpath(p, root) for p in paths]
        entries.append({"step": step, "epoch": trainer.current_epoch, "videos": videos})
        write_json(index, entries)
