"""Stage 2 (teacher): training on cached latents with a frozen VAE, validation end to end, weights-only export."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from temposyncdiff.training import train
from temposyncdiff.utils.weights import load_net
from tests.helpers.nets import teacher_run as _setup

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run on one intra-op thread


def test_teacher_trains_validates_and_exports(data_root, tmp_path):
    cfg, ckpt = _setup(data_root, tmp_path, latents=True)
    train(cfg)
    net, meta = load_net(ckpt / "teacher_best.pt", "teacher")
    assert net.audio is not None and meta["schedule"]["prediction_type"] == "v_prediction"
    assert meta["image_size"] == cfg.data.image_size  # inference and eval generate at the trained size
    assert (ckpt / "teacher_last.pt").is_file()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["state_dict"] and all(k.startswith("net.") for k in state["state_dict"])  # no VAE in checkpoints
    n_opt = sum(len(g["params"]) for g in state["optimizer_states"][0]["param_groups"])
    assert n_opt == len(list(net.parameters()))  # the optimiser holds exactly the net (with its audio encoder)
    assert list((tmp_path / "run" / "samples").rglob("*.mp4"))
    metrics = (tmp_path / "run" / "csv").rglob("metrics.csv")
    header = next(iter(metrics)).read_text().splitlines()[0]
    for key in (
        "val/loss",
        "val/psnr",
        "val/ssim",
        "val/psnr_mouth",
        "val/psnr_mouth_swapped",
        "val/psnr_upper_face",
        "val/seam_ratio",
    ):
        assert key in header


def test_teacher_with_a_pose_source_trains_and_validates(data_root, tmp_path):
    """pose_mask: training masks the target's own latents, validation re-voices the held-out frames."""
    cfg, ckpt = _setup(data_root, tmp_path, latents=True)
    cfg.model.net.pose_mask = [0.2, 0.5, 0.8, 1.0]
    train(cfg)
    net, _ = load_net(ckpt / "teacher_best.pt", "teacher")
    assert net.pose_mask == (0.2, 0.5, 0.8, 1.0)
    header = next(iter((tmp_path / "run" / "csv").rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "val/psnr_mouth_swapped" in header


def test_teacher_step_without_cached_latents(data_root, tmp_path):
    cfg, _ = _setup(data_root, tmp_path, latents=False)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    model = hydra.utils.instantiate(model_cfg)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model.setup("validate")
    batch = next(iter(dm.train_dataloader()))
    assert batch.latents is None
    out = model.losses(batch)  # latents encoded on the fly by the frozen VAE
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is None for p in model.frozen("vae").parameters())
    assert not any(n.startswith("vae") for n, _ in model.named_parameters())
