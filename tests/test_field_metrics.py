"""The field's metrics from local weights files, on random-init networks saved in the original file formats:
CSIM (an ArcFace-shaped ONNX graph), FID (an Inception-v3 state dict), FVD (a TorchScript module called as I3D)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from temposyncdiff.errors import UserError
from temposyncdiff.metrics.arcface import (
    ARCFACE_TEMPLATE,
    ArcFaceSimilarity,
    align_face,
    cosine_similarity,
    normalises_itself,
    similarity_transform,
)
from temposyncdiff.metrics.distribution import (
    FrechetInceptionDistance,
    FrechetVideoDistance,
    frechet_distance,
    gaussian,
    video_clips,
)
from tests.helpers.field import save_arcface_onnx, save_fid_inception, save_i3d
from tests.helpers.run_if import RunIf


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """grace_hopper as a prepared 160 px face crop (``square_crop_box``'s framing)."""
    matplotlib = pytest.importorskip("matplotlib")
    from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box

    img = np.asarray(Image.open(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg").convert("RGB"))
    return crop_resize(img, square_crop_box(FaceDetector().detect(img), img.shape[1], img.shape[0]), 160)


@pytest.fixture(scope="module")
def arcface_onnx(tmp_path_factory) -> str:
    return str(save_arcface_onnx(tmp_path_factory.mktemp("arcface") / "w600k_r50.onnx"))


def test_alignment_maps_five_points_onto_the_template():
    """A known similarity of the template is undone exactly; the warp puts marked pixels on the template (< 1 px)."""
    angle, scale, shift = math.radians(12), 1.7, np.array([30.0, 45.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = ARCFACE_TEMPLATE @ rot.T + shift
    m = similarity_transform(points, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(points @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE, atol=1e-9)

    image = np.zeros((240, 240, 3), np.uint8)
    for x, y in np.round(points).astype(int):
        image[y - 2 : y + 3, x - 2 : x + 3] = 255  # 5 x 5 squares centred on the rounded points
    aligned = align_face(image, np.round(points)).astype(float)[..., 0]
    for tx, ty in ARCFACE_TEMPLATE:
        y0, x0 = round(ty) - 6, round(tx) - 6
        patch = aligned[y0 : y0 + 13, x0 : x0 + 13]
        ys, xs = np.mgrid[y0 : y0 + 13, x0 : x0 + 13]
        centre = np.array([(xs * patch).sum(), (ys * patch).sum()]) / patch.sum()
        assert np.hypot(*(centre - (tx, ty))) < 1.0


def test_mxnet_graphs_take_raw_pixels():
    """insightface's test: a Sub and a Mul among the first 8 nodes (graphs converted from MXNet)."""
    assert normalises_itself(["data", "_minussc", "_mulsc", "conv0"])
    assert not normalises_itself(["Conv_0", "PRelu_1", "Mul_2"])
    assert not normalises_itself([f"Conv_{i}" for i in range(8)] + ["Sub_8", "Mul_9"])


def test_cosine_similarity_by_hand():
    ref = np.array([3.0, 0.0, 0.0])
    emb = np.array([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity(ref, emb), [1.0, 0.0, 1 / math.sqrt(2), -1.0])


@RunIf(modules=("onnxruntime", "onnx"), face_models=True)
def test_arcface_similarity_on_a_real_face(arcface_onnx, face):
    """The graph runs on grace_hopper aligned by dlib's landmarks: the face against itself and its mirror image;
    a face-less frame is embedded in the crop's face box and counted."""
    metric = ArcFaceSimilarity(arcface_onnx)
    mirrored = np.ascontiguousarray(face[:, ::-1])
    noise = np.random.default_rng(0).integers(0, 256, face.shape, dtype=np.uint8)
    metric.update(face, np.stack([face, mirrored, noise]))
    out = metric.compute()
    assert out["status"] == "ok" and out["num_frames"] == 3 and out["num_fallbacks"] == 1
    assert out["mean"] == pytest.approx(np.mean(metric.similarities[0].numpy()))
    assert metric.similarities[0][0] == pytest.approx(1.0, abs=1e-6)
    assert out["min"] < 1.0 - 1e-4
    assert out["weights"]["sha256"] and out["weights"]["path"] == arcface_onnx

    embedder = metric.embedder
    assert embedder.input_name == "input.1" and embedder.batch is None and embedder.mean == 127.5
    points, found = embedder.five_points(face)
    assert found and points[0, 0] < points[1, 0] and points[0, 1] < points[2, 1] < points[3, 1]  # eyes, nose, mouth


def test_arcface_missing_and_corrupt_files(tmp_path):
    missing = ArcFaceSimilarity(tmp_path / "w600k_r50.onnx")
    missing.update(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64, 3), np.uint8))
    out = missing.compute()
    assert out["status"] == "unavailable" and str(tmp_path / "w600k_r50.onnx") in out["reason"]
    assert "buffalo_l" in out["reason"]
    pytest.importorskip("onnxruntime")
    pytest.importorskip("dlib")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(UserError, match="not a readable ONNX model") as err:
        ArcFaceSimilarity(bad)
    assert "\n" not in str(err.value)


def test_frechet_distance_closed_forms():
    """1-D: (m1 - m2)^2 + (s1 - s2)^2; diagonal: its sum over dimensions; a set against itself: 0."""
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        2.0**2 + (2.0 - 3.0) ** 2
    )
    m1, m2, v1, v2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0]), np.array([1.0, 4.0, 0.25]), np.ones(3)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected)
    feats = np.random.default_rng(0).normal(size=(50, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    mu, sigma = gaussian(feats)
    np.testing.assert_allclose(sigma, np.cov(feats.T))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_is_pytorch_fids_sqrtm_value():
    """The eigenvalue route gives what ``scipy.linalg.sqrtm`` of S1 S2 gives (pytorch-fid's recipe)."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 64)), rng.normal(size=(90, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.1
    (m1, s1), (m2, s2) = gaussian(a), gaussian(b)
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-8)


def test_video_clips_are_non_overlapping():
    frames = np.arange(40)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clips = video_clips(frames)
    assert clips.shape == (2, 16, 2, 2, 3) and clips[1, 0, 0, 0, 0] == 16 and clips[1, -1, 0, 0, 0] == 31
    assert len(video_clips(frames[:15])) == 0


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> str:
    """In torch's legacy layout; the zip layout takes the same path (``test_fid_missing_and_corrupt_files``)."""
    pytest.importorskip("torchvision.models")
    return str(save_fid_inception(tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"))


def frames(seed: int, n: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@RunIf(modules=("torch_fidelity",))
def test_fid_inception_from_a_state_dict_file(fid_weights, one_thread):
    """The file loads weights-only into torch-fidelity's network, which gives 2048-D features per frame."""
    fid = FrechetInceptionDistance(fid_weights, batch_size=2)
    feats = fid.features(frames(0, 3))
    assert feats.shape == (3, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    assert (feats[0] - feats[1]).abs().max() > 1e-4
    fid.update(frames(0, 1), frames(1, 1))
    out = fid.compute()
    assert out["status"] == "unavailable" and "at least 2 real and 2 generated frames: got 1 and 1" in out["reason"]


@RunIf(modules=("torch_fidelity",))
def test_fid_of_a_set_against_itself(fid_weights):
    """End to end: itself ~0, another set > 0."""
    fid = FrechetInceptionDistance(fid_weights)
    real = frames(0, 4)
    fid.update(real, real)
    same = fid.compute()
    assert same["status"] == "ok" and same["num_real"] == same["num_fake"] == 4 and "2048" in same["warning"]
    trace = np.trace(np.cov(fid.real[0].numpy().T))
    assert abs(same["fid"]) < 1e-4 * trace
    fid.reset()
    fid.update(real, frames(1, 4))
    assert fid.compute()["fid"] > 1e-3 * trace


def test_fid_missing_and_corrupt_files(tmp_path):
    out = FrechetInceptionDistance(tmp_path / "pt_inception.pth").compute()
    assert out["status"] == "unavailable" and "pt_inception.pth: FID Inception weights not found" in out["reason"]
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable FID Inception weights file"):
        FrechetInceptionDistance(bad)
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(UserError, match="weights do not fit the FID Inception-v3") as err:
        FrechetInceptionDistance(bad)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def i3d_script(tmp_path_factory) -> str:
    return str(save_i3d(tmp_path_factory.mktemp("fvd") / "i3d_torchscript.pt"))


def test_fvd_from_a_torchscript_file(i3d_script):
    """16-frame clips of two videos (+ one too short), features as the net gives them, the shared Fréchet code."""
    fvd = FrechetVideoDistance(i3d_script)
    real, fake = [frames(0, 20), frames(1, 33)], [frames(2, 20), frames(3, 33)]
    for r, f in zip(real, fake):
        fvd.update(r, f)
    fvd.update(frames(4, 10), frames(5, 10))
    out = fvd.compute()
    assert out["status"] == "ok" and out["num_real"] == out["num_fake"] == 3 and out["short_videos"] == 2
    assert "3 clips < 400 feature dimensions" in out["warning"] and out["weights"]["path"] == i3d_script

    net = torch.jit.load(i3d_script)

    def by_hand(videos: list[np.ndarray]) -> np.ndarray:
        clips = torch.from_numpy(np.concatenate([video_clips(v) for v in videos])).permute(0, 4, 1, 2, 3)
        with torch.no_grad():
            return net(clips, rescale=True, resize=True, return_features=True).double().numpy()

    expected = frechet_distance(*gaussian(by_hand(real)), *gaussian(by_hand(fake)))
    assert out["fvd"] == pytest.approx(expected, rel=1e-6) and out["fvd"] > 0
    fvd.reset()
    fvd.update(real[1], real[1])
    fvd.update(real[0], real[0])
    assert abs(fvd.compute()["fvd"]) < 1e-6 * expected


def test_fvd_missing_and_corrupt_files(tmp_path):
    out = FrechetVideoDistance(tmp_path / "i3d_torchscript.pt").compute()
    assert out["status"] == "unavailable" and "i3d_torchscript.pt: I3D TorchScript file not found" in out["reason"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable TorchScript file"):
        FrechetVideoDistance(bad)
    torch.save({"weight": torch.zeros(2)}, bad)  # a state dict, not TorchScript
    with pytest.raises(UserError, match="not a readable TorchScript file") as err:
        FrechetVideoDistance(bad)
    assert "\n" not in str(err.value)
