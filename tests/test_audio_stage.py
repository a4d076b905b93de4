"""AudioStage: a training step, validation metrics and the confusion-matrix image with a CSV logger, export."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from temposyncdiff.stages.audio import confusion_figure, figure_image
from temposyncdiff.utils.weights import load_net
from tests.helpers.configs import compose_config
from tests.test_syncnet_stage import instantiate_stage

TINY = ["experiment=quickstart/audio", "data.batch_size=4", "data.clip_len=12", "data.cache_workers=1",
        "data.num_workers=0", "data.persistent_workers=false", "data.val_max_items=4", "model.net.width=16",
        "model.net.dim=16"]  # fmt: skip


def test_training_step_changes_weights(data_root: Path, tmp_path: Path):
    dm, stage = instantiate_stage(compose_config("train", TINY, data_root, tmp_path / "run"))
    batch = next(iter(dm.train_dataloader()))
    before = [p.detach().clone() for p in stage.net.parameters()]
    opt = stage.configure_optimizers()["optimizer"]
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        stage.training_step(batch, 0).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, stage.net.parameters()))


def test_validation_logs_confusion_with_csv_logger_and_exports(data_root: Path, tmp_path: Path):
    dm, stage = instantiate_stage(compose_config("train", TINY, data_root, tmp_path / "run"))
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage, datamodule=dm)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = next(r for r in rows if r.get("val/viseme_acc"))
    assert 0 <= float(val["val/viseme_acc"]) <= 1 and 0 < float(val["val/majority_acc"]) <= 1
    assert [p.name for p in (tmp_path / "confusion").iterdir()] == ["val_viseme_confusion_000002.png"]  # not sanity
    (path,) = stage.export(tmp_path / "ck", None)
    net, meta = load_net(path, "audio")
    assert path.name == "audio_encoder.pt" and meta["stage"] == "audio" and net.config == stage.net.config


def test_confusion_image():
    cm = torch.zeros(15, 15, dtype=torch.long)
    cm[0, 0], cm[1, 2] = 5, 3
    image = figure_image(confusion_figure(cm))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
