"""EMA of a stage's trainable net only: Lightning's EMAWeightAveraging, pointed at one sub-module.

Lightning's callback averages (and deep-copies) the whole LightningModule; a stage that holds a
frozen VAE or teacher would then duplicate it in memory and "average" constant weights. Here the
average lives for ``pl_module.<attribute>`` alone; checkpoints keep Lightning's layout (averaged
weights under ``state_dict``, the live ones under ``current_model_state``), so a checkpoint's
``state_dict`` is the EMA model and resuming restores both.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel


class StageEMA(EMAWeightAveraging):
    def __init__(self, attribute: str = "net", decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.attribute = attribute

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, self.attribute)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            target = self._target(pl_module)
            device = self._device or pl_module.device
            self._average_model = AveragedModel(target, device=device, use_buffers=self._use_buffers, **self._kwargs)
        if self._average_model is not None:
            self._swap_models(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._average_model.update_parameters(self._target(pl_module))
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self._average_model.update_parameters(self._target(pl_module))
            self._latest_update_epoch = trainer.current_epoch

    def _pairs(self, pl_module: pl.LightningModule):
        module = self._target(pl_module)
        average = self._average_model.module
        return zip(
            itertools.chain(average.parameters(), average.buffers()),
            itertools.chain(module.parameters(), module.buffers()),
        )

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        for average, current in self._pairs(pl_module):
            tmp = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(tmp)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        for average, current in self._pairs(pl_module):
            current.data.copy_(average.data)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return
        prefix = f"{self.attribute}."
        averaged = self._average_model.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {
            **checkpoint["state_dict"],
            **{prefix + k[7:]: v for k, v in averaged.items() if k.startswith("module.")},
        }
        checkpoint["averaging_state"] = {k: v for k, v in averaged.items() if not k.startswith("module.")}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # outside fit (validate/test/predict) the module keeps state_dict, i.e. the averaged weights
        if self._average_model is None or "current_model_state" not in checkpoint or trainer.state.fn != "fit":
            return
        prefix = f"{self.attribute}."
        state = {"module." + k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        self._average_model.load_state_dict(state | checkpoint.get("averaging_state", {}))
        pl_module.load_state_dict(checkpoint["current_model_state"])
