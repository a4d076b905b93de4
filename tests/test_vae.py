"""Stage 1 (VAE) and the shared machinery: training step, overfit, EMA, export, resume, bad checkpoints, disk full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from temposyncdiff.data.batch import Batch
from temposyncdiff.errors import UserError
from temposyncdiff.regions import region_weight
from temposyncdiff.training import train
from temposyncdiff.utils.io import DiskFullError
from temposyncdiff.utils.weights import WeightsError, load_net, save_weights
from tests.helpers.configs import TINY_VAE as TINY
from tests.helpers.configs import compose_config, face_regions


def _cfg(data_root, tmp_path, *extra):
    return compose_config("train", [*TINY, *extra], data_root, tmp_path / "run")


def _modules(cfg):
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return hydra.utils.instantiate(model_cfg, _convert_="all"), dm  # plain hparams, as tsd-train makes them


def test_step_changes_weights_and_overfit(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "trainer.max_steps=40")
    model, dm = _modules(cfg)
    batch: Batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW(model.net.parameters(), lr=3e-3)
    before = [p.detach().clone() for p in model.net.parameters()]
    losses = []
    for _ in range(60):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    assert losses[-1] < 0.5 * losses[0]


class _Probe(L.Callback):
    """Records the net's and the EMA slot's weights when validation starts (after the EMA swap)."""

    def __init__(self, ema):
        self.ema, self.seen = ema, []

    def on_validation_epoch_start(self, trainer, pl_module):
        live = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        slot = torch.cat([p.detach().flatten() for p in self.ema._average_model.module.parameters()])
        self.seen.append((live.clone(), slot.clone()))


def test_ema_is_used_for_validation_and_checkpoints(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=6", "callbacks.ema.decay=0.9")
    model, dm = _modules(cfg)
    ema = hydra.utils.instantiate(cfg.callbacks.ema)
    ckpt = hydra.utils.instantiate(cfg.callbacks.model_checkpoint)
    probe = _Probe(ema)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[ema, ckpt, probe], logger=False)
    trainer.fit(model, datamodule=dm)
    live_at_val, slot_at_val = probe.seen[-1]
    assert not torch.allclose(live_at_val, slot_at_val)  # validation ran on other (EMA) weights than training
    state = torch.load(ckpt.last_model_path, weights_only=True)
    saved = torch.cat(
        [v.flatten() for k, v in state["state_dict"].items() if k.startswith("net.") and "scale_factor" not in k]
    )
    raw = torch.cat(
        [
            v.flatten()
            for k, v in state["current_model_state"].items()
            if k.startswith("net.") and "scale_factor" not in k
        ]
    )
    assert torch.allclose(saved, live_at_val) and torch.allclose(raw, slot_at_val)
    assert not any(k.startswith("module.") for k in state["averaging_state"])


def test_train_export_and_resume(data_root, tmp_path):
    full = train(
        _cfg(
            data_root, tmp_path / "a", "trainer.max_steps=6", "trainer.val_check_interval=3", "callbacks.ema.decay=0.9"
        )
    )
    assert full is not None
    exported = data_root / "checkpoints" / "vae_pretrained.pt"
    payload = torch.load(exported, weights_only=True)
    assert payload["format"] == "temposyncdiff.vae" and payload["meta"]["scale_factor"] > 0
    net, meta = load_net(exported, "vae")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert net.from_latent(net.to_latent(x)).shape == x.shape

    # a run that crashes during step 5 resumes with ckpt_path=last from the step-3 checkpoint and ends at step 6
    overrides = [
        *TINY,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "task_name=resume",
        "export=false",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    first_dir = data_root / "logs" / "resume" / "runs" / "first"
    first = compose_config(
        "train",
        [*overrides, "+callbacks.crash._target_=tests.test_vae.CrashAt", "+callbacks.crash.step=4"],
        data_root,
        first_dir,
    )
    (first_dir / ".hydra").mkdir()
    OmegaConf.save(first, first_dir / ".hydra" / "config.yaml")  # as Hydra writes it for every run
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(first)
    assert torch.load(first_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    StepLog.seen = []
    resumed = compose_config(
        "train",
        [*overrides, "ckpt_path=last", "+callbacks.steps._target_=tests.test_vae.StepLog"],
        data_root,
        tmp_path / "c" / "run",
    )
    train(resumed)
    assert StepLog.seen[0] == 3 and StepLog.seen[-1] == 5
    c = torch.load(tmp_path / "c" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert c["global_step"] == 6 and "current_model_state" in c


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class StepLog(L.Callback):
    seen: list[int] = []

    def on_train_batch_start(self, trainer, *args):
        StepLog.seen.append(trainer.global_step)


def test_bad_weight_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a readable"):
        load_net(junk, "vae")
    with pytest.raises(FileNotFoundError):
        load_net(tmp_path / "missing.pt", "vae")
    from temposyncdiff.nets.vae import TinyVAE

    other = save_weights(tmp_path / "teacher.pt", "teacher", TinyVAE(channels=(8,), patch_size=2))
    with pytest.raises(WeightsError, match="expected 'temposyncdiff.vae'"):
        load_net(other, "vae")
    newer = torch.load(other, weights_only=True) | {"format": "temposyncdiff.vae", "version": 99}
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(WeightsError, match="newer"):
        load_net(tmp_path / "newer.pt", "vae")
    torch.save({"state_dict": {}}, tmp_path / "lightning.ckpt")
    with pytest.raises(WeightsError, match="not a TempoSyncDiff export"):
        load_net(tmp_path / "lightning.ckpt", "vae")


def test_disk_full_export_keeps_previous_file(tmp_path, monkeypatch):
    from temposyncdiff.nets.vae import TinyVAE

    path = save_weights(tmp_path / "vae_pretrained.pt", "vae", TinyVAE(channels=(8,), patch_size=2))
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError, match=r"vae_pretrained\.pt: disk full \(No space left on device\)") as err:
        save_weights(path, "vae", TinyVAE(channels=(8,), patch_size=2))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["vae_pretrained.pt"]


def test_checkpoint_of_another_stage_is_refused(data_root, tmp_path, caplog):
    train(_cfg(data_root, tmp_path / "a", "trainer.max_steps=1", "trainer.val_check_interval=1", "export=false"))
    ckpt = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["stage"] == "vae"
    torch.save(ckpt | {"stage": "teacher"}, tmp_path / "teacher.ckpt")
    with pytest.raises(SystemExit):
        train(_cfg(data_root, tmp_path / "b", "trainer.max_steps=2", f"ckpt_path={tmp_path / 'teacher.ckpt'}"))
    assert "teacher.ckpt: a checkpoint of the 'teacher' stage, not of 'vae'" in caplog.text


def test_mouth_weight_emphasises_the_mouth_box():
    from temposyncdiff.stages.vae import reconstruction_loss

    target = torch.zeros(2, 3, 16, 16)
    inside, outside = target.clone(), target.clone()
    inside[..., 12, 8] = 1.0  # row 0.75, column 0.5: in the default mouth box
    outside[..., 2, 2] = 1.0
    weight = region_weight(16, 16, face_regions().mouth, 4.0)
    assert reconstruction_loss(inside, target) == reconstruction_loss(outside, target)
    assert reconstruction_loss(inside, target, "l1", weight) > 3 * reconstruction_loss(outside, target, "l1", weight)
    for kind in ("l1", "charbonnier", "mse"):  # the weight map averages to one: a uniform error keeps its loss
        err = torch.full_like(target, 0.5)
        assert torch.isclose(reconstruction_loss(err, target, kind, weight), reconstruction_loss(err, target, kind))
