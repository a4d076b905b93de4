"""A pretrained diffusers first stage (AutoencoderTiny / AutoencoderKL): loading rules, the frozen stage, its export
and everything downstream that takes a first stage. Random-init weights of the real classes (none ship offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from temposyncdiff.errors import UserError
from temposyncdiff.nets.pretrained_vae import DiffusersVAE
from temposyncdiff.utils.weights import load_net, save_weights

SMALL_TINY = dict(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
)
SMALL_KL = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
)


def _save(kind: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers folder (config.json + safetensors) of a small random-init model of ``kind``."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**SMALL_TINY) if kind == "tiny" else AutoencoderKL(**SMALL_KL)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taesd(tmp_path_factory) -> Path:
    return _save("tiny", tmp_path_factory.mktemp("taesd"))


def _frames(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("kind", ["tiny", "kl"])
def test_a_diffusers_autoencoder_behind_the_first_stage_interface(kind, tmp_path):
    """Factor 8, 4 channels, [-1,1] frames in and out, frozen and in eval mode even after .train(); the export holds
    the architecture and weights, and rebuilds the same net without the folder."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    folder = _save(kind, tmp_path / "weights")
    vae = DiffusersVAE(kind, path=folder)
    x = _frames()
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 8) and (vae.downsample, vae.latent_channels) == (8, 4)
    assert not any(p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.training and not any(m.training for m in vae.modules())
    # the same numbers as diffusers' own model: latent and decoded frame
    ref = (AutoencoderTiny if kind == "tiny" else AutoencoderKL).from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref.encode(x).latents if kind == "tiny" else ref.encode(x).latent_dist.mean
        torch.testing.assert_close(mean, want)
        torch.testing.assert_close(vae.decode(mean), ref.decode(want).sample)
    vae.scale_factor.fill_(0.5)
    save_weights(tmp_path / "vae_pretrained.pt", "vae", vae, {})
    shutil.rmtree(folder)
    rebuilt, _ = load_net(tmp_path / "vae_pretrained.pt", "vae")
    assert isinstance(rebuilt, DiffusersVAE) and not rebuilt.pretrained
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.to_latent(x), vae.to_latent(x))
        torch.testing.assert_close(rebuilt.from_latent(vae.to_latent(x)), vae.from_latent(vae.to_latent(x)))


def test_weights_from_a_stable_diffusion_folder_and_from_the_hub_cache(tmp_path, monkeypatch):
    """A Stable Diffusion pipeline folder is read from its vae/ subfolder; a hub id from the Hugging Face cache only."""
    import huggingface_hub.constants

    _save("kl", tmp_path / "sd" / "vae")
    assert DiffusersVAE("kl", path=tmp_path / "sd").pretrained
    cache = tmp_path / "hub"
    commit = "0123abcd" * 5  # the hub cache's layout: refs/main names the snapshot of a commit
    _save("tiny", cache / "models--someone--taesd" / "snapshots" / commit)
    (cache / "models--someone--taesd" / "refs").mkdir()
    (cache / "models--someone--taesd" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    vae = DiffusersVAE("tiny", path="someone/taesd")
    assert vae.pretrained and vae.encode(_frames())[0].shape == (2, 4, 8, 8)
    with pytest.raises(UserError, match="someone/other: no such folder, and not a hub id in the Hugging Face cache"):
        DiffusersVAE("tiny", path="someone/other")


def test_unavailable_weights_and_unpicklable_files_are_refused(taesd, tmp_path):
    """No path: a one-line error naming the key. A folder whose weights are a pickle (.bin) is not read."""
    with pytest.raises(UserError, match="model.net.path="):
        DiffusersVAE("tiny")
    with pytest.raises(UserError, match="kind='vq'"):
        DiffusersVAE("vq", path=taesd)
    pickled = tmp_path / "pickled"
    shutil.copytree(taesd, pickled)
    weights = pickled / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), pickled / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="unavailable: .*pickled: not a diffusers AutoencoderTiny folder"):
        DiffusersVAE("tiny", path=pickled)


def test_the_frozen_stage_validates_fits_the_scale_and_exports(data_root, tmp_path, taesd, caplog):
    """tsd-train experiment=own/vae_pretrained: no weight moves; one pass logs val/psnr, fits the latent scale on
    training frames and exports vae_pretrained.pt, which the latents cache and the later stages load as any VAE."""
    from temposyncdiff.training import train
    from tests.helpers.configs import compose_config

    overrides = [
        "experiment=own/vae_pretrained",
        f"model.net.path={taesd}",
        "data.name=synth",
        "data.image_size=64",
        "data.batch_size=4",
        "data.val_max_items=8",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.cache_workers=1",
        "model.log_images=0",
        "model.scale_fit_batches=2",
        "trainer.num_sanity_val_steps=0",
        "~callbacks.rich_progress_bar",
        f"paths.checkpoint_dir={tmp_path / 'ckpt'}",
    ]
    cfg = compose_config("train", overrides, data_root, tmp_path / "run")
    train(cfg)
    vae, meta = load_net(tmp_path / "ckpt" / "vae_pretrained.pt", "vae")
    original = DiffusersVAE("tiny", path=taesd)
    for key, value in original.state_dict().items():
        if key != "scale_factor":
            assert torch.equal(vae.state_dict()[key], value), key
    assert float(vae.scale_factor) != 1.0 and meta["scale_factor"] == pytest.approx(float(vae.scale_factor))
    assert meta["val_psnr"] is not None and meta["image_size"] == 64 and meta["downsample"] == 8
    assert "pretrained first stage reconstructs the val frames at" in caplog.text  # random weights: far under 20 dB
    missing = compose_config("train", [*overrides[:1], *overrides[2:]], data_root, tmp_path / "run2")
    with pytest.raises(SystemExit) as exited:
        train(missing)
    assert (
        exited.value.code == 2 and "error: a pretrained first stage needs its weights: model.net.path=" in caplog.text
    )


def test_every_inference_runtime_takes_a_pretrained_first_stage(tmp_path, one_thread):
    """A DiffusersVAE export in the inference pipeline: tsd-export's graphs match PyTorch, and the onnx, bf16 and int8
    runtimes generate frames within their bounds of float32 (as for the recipe's own VAE, tests/test_precision.py)."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from temposyncdiff.export.onnx import TOLERANCE, export_onnx
    from temposyncdiff.inference.pipeline import TalkingHeadPipeline
    from temposyncdiff.inference.precision import CANDIDATES, Probe, psnr
    from tests.helpers.nets import save_tiny_exports
    from tests.test_precision import BOUND_DB

    save_tiny_exports(tmp_path)
    torch.manual_seed(0)
    save_weights(tmp_path / "vae_pretrained.pt", "vae", DiffusersVAE("tiny", config=SMALL_TINY), {"image_size": 32})
    sidecar = export_onnx(
        tmp_path / "teacher_best.pt", tmp_path / "vae_pretrained.pt", tmp_path / "onnx" / "teacher", "teacher"
    )
    assert all(sidecar["graphs"][g]["max_abs_diff"] <= TOLERANCE for g in ("vae_encoder", "vae_decoder"))
    pipe = TalkingHeadPipeline.from_checkpoints(tmp_path / "teacher_best.pt", kind="teacher", detector="center")
    assert isinstance(pipe.vae, DiffusersVAE) and pipe.latent_shape == (4, 4, 4)
    rng = np.random.default_rng(0)
    _, ref = pipe.reference(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    probe = Probe(pipe, ref, rng.normal(0, 0.1, 16000).astype(np.float32), threads=1)
    fp32 = probe.window((pipe.net, pipe.vae))
    for name in ("onnx", "bf16", "int8"):
        frames = probe.window(CANDIDATES[name].build(probe))
        assert frames.shape == fp32.shape == (4, 32, 32, 3) and psnr(frames, fp32) >= BOUND_DB[name], name


def test_the_recipe_takes_a_pretrained_first_stage(tmp_path):
    """tsd-pipeline experiment=own_video first_stage=taesd|sd first_stage_path=...: the vae step runs the frozen
    experiment on those weights; the default recipe's vae step (and so its fingerprint) is as it was."""
    from omegaconf import OmegaConf

    from tests.helpers.configs import compose_config

    def vae_step(*overrides: str) -> list[str]:
        own = ["pipeline=own_video", "inputs=me.mp4", "name=me", *overrides]
        steps = OmegaConf.to_container(compose_config("pipeline", own, tmp_path, tmp_path / "run").steps, resolve=True)
        return next(s["cmd"] for s in steps if s["name"] == "vae")

    trained = vae_step()
    assert trained[1] == "experiment=own/vae" and trained[-3:] == [
        "trainer=cpu",
        "trainer.max_steps=3000",
        "trainer.val_check_interval=3000",
    ]
    for kind, net in (("taesd", "tiny"), ("sd", "kl")):
        cmd = vae_step(f"first_stage={kind}", "first_stage_path=/weights/x")
        assert cmd[1] == "experiment=own/vae_pretrained" and cmd[-2:] == [
            f"model.net.kind={net}",
            "model.net.path=/weights/x",
        ]
        assert cmd[2:-2] == trained[2:-2]  # the same data, places and trainer
