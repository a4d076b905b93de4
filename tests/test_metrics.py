"""Fidelity (region PSNR/SSIM/MS-SSIM, LPIPS), identity and temporal metrics on tiny inputs."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from temposyncdiff.metrics import identity
from temposyncdiff.metrics.identity import IdentitySimilarity, as_uint8_frames
from temposyncdiff.metrics.image import LPIPS, FidelityMetrics, json_float, lpips_backbone_file, to_unit
from temposyncdiff.metrics.temporal import FlickerMetric, flicker, frame_differences, seam_error, seam_ratio
from temposyncdiff.regions import RegionBoxes, crop, region_weight
from tests.helpers.configs import face_regions

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets on shared CPUs


def unit_video(values, size: int = 8) -> torch.Tensor:
    """A video whose frame t is the constant ``values[t]`` on the [0,1] scale, as [T,3,H,W] in [-1,1]."""
    v = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)
    return (2 * v - 1).expand(-1, 3, size, size).clone()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---- image ----


def test_to_unit_layouts():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = to_unit(u8)
    assert x.shape == (2, 3, 5, 6) and torch.allclose(x * 255, torch.tensor(u8).permute(0, 3, 1, 2).float())
    assert np.array_equal(as_uint8_frames(u8), u8)
    levels = to_unit(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2)).amax((1, 2, 3))
    assert torch.equal(levels, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[T,3,H,W\]"):
        to_unit(torch.zeros(2, 4, 4, 3))
    assert [json_float(v) for v in (1.5, float("inf"), float("-inf"), float("nan"))] == [1.5, "inf", "-inf", None]


def test_region_boxes():
    r = RegionBoxes(mouth=[0.25, 0.5, 0.75, 1.0], upper_face=(0, 0, 1, 0.5))
    assert r.mouth == (0.25, 0.5, 0.75, 1.0) and [n for n, _ in r.items()] == ["full", "mouth", "upper_face"]
    assert [n for n, _ in r.parts()] == ["mouth", "upper_face"]
    assert crop(torch.zeros(1, 3, 64, 64), r.mouth).shape == (1, 3, 32, 32)
    assert crop(torch.zeros(4, 16, 8), r.mouth).shape == (4, 8, 4)  # rows from y, columns from x
    with pytest.raises(ValueError, match="mouth"):
        RegionBoxes(mouth=(0.5, 0.5, 0.4, 1.0), upper_face=(0, 0, 1, 0.5))
    weight = region_weight(16, 8, r.mouth, 3.0)  # the loss weighting covers exactly the cropped cells
    assert weight.sum() == 16 * 8 + 2 * 8 * 4 and bool((crop(weight, r.mouth) == 3).all())
    assert region_weight(16, 8, r.mouth, 1.0) is None


def test_fidelity_identical_and_different():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    m = FidelityMetrics(face_regions())
    m.update(target, target)
    out = m.compute()
    json.dumps(out, allow_nan=False)
    assert out["num_frames"] == 2
    for region in ("full", "mouth", "upper_face"):
        assert out[region]["psnr"] == "inf" and out[region]["ssim"] == pytest.approx(1.0, abs=1e-5)
        assert out[region]["ms_ssim"]["status"] == "unavailable" and "64x64" in out["full"]["ms_ssim"]["reason"]

    pred = target.clone()
    mouth = crop(pred, face_regions().mouth)
    mouth += 0.2  # [-1,1] scale: 0.1 on [0,1] -> MSE 0.01 -> 20 dB where nothing clamps
    m.reset()
    m.update(pred.clamp(-1, 1), target)
    out = m.compute()
    assert out["upper_face"]["psnr"] == "inf" and out["mouth"]["psnr"] == pytest.approx(20.0, abs=1.0)
    assert out["mouth"]["ssim"] < 0.99 and out["mouth"]["psnr"] < out["full"]["psnr"] < 100


def test_fidelity_ms_ssim_on_large_frames():
    x = torch.rand(1, 3, 176, 176, generator=torch.Generator().manual_seed(1)) * 2 - 1
    m = FidelityMetrics(RegionBoxes(mouth=(0.0, 0.5, 1.0, 1.0), upper_face=(0, 0, 1, 0.5)))
    m.update(x, x)
    out = m.compute()
    assert out["full"]["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["mouth"]["ms_ssim"]["status"] == "unavailable"


def test_lpips_unavailable_without_weights(tmp_path, no_network):
    missing = LPIPS(torch_home=tmp_path / "missing")
    assert not missing.available and "not found" in missing.reason
    x = torch.zeros(1, 3, 32, 32)
    missing.update(x, x)
    assert missing.compute() == {"status": "unavailable", "reason": missing.reason}
    assert LPIPS().compute()["status"] == "unavailable"


def test_lpips_uses_local_backbone(tmp_path, no_network):
    import torchvision

    path = lpips_backbone_file(tmp_path, "squeeze")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)  # stand-in for real weights
    hub_before = torch.hub.get_dir()
    m = LPIPS(torch_home=tmp_path, net_type="squeeze")
    assert m.available and torch.hub.get_dir() == hub_before
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m.update(x, x)
    out = m.compute()
    assert out["status"] == "ok" and out["num_frames"] == 2 and out["lpips"] == pytest.approx(0.0, abs=1e-6)


# ---- temporal ----


def test_flicker_values():
    assert flicker(unit_video([0.3] * 5)) == 0.0
    assert flicker(unit_video([0.25, 0.75] * 3)) == pytest.approx(0.5)
    u8 = np.zeros((4, 4, 4, 3), dtype=np.uint8)
    u8[1::2] = 255
    assert flicker(u8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        flicker(unit_video([0.5]))


def test_flicker_metric_gap():
    m = FlickerMetric()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert m.compute()["flicker_pred"] is None
    m.update(unit_video([0.2, 0.6, 0.2]), unit_video([0.2, 0.3, 0.4]))  # pairs: pred 0.4, 0.4; gt 0.1, 0.1
    m.update(unit_video([0.5] * 3), unit_video([0.5] * 3))  # pairs: 0, 0
    out = m.compute()
    json.dumps(out, allow_nan=False)
    assert out["flicker_pred"] == pytest.approx(0.2) and out["flicker_gt"] == pytest.approx(0.05)
    assert out["flicker_gap"] == pytest.approx(0.15) and out["num_clips"] == 2
    with pytest.raises(ValueError, match="frames"):
        m.update(unit_video([0.1, 0.2]), unit_video([0.1, 0.2, 0.3]))


def test_seam_error_jump_at_borders():
    values = [0.01 * t + 0.2 * (t // 4) for t in range(12)]  # windows of 4: ramp inside, jump at 4 and 8
    out = seam_error(unit_video(values), borders=[4, 8])
    assert out["border"] == pytest.approx(0.21, abs=1e-5) and out["inside"] == pytest.approx(0.01, abs=1e-5)
    assert out["ratio"] == pytest.approx(21.0, rel=1e-3) and out["num_borders"] == 2
    assert frame_differences(unit_video(values)).shape == (11,)


def test_seam_error_smooth_and_edge_cases():
    ramp = unit_video([0.05 * t for t in range(12)])
    assert seam_error(ramp, borders=[4, 8])["ratio"] == pytest.approx(1.0, rel=1e-4)
    steps = unit_video([0.0] * 4 + [0.5] * 4)
    assert seam_error(steps, [4])["ratio"] == "inf"
    assert seam_error(unit_video([0.5] * 4), [2])["ratio"] is None
    for borders in ([], [0], [8], [1, 2, 3, 4, 5, 6, 7]):
        with pytest.raises(ValueError):
            seam_error(steps, borders)
    # the stages' per-clip number: a float to average, NaN for a clip without a border or a still one
    assert seam_ratio(ramp, [4, 8]) == pytest.approx(1.0, rel=1e-4) and seam_ratio(steps, [4]) == float("inf")
    assert np.isnan(seam_ratio(ramp, [])) and np.isnan(seam_ratio(unit_video([0.5] * 4), [2]))


# ---- identity ----


@pytest.fixture(scope="module")
def grace():
    """grace_hopper.jpg as a 160 px face-centred crop (the project's cropping), uint8 RGB."""
    pytest.importorskip("dlib")
    matplotlib = pytest.importorskip("matplotlib")
    from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box

    img = np.asarray(Image.open(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg").convert("RGB"))
    box = FaceDetector().detect(img)
    return crop_resize(img, square_crop_box(box, img.shape[1], img.shape[0]), 160)


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("dlib")
    if identity.default_weights_dir() is None:
        pytest.skip("face_recognition_models not installed")
    return identity.FaceEmbedder()


def test_identity_similarity_on_grace_hopper(grace, embedder):
    pil = Image.fromarray(grace)
    shift_scale = (0.95, 0, 8, 0, 0.95, -5)  # 5 % larger, moved by (-8, +5) px
    moved = np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, shift_scale, Image.Resampling.BILINEAR))
    m = IdentitySimilarity(embedder=embedder)
    m.update(grace, np.stack([grace, moved]))
    sims = m.similarities[0]
    assert sims[0] == pytest.approx(1.0, abs=1e-6) and sims[1] > 0.9
    m.update(grace, (255 - grace)[None])  # colour-inverted: a very different face image
    out = m.compute()
    json.dumps(out, allow_nan=False)
    assert out["status"] == "ok" and out["num_frames"] == 3 and out["num_fallbacks"] == 0
    inverted = float(m.similarities[1][0])
    assert out["min"] == pytest.approx(inverted) and inverted < float(sims[1]) - 0.05
    assert out["mean"] == pytest.approx((1.0 + float(sims[1]) + out["min"]) / 3)
    assert float(m.distances[0][0]) == pytest.approx(0.0, abs=1e-6) and out["same_face_frac"] == pytest.approx(2 / 3)


def test_identity_fallback_box_and_float_frames(grace, embedder):
    small = np.asarray(Image.fromarray(grace).resize((40, 40), Image.Resampling.LANCZOS))  # too small to detect
    before = embedder.fallbacks
    m = IdentitySimilarity(embedder=embedder)
    m.update(torch.tensor(grace).permute(2, 0, 1).float() / 127.5 - 1, small[None])
    out = m.compute()
    assert out["num_fallbacks"] == 1 and embedder.fallbacks == before + 1 and out["mean"] > 0.9


def test_identity_unavailable(tmp_path, monkeypatch):
    m = IdentitySimilarity(weights_dir=tmp_path / "missing")
    m.update(np.zeros((32, 32, 3), np.uint8), np.zeros((2, 32, 32, 3), np.uint8))
    out = m.compute()
    assert out["status"] == "unavailable" and out["reason"] and "mean" not in out
    monkeypatch.setattr(identity, "default_weights_dir", lambda: tmp_path / "nowhere")
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert IdentitySimilarity().compute()["status"] == "unavailable"


def _talking(opening: np.ndarray, size: int = 32) -> np.ndarray:
    """Skin-coloured frames with a mouth that darkens as ``opening`` (0..1) grows (a growing cavity, averaged)."""
    frames = np.full((len(opening), size, size, 3), 200, np.uint8)
    for k, o in enumerate(opening):
        frames[k, 20:25, 12:20] = round(200 - 170 * o)
    return frames


def test_mouth_motion_follows_the_truth_and_not_other_speech():
    from temposyncdiff.metrics.temporal import MouthMotion

    phase = 2 * np.pi * np.arange(40) / 10  # syllables at 2.5 Hz; the other speech a quarter period off
    truth_open, other_open = 0.5 + 0.5 * np.sin(phase), 0.5 + 0.5 * np.cos(phase)
    truth = _talking(truth_open)
    m = MouthMotion(face_regions().mouth)
    m.update(truth, truth)
    out = m.compute()
    assert out["corr"] == pytest.approx(1.0) and out["amplitude"] == pytest.approx(1.0) and out["num_clips"] == 1
    half = MouthMotion(face_regions().mouth)
    half.update(_talking(truth_open * 0.5), truth)  # the same timing, half the opening
    assert half.compute()["corr"] > 0.9 and 0.3 < half.compute()["amplitude"] < 0.7
    other, still = MouthMotion(face_regions().mouth), MouthMotion(face_regions().mouth)
    other.update(_talking(other_open), truth)
    still.update(_talking(np.zeros(40)), truth)
    assert abs(other.compute()["corr"]) < 0.1
    assert still.compute() == {"corr": 0.0, "amplitude": 0.0, "num_clips": 1}
    empty = MouthMotion(face_regions().mouth)
    empty.update(truth[:1].repeat(5, 0), truth[:1].repeat(5, 0))  # a still truth says nothing: not counted
    assert empty.compute() == {"corr": None, "amplitude": None, "num_clips": 0}


class _Trap:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_lpips_backbone_that_would_run_code_is_not_loaded(tmp_path, no_network):
    """The backbone file is unpickled in full by torchvision: a file the weights-only loader refuses never gets there."""
    marker = tmp_path / "pwned"
    path = lpips_backbone_file(tmp_path, "squeeze")
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": _Trap(marker)}, path)
    m = LPIPS(torch_home=tmp_path, net_type="squeeze")
    assert not m.available and "could not load" in m.reason and not marker.exists()
