"""Lip shapes: landmark features, the cache's lips.npy, lip-conditioned teacher and student training."""

from __future__ import annotations

import json
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.batch import collate
from temposyncdiff.data.cache import META_NAME, add_latents, add_lips, build_cache, open_cache
from temposyncdiff.data.dataset import ClipDataset
from temposyncdiff.data.video import write_video
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.inference.pipeline import TalkingHeadPipeline
from temposyncdiff.metrics.mouth import LIP_FEATURES, lip_shape
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.stages.lip_gain import calibrate_lip_gain, calibrate_rendered_gain, set_lip_norm
from temposyncdiff.stages.lip_reader import fit_lip_reader, held_out_corr
from temposyncdiff.training import train
from temposyncdiff.utils.weights import load_net, save_weights
from tests.helpers.configs import TINY_STUDENT as STUDENT
from tests.helpers.configs import TINY_TEACHER as TEACHER
from tests.helpers.configs import compose_config
from tests.helpers.nets import save_tiny_exports
from tests.helpers.run_if import RunIf

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"log": lambda *_: None}


def test_lip_shape_gaps_and_width_over_the_eye_distance():
    pts = np.zeros((68, 2))
    pts[36:42], pts[42:48] = (0.0, 0.0), (10.0, 0.0)
    pts[[61, 62, 63]], pts[[67, 66, 65]] = (5.0, 8.0), (5.0, 10.0)  # inner gap 2
    pts[[50, 51, 52]], pts[[58, 57, 56]] = (5.0, 7.0), (5.0, 12.0)  # outer gap 5
    pts[48], pts[54] = (1.0, 9.0), (9.0, 9.0)  # corners 8 apart
    assert lip_shape(pts) == pytest.approx([0.2, 0.5, 0.8])
    assert len(LIP_FEATURES) == 3


def _fake_lips(cache_dir, seed: int = 0) -> np.ndarray:
    """Write a lips.npy of known values into a cache as add_lips would (no dlib needed)."""
    reader = open_cache(cache_dir)
    n = len(reader.frames)
    lips = np.random.default_rng(seed).normal([0.03, 0.2, 0.8], [0.02, 0.03, 0.04], (n, 3)).astype(np.float32)
    np.save(reader.root / "lips.npy", lips)
    meta = json.loads((reader.root / META_NAME).read_text())
    meta["lips"] = {"features": list(LIP_FEATURES), "frames_without_face": 0}
    (reader.root / META_NAME).write_text(json.dumps(meta))
    return lips


@RunIf(modules=("dlib",))
def test_add_lips_measures_known_lip_gaps_and_batches_carry_them(tmp_path):
    """A real face (grace_hopper) with the mouth opened by known gaps: the cached inner opening grows with the gap;
    the shapes are reused, read back and batched."""
    matplotlib = pytest.importorskip("matplotlib")
    from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box
    from temposyncdiff.metrics.mouth import LipLandmarks

    try:
        landmarks = LipLandmarks()
    except OSError as err:
        pytest.skip(str(err))
    img = np.asarray(Image.open(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg").convert("RGB"))
    face = crop_resize(img, square_crop_box(FaceDetector().detect(img), img.shape[1], img.shape[0]), 128)
    pts = landmarks.points(face, landmarks.track(face[None]).boxes[0])
    lip_y, x0, x1 = round(pts[60:68, 1].mean()), int(pts[48, 0]), int(pts[54, 0]) + 1

    def open_by(h: int) -> np.ndarray:
        out = np.concatenate([face[:lip_y], np.repeat(face[lip_y - 1 : lip_y], h, axis=0), face[lip_y:]])[:128]
        out[lip_y : lip_y + h, x0:x1] = (70, 25, 30)
        return out

    gaps = [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    mp4 = tmp_path / "talk" / "00001.mp4"
    mp4.parent.mkdir()
    write_video(mp4, [open_by(h) for h in gaps], 25.0, np.zeros(16000 * len(gaps) // 25, np.float32), 16000)
    row = {"id": "talk/00001", "talk_id": "talk", "video_mp4": str(mp4), "num_frames": len(gaps), "fps": 25.0}
    build_cache([row], tmp_path / "cache", 128, AudioFeatures(), **QUIET)
    add_lips(tmp_path / "cache", **QUIET)
    reader = open_cache(tmp_path / "cache")
    inner = reader.lips[:, 0]
    assert reader.lips.shape == (len(gaps), 3) and reader.meta["lips"]["frames_without_face"] == 0
    assert np.all(np.diff(inner[::2]) > 0.01)  # wider gap, wider opening (H.264 blurs, so pairs, not each frame)
    before = (tmp_path / "cache" / "lips.npy").stat().st_mtime_ns
    add_lips(tmp_path / "cache", **QUIET)  # reused
    assert (tmp_path / "cache" / "lips.npy").stat().st_mtime_ns == before
    add_latents(tmp_path / "cache", TinyVAE(channels=(8,), patch_size=4).eval().to_latent, **QUIET)
    assert open_cache(tmp_path / "cache").lips is not None  # adding latents keeps the shapes
    ds = ClipDataset(open_cache(tmp_path / "cache"), 4, 4, AudioFeatures(), train=False)
    batch = collate([ds[0], ds[1]])
    assert batch.lips.shape == (2, 4, 3)
    assert torch.allclose(batch.lips[1], torch.from_numpy(np.array(reader.lips[4:8])))


def test_teacher_learns_lip_shapes_from_the_cache(data_root, tmp_path):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    vae = TinyVAE(channels=(8,), latent_channels=4, patch_size=4)
    save_weights(ckpt / "vae_pretrained.pt", "vae", vae, {"scale_factor": 1.0})
    cfg = compose_config(
        "train",
        [
            *TEACHER,
            f"paths.checkpoint_dir={ckpt}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.net.lip_dim=3",
            "model.lip_read_weight=0.5",
            "model.lip_reader_steps=20",
            "model.val_utterances=0",
        ],
        data_root,
        tmp_path / "run",
    )
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    for split in ("train", "val"):
        add_latents(dm.cache_path(split), vae.eval().to_latent, **QUIET)
    lips = _fake_lips(dm.cache_path("train"))
    _fake_lips(dm.cache_path("val"), seed=1)
    train(cfg)
    net, _ = load_net(ckpt / "teacher_best.pt", "teacher")
    assert net.lip_dim == 3 and net.lip_reader is not None  # added for lip_read_weight, kept in the export
    assert torch.allclose(net.lip_norm, torch.from_numpy(np.stack([lips.mean(0), lips.std(0, ddof=1)])), atol=1e-5)
    header = next(iter((tmp_path / "run" / "csv").rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "train/lips" in header and "val/lips" in header and "val/lip_corr" in header
    assert "train/lip_read" in header.split(",")
    assert torch.allclose(
        net.lip_reader.norm, torch.from_numpy(np.stack([lips.mean(0), lips.std(0, ddof=1)])), atol=1e-5
    )
    assert not torch.equal(net.lip_gain, torch.ones(3)) and ((net.lip_gain >= 0.5) & (net.lip_gain <= 4)).all()


@pytest.mark.parametrize("relative", ["mean", "scale"])
def test_relative_lip_shapes_are_in_each_talks_own_range(data_root, tmp_path, relative):
    """lip_relative: batches carry their talk's mean and std shape; the net's standardisation is then fitted on, and
    applied to, each frame relative to them (mean: the deviation; scale: also over the std), so people whose mouths
    differ by far more than they move share one scale."""
    cfg = compose_config("train", [*TEACHER, f"data.cache_dir={tmp_path / 'cache'}"], data_root, tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    reader = open_cache(dm.cache_path("train"))
    talks = sorted(set(reader.talk_ids))
    assert len(talks) > 1
    offset = {t: np.array([0.05 * i, 0.1 * i, -0.02 * i], np.float32) for i, t in enumerate(talks)}
    spread = {t: 1.0 + 2.0 * i for i, t in enumerate(talks)}  # the second talk's mouth moves 3x the first's
    per_frame = [(offset[t], spread[t]) for t in reader.talk_ids]
    raw = _fake_lips(dm.cache_path("train"))
    raw = np.repeat([s for _, s in per_frame], reader.num_frames)[:, None] * (raw - raw.mean(0)) + raw.mean(0)
    raw = (raw + np.repeat([o for o, _ in per_frame], reader.num_frames, 0)).astype(np.float32)
    np.save(reader.root / "lips.npy", raw)
    of_talk = {t: raw[np.repeat([u == t for u in reader.talk_ids], reader.num_frames)] for t in talks}
    _fake_lips(dm.cache_path("val"), seed=1)  # held out: read in its people's range in the training footage
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    talk_of = dict(zip(reader.ids, reader.talk_ids))
    stats = [np.stack([of_talk[talk_of[i]].mean(0), of_talk[talk_of[i]].std(0)]) for i in batch.ids]
    np.testing.assert_allclose(batch.lip_person.numpy(), stats, atol=1e-5)
    val_src = dm.datasets["val"].dataset.src if hasattr(dm.datasets["val"], "dataset") else dm.datasets["val"].src
    assert set(val_src.known_lips) == set(talks)  # held out: people are read in their training footage's range
    val_own = val_src.reader.talk_lip_stats()
    assert not set(val_own) & set(talks)  # this corpus holds out other speakers: their own footage's range
    np.testing.assert_allclose(val_src.lip_person(0), val_own[val_src.talk_ids[0]])
    val_src.known_lips[val_src.talk_ids[0]] = known = np.ones((2, 3), np.float32)
    assert val_src.lip_person(0) is known
    net = lip_net()
    net.lip_relative = relative
    set_lip_norm(net, dm)
    within = np.concatenate([(v - v.mean(0)) / (v.std(0) if relative == "scale" else 1) for v in of_talk.values()])
    assert torch.allclose(net.lip_norm[0], torch.zeros(3), atol=1e-5)
    np.testing.assert_allclose(net.lip_norm[1].numpy(), within.std(0, ddof=1), rtol=1e-4)
    mean, std = batch.lip_person[:, None, 0], batch.lip_person[:, None, 1]
    expect = (batch.lips - mean) / (std if relative == "scale" else 1) / net.lip_norm[1]
    assert torch.allclose(net.standardize_lips(batch.lips, batch.lip_person), expect, atol=1e-5)
    with pytest.raises(ValueError, match="person"):
        net.standardize_lips(batch.lips)
    absolute = lip_net()
    set_lip_norm(absolute, dm)
    if relative == "mean":  # the talks' offsets inflate a pooled scale (the first two shapes' offsets are large)
        assert (absolute.lip_norm[1][:2] > 1.1 * net.lip_norm[1][:2]).all()
    else:  # each talk in its own range: every frame's shape is a z-score of its talk's
        assert torch.allclose(net.lip_norm[1], torch.ones(3), atol=0.05)
    with pytest.raises(ValueError, match="lip_relative"):
        Denoiser(channels=(8,), lip_relative="yes")


def _val_batches(lips: torch.Tensor, standard: torch.Tensor):
    """Val batches of known lip shapes whose 'audio' is the standardised truth (so a fake head can shrink it)."""
    for part, audio in zip(lips.split(2), standard.split(2)):
        batch = SimpleNamespace(
            mel=audio,
            mel_mean=torch.zeros(len(part), 80),
            visemes=torch.zeros(len(part), 4, dtype=torch.long),
            lips=part,
            lip_person=None,
            mask=torch.ones(len(part), 4, dtype=torch.bool),
        )
        batch.to = lambda _device, batch=batch: batch
        yield batch


def lip_net() -> Denoiser:
    """The smallest denoiser with a 3-shape lip head."""
    levels = {"attention_levels": (), "cross_attention_levels": (), "temporal_levels": ()}
    return Denoiser(
        channels=(8,),
        **levels,
        heads=1,
        cond_dim=8,
        audio_dim=4,
        window=4,
        lip_dim=3,
        audio_encoder={"dim": 4, "width": 4},
    )


def test_lip_gain_makes_the_heads_predictions_vary_as_the_held_out_truth():
    net = lip_net()
    net.lip_norm.copy_(torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 1.0]]))
    truth = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
    shrink = torch.tensor([0.5, 1.0, 0.1])  # a head that predicts the truth at 1/2, 1 and 1/10 of its spread
    net.embed_audio = lambda mel, mel_mean: (mel, None)
    net.predict_lips = lambda emb, visemes: emb * shrink
    dm = SimpleNamespace(val_dataloader=lambda: _val_batches(truth, net.standardize_lips(truth)))
    net.train()
    calibrate_lip_gain(net, dm, torch.device("cpu"), "test")
    assert torch.allclose(net.lip_gain, torch.tensor([2.0, 1.0, 4.0]), atol=1e-5)  # 1/10 -> clamped to 4
    assert net.training  # its mode is given back
    no_lips = SimpleNamespace(val_dataloader=lambda: iter([SimpleNamespace(lips=None)]))
    calibrate_lip_gain(net, no_lips, torch.device("cpu"), "test")  # no lip shapes held out: no scaling
    assert torch.equal(net.lip_gain, torch.ones(3))


@pytest.mark.parametrize("relative", ["none", "mean", "scale"])
def test_given_lip_shapes_replace_the_heads_in_generation(tmp_path, relative):
    """TalkingHeadPipeline.frames(lips=...): each window draws the given raw shapes, standardised, not the head's
    (a lip_relative net: relative to the given shapes' own mean and std)."""
    save_tiny_exports(tmp_path, lip_dim=3)
    pipe = TalkingHeadPipeline.from_checkpoints(tmp_path / "teacher_best.pt", kind="teacher", steps=1)
    pipe.net.lip_norm.copy_(torch.tensor([[0.1, 0.2, 0.8], [0.05, 0.05, 0.1]]))
    pipe.net.lip_relative = relative
    face, ref = pipe.reference(np.full((64, 64, 3), 128, np.uint8))
    wave = np.random.default_rng(0).normal(0, 0.1, 6 * 640).astype(np.float32)  # 6 frames: windows 0-3, 2-5
    lips = np.stack([np.linspace(0.0, 0.5, 6), np.linspace(0.1, 0.6, 6), np.full(6, 0.9)], axis=1)
    seen, forward = [], pipe.net.forward
    pipe.net.forward = lambda *a, lips=None, **k: seen.append(lips) or forward(*a, lips=lips, **k)
    given = np.stack(list(pipe.frames(ref, wave, lips=lips)))
    drawn = np.stack([s[0, :, 0].numpy() for s in seen if s is not None])
    mean = lips[:, 0].mean() if relative != "none" else 0.0
    std = lips[:, 0].std() if relative == "scale" else 1.0
    expect = [((lips[a : a + 4, 0] - mean) / std - 0.1) / 0.05 for a in (0, 2)]
    np.testing.assert_allclose(drawn, expect, rtol=1e-5, atol=1e-4)
    assert given.shape == (6, 32, 32, 3)
    seen.clear()
    list(pipe.frames(ref, wave))
    assert seen and all(s is None for s in seen)  # without shapes the net's head predicts them


def test_lip_reader_is_fitted_to_the_lower_face_then_frozen_and_passes_gradients_to_the_latents():
    torch.manual_seed(0)
    levels = {"attention_levels": (), "cross_attention_levels": (), "temporal_levels": ()}
    small = {"channels": (8,), **levels, "heads": 1, "cond_dim": 8, "audio_dim": 4, "window": 4}
    net = Denoiser(
        **small, lip_dim=3, audio_encoder={"dim": 4, "width": 4}, pose_mask=(0.25, 0.5, 0.75, 1), lip_reader=True
    )
    gen = torch.Generator().manual_seed(0)

    def cache(utterances: int, frames: int = 20) -> SimpleNamespace:
        """Noise latents whose lower-face cells (rows 4-7, columns 2-5) show each frame's lip shape."""
        shapes = torch.randn(utterances * frames, 3, generator=gen)
        latents = torch.randn(utterances * frames, 4, 8, 8, generator=gen) * 0.3
        latents[:, :3, 4:, 2:6] += shapes[..., None, None]
        lips = torch.tensor([0.1, 0.3, 0.8]) + torch.tensor([0.05, 0.05, 0.1]) * shapes
        return SimpleNamespace(
            latents=latents.numpy(), latents_mirror=None, lips=lips.numpy(), num_frames=[frames] * utterances
        )

    train, val = cache(20), cache(4)
    dm = SimpleNamespace(
        datasets={k: SimpleNamespace(src=SimpleNamespace(reader=c)) for k, c in (("train", train), ("val", val))}
    )
    fit_lip_reader(net, dm, torch.device("cpu"), "test", steps=300)
    assert torch.allclose(
        net.lip_reader.norm, torch.from_numpy(np.stack([train.lips.mean(0), train.lips.std(0, ddof=1)]))
    )
    assert held_out_corr(net, val, torch.device("cpu")) > 0.9
    assert not any(p.requires_grad for p in net.lip_reader.parameters())
    fitted = {k: v.clone() for k, v in net.lip_reader.state_dict().items()}
    fit_lip_reader(net, dm, torch.device("cpu"), "test", steps=300)  # fitted already (resumed, or the teacher's)
    assert all(torch.equal(v, net.lip_reader.state_dict()[k]) for k, v in fitted.items())

    latents = torch.from_numpy(val.latents).unflatten(0, (4, 20))
    read = net.read_lips(latents)
    upper = latents.clone()
    upper[..., :4, :] += 5.0  # the upper face is not read
    assert torch.equal(net.read_lips(upper), read)
    latents.requires_grad_(True)
    net.read_lips(latents).square().sum().backward()
    assert latents.grad.abs().sum() > 0 and all(p.grad is None for p in net.lip_reader.parameters())

    fresh = Denoiser(**small, lip_dim=3, audio_encoder={"dim": 4, "width": 4}, lip_reader=True)
    train.latents = None
    with pytest.raises(UserError, match="cached latents and lip shapes"):
        fit_lip_reader(fresh, dm, torch.device("cpu"), "test")
    with pytest.raises(ValueError, match="a lip reader needs lip_dim"):
        Denoiser(**small, lip_reader=True)


@pytest.mark.parametrize("teacher_reader", [False, True])
def test_student_draws_the_teachers_lip_shapes_and_learns_its_head(data_root, tmp_path, teacher_reader):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    vae = TinyVAE(channels=(8,), latent_channels=4, patch_size=4)
    save_weights(ckpt / "vae_pretrained.pt", "vae", vae, {})
    teacher = Denoiser(
        channels=(16, 16),
        attention_levels=(1,),
        cross_attention_levels=(1,),
        temporal_levels=(0, 1),
        heads=2,
        cond_dim=16,
        audio_dim=16,
        window=4,
        lip_dim=3,
        audio_encoder={"dim": 16, "width": 16, "context": 1},
        lip_reader=teacher_reader,
    )
    teacher.lip_norm.copy_(torch.tensor([[0.03, 0.2, 0.8], [0.02, 0.03, 0.04]]))
    if teacher_reader:
        teacher.lip_reader.norm.copy_(teacher.lip_norm * 2)
    sch = NoiseSchedule().scheduler.config
    meta = {"schedule": {k: sch[k] for k in SCHEDULE_KEYS}, "sampler": "ddim", "steps": 50, "guidance_scale": 2.0}
    save_weights(ckpt / "teacher_best.pt", "teacher", teacher, meta)
    cfg = compose_config(
        "train",
        [
            *STUDENT,
            f"paths.checkpoint_dir={ckpt}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.net.lip_dim=3",
            "model.lip_read_weight=0.5",
            "model.lip_reader_steps=20",
            "model.syncnet_weights=null",
        ],
        data_root,
        tmp_path / "run",
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    model = hydra.utils.instantiate(model_cfg)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    lips = _fake_lips(dm.cache_path("train"))
    add_latents(dm.cache_path("train"), vae.eval().to_latent, **QUIET)  # what the student's own reader is fitted on
    dm.setup("fit")
    model._trainer = SimpleNamespace(datamodule=dm)  # what setup reads of a Trainer
    model.setup("fit")
    assert torch.equal(model.net.lip_norm, teacher.lip_norm)
    reader = model.net.lip_reader.state_dict()  # the teacher's reader, else one fitted to the data, frozen
    if teacher_reader:
        assert all(torch.equal(v, teacher.lip_reader.state_dict()[k]) for k, v in reader.items())
    else:
        assert torch.allclose(
            reader["norm"], torch.from_numpy(np.stack([lips.mean(0), lips.std(0, ddof=1)])), atol=1e-5
        )
    assert not any(p.requires_grad for p in model.net.lip_reader.parameters())
    couplings = model.couplings("train", dm.train_dataloader().dataset)
    assert couplings.lips.shape == (*couplings.visemes.shape, 3) and couplings.lips.abs().sum() > 0
    out = model.losses(next(iter(dm.train_dataloader())))
    out["loss"].backward()
    assert all(k in out and torch.isfinite(out[k]) for k in ("lips", "lip_read"))
    assert all(p.grad is not None for p in model.net.lip_head.parameters())
    with pytest.raises(Exception, match="lip_read_weight > 0 needs a lip-conditioned net"):  # in Hydra's wrapping
        hydra.utils.instantiate({**model_cfg, "net": {**model_cfg["net"], "lip_dim": 0}})
    model_cfg["net"]["lip_relative"] = "scale"  # the teacher's shapes are absolute: a relative student is refused
    with pytest.raises(ValueError, match="lip_relative"):
        hydra.utils.instantiate(model_cfg).setup("fit")


class _BrightnessLips:
    """Stands in for ``LipLandmarks``: a frame's 'lip opening' is its mean brightness (one box per frame)."""

    def truth(self, frames: np.ndarray):
        return SimpleNamespace(boxes=np.zeros((len(frames), 4))), self.openings(frames, None)

    def openings(self, frames: np.ndarray, boxes) -> np.ndarray:
        return frames.reshape(len(frames), -1).mean(1).astype(np.float64)


def test_rendered_gain_picks_the_multiplier_whose_rendered_lips_swing_as_the_truths():
    net = lip_net()
    net.lip_gain.copy_(torch.tensor([1.0, 2.0, 0.5]))  # the shape-level calibration's result
    wave = torch.sin(torch.arange(40.0) / 3)
    utts = [{"frames": (0.5 * wave * s)[:, None, None, None].expand(-1, 3, 8, 8)} for s in (0.8, 1.0)]
    # a renderer that draws the lips at 0.4x the gain it is given: x2.5 of the first gain renders the truth's swing
    rendered = {"calls": 0}

    def render(utt):
        rendered["calls"] += 1
        return (utt["frames"] * 0.4 * net.lip_gain[0] + 1) / 2

    out = calibrate_rendered_gain(net, render, utts, [1.0, 1.5, 2.0, 2.5, 3.0], _BrightnessLips())
    assert out["multiplier"] == 2.5 and rendered["calls"] == 10
    assert torch.allclose(net.lip_gain, torch.tensor([2.5, 5.0, 1.25]))
    amplitudes = [r["amplitude"] for r in out["rows"]]
    assert amplitudes == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.2], abs=0.02)
    assert all(r["corr"] > 0.99 and r["clips"] == 2 for r in out["rows"])
    net.lip_gain.copy_(torch.ones(3))  # a still mouth in the truth: nothing to scale by; the gain is kept
    still = [{"frames": torch.zeros(40, 3, 8, 8)}]
    out = calibrate_rendered_gain(net, render, still, [1.0, 2.0], _BrightnessLips())
    assert out["multiplier"] == 1.0 and "no val utterance" in out["reason"] and torch.equal(net.lip_gain, torch.ones(3))
