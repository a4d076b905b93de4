"""ONNX export: graphs match PyTorch, runtime=onnx generates the torch runtime's frames, stale/missing exports are errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from temposyncdiff.cli.export import export
from temposyncdiff.cli.infer import infer
from temposyncdiff.data.video import probe, read_frames
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.export.onnx import GRAPHS, TOLERANCE, export_onnx, load_onnx
from temposyncdiff.inference.pipeline import TalkingHeadPipeline
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.utils.weights import load_net, save_weights
from tests.helpers.configs import compose_config
from tests.helpers.nets import save_tiny_exports

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run on one intra-op thread


def tiny_denoiser(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    net = Denoiser(
        channels=(16,),
        attention_levels=(0,),
        cross_attention_levels=(0,),
        temporal_levels=(0,),
        heads=2,
        cond_dim=32,
        audio_dim=16,
        window=4,
        audio_encoder={"dim": 16, "width": 16, "context": 1, "mel_norm": "utterance"},  # normalised outside the graph
    )
    with torch.no_grad():  # zero-initialised output layers would hide most of the graph from the comparison
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny random teacher + VAE exports, and their ONNX export made with tsd-export."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    ckpt = root / "checkpoints"
    schedule = dict(NoiseSchedule().scheduler.config)
    save_weights(
        ckpt / "vae_pretrained.pt",
        "vae",
        TinyVAE(channels=(8, 8), patch_size=4, mid_attention=True),
        {"image_size": 32},
    )
    meta = {
        "schedule": {k: schedule[k] for k in SCHEDULE_KEYS},
        "sampler": "ddim",
        "steps": 2,
        "guidance_scale": 1.0,
        "overlap": 1,
        "image_size": 32,
    }
    save_weights(ckpt / "teacher_best.pt", "teacher", tiny_denoiser(0), meta)
    export(compose_config("export", ["stage=teacher"], root, root / "run"))
    return ckpt


def test_graphs_match_pytorch(exported):
    onnx_dir = exported / "onnx" / "teacher"
    sidecar = json.loads((onnx_dir / "export.json").read_text())
    assert set(sidecar["graphs"]) == set(GRAPHS) and sidecar["opset"] >= 18
    assert all(0 <= g["max_abs_diff"] <= TOLERANCE for g in sidecar["graphs"].values())
    assert sidecar["graphs"]["denoiser"]["inputs"]["x_t"] == ["batch", 4, 4, 4, 4]
    assert sidecar["graphs"]["audio_encoder"]["inputs"]["mel"] == ["batch", "frames", 80, 16]
    # the runtime stand-ins, called as the pipeline calls the torch nets, on fresh inputs
    net, _ = load_net(exported / "teacher_best.pt", "teacher")
    vae, _ = load_net(exported / "vae_pretrained.pt", "vae")
    onet, ovae = load_onnx(onnx_dir, exported / "teacher_best.pt", exported / "vae_pretrained.pt", "teacher", threads=1)
    g = torch.Generator().manual_seed(1)
    x, motion = torch.randn(2, 1, 4, 4, 4, 4, generator=g)
    image, ref, mel = (
        torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,
        torch.randn(1, 4, 4, 4, generator=g),
        torch.randn(1, 13, 80, 16, generator=g),
    )
    cond = {
        "ref_latent": ref,
        "motion": motion,
        "motion_mask": torch.tensor([[True, False, False, False]]),
        "t": torch.tensor([981]),
    }
    with torch.inference_mode():
        emb, logits = net.embed_audio(mel)
        pairs = [
            ((emb, logits), onet.embed_audio(mel)),
            (vae.to_latent(image), ovae.to_latent(image)),
            (vae.from_latent(x[0]), ovae.from_latent(x[0])),
        ]
        for audio_emb, visemes in (
            (emb[:, :4], logits[:, :4].argmax(-1)),
            (None, None),
        ):  # conditional and guided branch
            kw = {**cond, "audio_emb": audio_emb, "visemes": visemes}
            pairs.append((net(x, **kw), onet(x, **kw)))
    for a, b in pairs:
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert all(torch.allclose(u, v, atol=TOLERANCE, rtol=0) for u, v in zip(a, b))


def test_a_revoicing_nets_box_travels_with_its_graphs(tmp_path):
    """A pose-mask net's graphs take the pose input, and the stand-in knows the box it re-draws (paste-back uses it)."""
    box = (0.25, 0.5, 0.75, 0.9)
    save_tiny_exports(tmp_path, pose_mask=box)
    export_onnx(tmp_path / "teacher_best.pt", tmp_path / "vae_pretrained.pt", tmp_path / "onnx", kind="teacher")
    onet, _ = load_onnx(tmp_path / "onnx", tmp_path / "teacher_best.pt", tmp_path / "vae_pretrained.pt", "teacher")
    assert onet.pose_mask == box and "pose" in {i.name for i in onet.session.get_inputs()}
    sidecar = json.loads((tmp_path / "onnx" / "export.json").read_text())
    del sidecar["pose_mask"]  # an export made before the box was recorded: export again
    (tmp_path / "onnx" / "export.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match="pose_mask"):
        load_onnx(tmp_path / "onnx", tmp_path / "teacher_best.pt", tmp_path / "vae_pretrained.pt", "teacher")


def test_onnx_pipeline_matches_torch(exported, synth_corpus):
    frames, _ = read_frames(sorted(synth_corpus.glob("*/*.mp4"))[0])
    wave = np.random.default_rng(0).normal(0, 0.1, int(0.5 * 16000)).astype(np.float32)
    out = {}
    for runtime in ("torch", "onnx"):  # guidance 2: the unconditional branch runs too
        pipe = TalkingHeadPipeline.from_checkpoints(
            exported / "teacher_best.pt",
            kind="teacher",
            runtime=runtime,
            onnx_threads=1,
            guidance_scale=2.0,
            detector="center",
        )
        out[runtime], _ = pipe.generate(frames[0], wave)
    assert len(out["onnx"]) == len(out["torch"]) == 12
    diff = max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(out["torch"], out["onnx"]))
    assert diff <= 1  # uint8 rounding of float32 differences


def test_missing_stale_and_no_onnxruntime(exported, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported, ckpt)
    with pytest.raises(UserError, match="missing .*run `tsd-export stage=teacher"):
        TalkingHeadPipeline.from_checkpoints(
            ckpt / "teacher_best.pt", kind="teacher", runtime="onnx", onnx_dir=tmp_path / "none"
        )
    (ckpt / "onnx" / "teacher" / "denoiser.onnx").unlink()
    with pytest.raises(UserError, match="missing denoiser.onnx"):
        TalkingHeadPipeline.from_checkpoints(ckpt / "teacher_best.pt", kind="teacher", runtime="onnx")
    shutil.copytree(exported / "onnx", ckpt / "onnx", dirs_exist_ok=True)
    net, meta = load_net(ckpt / "teacher_best.pt", "teacher")
    save_weights(ckpt / "teacher_best.pt", "teacher", tiny_denoiser(1), meta)  # retrained after the export
    with pytest.raises(UserError, match="stale ONNX export .*teacher_best.pt"):
        TalkingHeadPipeline.from_checkpoints(ckpt / "teacher_best.pt", kind="teacher", runtime="onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"temposyncdiff\[export\]"):
        TalkingHeadPipeline.from_checkpoints(ckpt / "teacher_best.pt", kind="teacher", runtime="onnx")


def test_export_above_tolerance_fails_and_writes_no_sidecar(exported, tmp_path):
    with pytest.raises(UserError, match="vae_encoder.onnx differs from PyTorch"):
        export_onnx(
            exported / "teacher_best.pt", exported / "vae_pretrained.pt", tmp_path, kind="teacher", tolerance=-1.0
        )
    assert not list(tmp_path.iterdir())


def test_tsd_infer_runtime_onnx(exported, synth_corpus, tmp_path):
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[1]
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(read_frames(mp4)[0][0]).save(ref)
    alice = tmp_path / "checkpoints" / "own" / "alice"  # a model outside checkpoint_dir: its graphs go beside it
    alice.mkdir(parents=True)
    for name in ("teacher_best.pt", "vae_pretrained.pt"):
        shutil.copy(exported / name, alice / name)
    files = [f"checkpoint={alice / 'teacher_best.pt'}", f"vae={alice / 'vae_pretrained.pt'}"]
    export(compose_config("export", ["stage=teacher", "threads=1", *files], tmp_path, tmp_path / "run"))
    assert (alice / "onnx" / "teacher" / "export.json").is_file()
    cfg = compose_config(
        "infer",
        [
            f"ref_image={ref}",
            f"audio={mp4}",
            "stage=teacher",
            *files,
            "runtime=onnx",
            "threads=1",
            "run_name=t",
        ],
        tmp_path,
        tmp_path / "run",
    )
    report = infer(cfg)
    info = probe(tmp_path / "outputs" / "samples" / "t" / "sample.mp4")
    assert info.video_codec == "h264" and info.num_frames == report["timings"]["frames"] and report["runtime"] == "onnx"
