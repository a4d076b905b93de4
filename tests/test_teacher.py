"""Stage 2 (teacher): training on cached latents with a frozen VAE, validation end to end, weights-only export."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from temposyncdiff.data.cache import add_latents
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.training import train
from temposyncdiff.utils.weights import load_net, save_weights
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run on one intra-op thread


TINY = ["experiment=quickstart/teacher", "data.batch_size=2", "data.num_workers=0", "data.persistent_workers=false",
        "data.clip_len=4", "data.val_max_items=2", "data.cache_workers=1", "~callbacks.rich_progress_bar",
        "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "model.net.channels=[8,16]", "model.net.cond_dim=16", "model.net.heads=2",
        "model.net.attention_levels=[1]", "model.net.cross_attention_levels=[1]", "model.net.temporal_levels=[0,1]",
        "model.net.audio_encoder.dim=16", "model.net.audio_encoder.width=16", "model.steps=2", "model.overlap=1",
        "model.val_utterances=2", "model.sample_videos=1", "model.temporal_weight=0.1", "model.identity_weight=0.1",
        "model.mouth_weight=2.0"]  # fmt: skip


def _setup(data_root, tmp_path, latents: bool):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    vae = TinyVAE(channels=(8,), latent_channels=4, patch_size=4)
    save_weights(ckpt / "vae_pretrained.pt", "vae", vae, {"scale_factor": 1.0})
    cfg = compose_config("train", [*TINY, f"paths.checkpoint_dir={ckpt}", f"data.cache_dir={tmp_path / 'cache'}"],
                         data_root, tmp_path / "run")  # fmt: skip
    if latents:
        dm = hydra.utils.instantiate(cfg.data)
        dm.prepare_data()
        for split in ("train", "val"):
            add_latents(dm.cache_path(split), vae.eval().to_latent, log=lambda *_: None)
    return cfg, ckpt


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
