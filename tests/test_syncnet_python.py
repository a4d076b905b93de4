"""syncnet_python's SyncNet as an LSE expert: weights loading, its MFCCs, crop geometry and LSE arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from temposyncdiff.metrics.identity import CROP_FACE_BOX
from temposyncdiff.metrics.sync import LipSyncError, SyncExpert, embed_clip, offset_distances
from temposyncdiff.metrics.syncnet_python import SyncNetV2, load_syncnet_python, mfcc, syncnet_crop_box
from temposyncdiff.utils.weights import WeightsError
from tests.helpers.field import random_syncnet


def test_published_format_loads_and_scores_a_clip(tmp_path, one_thread):
    net = random_syncnet()
    path = tmp_path / "syncnet_v2.model"
    torch.save(net.state_dict(), path)  # what syncnet_python's loadParameters reads
    expert = load_syncnet_python(path)
    assert isinstance(expert, SyncExpert) and not expert.training
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(40, 3, 128, 128, generator=g) * 2 - 1
    wave = np.random.default_rng(2).uniform(-0.3, 0.3, 25600).astype(np.float32)  # 1.6 s
    ev, ea = embed_clip(expert, frames, expert.audio_features(wave))
    assert ev.shape == ea.shape == (35, 1024)  # syncnet_python: min(40 frames, 25600 // 640) - 5 windows
    with torch.no_grad():
        torch.testing.assert_close(ev[:3], net.embed_video(expert.video_windows(frames)[:3]), rtol=1e-4, atol=1e-5)
    metric = LipSyncError(protocol="syncnet_python")
    metric.update(ev, ea)
    out = metric.compute()
    assert out["num_clips"] == 1 and np.isfinite([out["lse_c"], out["lse_d"]]).all() and out["lse_d"] > 0


def test_legacy_torch_file_without_num_batches_tracked_loads(tmp_path):
    net = random_syncnet(3)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.model"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # pre-1.6 layout, torch < 0.4.1 keys
    loaded = load_syncnet_python(path)
    x = torch.randn(2, 1, 13, 20)
    with torch.no_grad():
        assert torch.equal(loaded.embed_audio(x), net.embed_audio(x))


def hand_distances(v: np.ndarray, a: np.ndarray, vshift: int) -> np.ndarray:
    """syncnet_python's calc_pdist + mean, written out: audio zero-padded, ||v - a + 1e-6||, mean over all t."""
    out = []
    for o in range(-vshift, vshift + 1):
        row = []
        for t in range(len(v)):
            at = a[t + o] if 0 <= t + o < len(a) else np.zeros_like(a[0])
            row.append(np.sqrt(np.sum((v[t] - at + 1e-6) ** 2)))
        out.append(np.mean(row))
    return np.array(out)


def test_syncnet_python_arithmetic_by_hand():
    v = np.array([[1, 0], [0, 2], [3, 1], [1, 1], [2, 0], [0, 0], [1, 3], [2, 2]], dtype=float)
    a = np.roll(v, 1, axis=0) + 0.1  # a_t = v_{t-1}: the audio lags by one frame
    d = offset_distances(torch.tensor(v), torch.tensor(a), 2, protocol="syncnet_python")
    expected = hand_distances(v, a, 2)
    np.testing.assert_allclose(d.numpy(), expected, rtol=1e-12)
    # offset +1 (entry 3): zero-padded t = 7 counts ||v_7 + eps||, the wrapped a_0 is never used
    assert expected[3] == pytest.approx((7 * np.sqrt(2 * (0.1 - 1e-6) ** 2) + np.sqrt(2 * (2 + 1e-6) ** 2)) / 8)
    assert not np.allclose(offset_distances(torch.tensor(v), torch.tensor(a), 2).numpy(), expected)

    ours, theirs = (
        LipSyncError(vshift=2, min_overlap=3),
        LipSyncError(vshift=2, min_overlap=3, protocol="syncnet_python"),
    )
    for metric in (ours, theirs):
        metric.update(torch.tensor(v), torch.tensor(a))
    out = theirs.compute()
    assert out["clip_lse_d"][0] == pytest.approx(expected.min(), rel=1e-6)
    assert out["clip_lse_c"][0] == pytest.approx(np.median(expected) - expected.min(), rel=1e-6)
    assert out["clip_offset"] == [-1] and ours.compute()["clip_offset"] == [1]  # its vshift - argmin: the sign flips
    with pytest.raises(ValueError, match="unknown LSE protocol"):
        LipSyncError(protocol="syncnet")


class Boom:
    """Unpickling it would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "kind",
    ["other_keys", "other_sizes", "tensor", "garbage", "legacy_garbage", "pickled_object", "legacy_pickled_object"],
)
def test_wrong_files_give_one_line_errors(tmp_path, kind):
    path, marker = tmp_path / "w.model", tmp_path / "unpickled"
    if kind == "other_keys":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif kind == "other_sizes":
        torch.save(SyncNetV2(embed_dim=512).state_dict(), path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 not a model" * 50)
    elif kind == "legacy_garbage":
        path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19" + b"\xff" * 64)
    else:
        torch.save({"net": Boom(str(marker))}, path, _use_new_zipfile_serialization=kind == "pickled_object")
    with pytest.raises(WeightsError) as err:
        load_syncnet_python(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    x = np.round(np.random.default_rng(0).normal(0, 3000, 16000 + 333))
    np.testing.assert_allclose(mfcc(x), psf.mfcc(x, 16000), rtol=1e-9, atol=1e-9)


def test_audio_features_pinned_values_and_rates():
    t = np.arange(2000) / 16000
    wave = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    feats = SyncNetV2().audio_features(wave)
    # python_speech_features 0.6 mfcc of the same 16-bit samples
    first = [21.4510438353, 4.011954981, -0.3513625568, 16.55771117, -47.2432214187, -46.0731765972, 6.1518766826]
    np.testing.assert_allclose(feats[:7, 0].numpy(), first, rtol=1e-5)
    assert feats.shape == (13, 11) and feats.dtype == torch.float32

    expert = SyncNetV2()
    rng = np.random.default_rng(1)
    assert expert.audio_features(rng.uniform(-1, 1, 16000)).shape == (13, 99)  # 100 Hz (1 + (16000 - 400) // 160)
    for n in range(640 * 6, 640 * 9, 37):  # evaluate's floor(samples / 640) - 5 windows, whatever the remainder
        m = expert.audio_features(rng.uniform(-0.1, 0.1, n))
        windows = expert.audio_windows(m)
        assert len(windows) == n // 640 - 5
        assert torch.equal(windows[-1, 0], m[:, 4 * (len(windows) - 1) : 4 * (len(windows) - 1) + 20])
    assert len(expert.audio_windows(expert.audio_features(rng.uniform(-1, 1, 640 * 5)))) == 0


def test_crop_box_geometry():
    # face box w 100, h 120 -> half-size 60, centre (150, 110): cols 150 -+ 84, rows 110 - 60 .. 110 + 108
    assert syncnet_crop_box((100, 50, 200, 170)) == (66, 50, 234, 218)
    # our prepared crops: the face at CROP_FACE_BOX -> fractions (0.15, 0.3, 0.85, 1.0) of the frame
    fx0, fy0, fx1, fy1 = CROP_FACE_BOX
    assert syncnet_crop_box((fx0 * 200, fy0 * 200, fx1 * 200, fy1 * 200)) == (30, 60, 170, 200)
    assert syncnet_crop_box((fx0 * 128, fy0 * 128, fx1 * 128, fy1 * 128)) == (19, 38, 108, 128)


def test_face_crops_region_channels_and_padding():
    expert = SyncNetV2()
    frames = torch.zeros(6, 3, 128, 128)
    frames[:, 0, 38:128, 19:108] = 1.0  # red exactly over the crop region, black in it otherwise
    frames[:, 1:, 38:128, 19:108] = -1.0
    faces = expert.crop_faces(frames)
    assert faces.shape == (6, 3, 224, 224)
    assert (faces[:, 2] == 255).all() and (faces[:, :2] == 0).all()  # BGR, 0..255, nothing from outside
    windows = expert.video_windows(frames)
    assert windows.shape == (1, 3, 5, 224, 224) and torch.equal(windows[0, :, 4], faces[4])
    assert len(expert.video_windows(frames[:5])) == 0

    corner = SyncNetV2(face_box=(0.0, 0.0, 0.5, 0.5)).crop_faces(torch.full((1, 3, 64, 64), -1.0))
    assert (corner[..., 0] == 110).all() and (corner[..., -1] == 0).all()  # grey 110 left of the frame
