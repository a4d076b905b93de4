"""LSE-D / LSE-C metric math, edge cases, the audio-swap control and the expert export format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from temposyncdiff.errors import UserError
from temposyncdiff.metrics.sync import LipSyncError, SyncExpert, audio_swap_control, embed_clip
from temposyncdiff.nets.syncnet import SyncNet, export_expert, load_expert
from temposyncdiff.utils.weights import WeightsError, load_payload


def shifted_pair(n: int, k: int, noise: float = 0.1, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Video embeddings v and audio a with a_t = v_{t-k} + noise (the audio lags the video by k frames)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n + 40, dim, generator=g)
    v = base[20 : 20 + n]
    a = base[20 - k : 20 - k + n] + noise * torch.randn(n, dim, generator=g)
    return v, a


def numpy_lse(v: np.ndarray, a: np.ndarray, vshift: int) -> tuple[float, float, int]:
    """Direct loop implementation: (LSE-D, LSE-C, best offset)."""
    n = min(len(v), len(a))
    dists = []
    for o in range(-vshift, vshift + 1):
        ts = [t for t in range(n) if 0 <= t + o < n]
        dists.append(np.mean([np.linalg.norm(v[t] - a[t + o]) for t in ts]))
    dists = np.array(dists)
    return dists.min(), np.median(dists) - dists.min(), int(dists.argmin()) - vshift


@pytest.mark.parametrize("k", [-4, 0, 3])
def test_best_offset_and_values_match_numpy(k):
    v, a = shifted_pair(60, k)
    metric = LipSyncError(vshift=15)
    metric.update(v, a)
    out = metric.compute()
    d, c, off = numpy_lse(v.numpy(), a.numpy(), 15)
    assert off == k and out["clip_offset"][0] == k
    assert float(out["lse_d"]) == pytest.approx(d, rel=1e-5)
    assert float(out["lse_c"]) == pytest.approx(c, rel=1e-5)
    assert float(out["offset_zero_frac"]) == float(k == 0)


def test_random_embeddings_have_low_confidence():
    g = torch.Generator().manual_seed(1)
    rand, synced = LipSyncError(), LipSyncError()
    for seed in range(4):
        rand.update(torch.randn(80, 16, generator=g), torch.randn(80, 16, generator=g))
        synced.update(*shifted_pair(80, 0, seed=seed))
    r, s = rand.compute(), synced.compute()
    assert float(r["lse_c"]) < 0.1 * float(s["lse_c"])
    assert float(s["lse_d"]) < float(r["lse_d"])
    assert len(r["clip_lse_d"]) == 4 and int(r["num_clips"]) == 4


def test_short_clips_are_skipped_and_counted():
    metric = LipSyncError(vshift=15, min_overlap=5)
    with pytest.warns(UserWarning, match="skipped a clip with 19 windows"):
        metric.update(*shifted_pair(19, 0))
    with pytest.warns(UserWarning, match="2 skipped so far"):
        metric.update(torch.zeros(0, 16), torch.zeros(0, 16))
    empty = metric.compute()
    assert int(empty["num_skipped"]) == 2 and int(empty["num_clips"]) == 0 and torch.isnan(empty["lse_d"])
    metric.update(*shifted_pair(20, 0))
    assert int(metric.compute()["num_clips"]) == 1


def test_mismatched_lengths_trim_to_shorter():
    v, a = shifted_pair(50, 2)
    longer_video, longer_audio = LipSyncError(), LipSyncError()
    longer_video.update(torch.cat([v, torch.randn(7, 16)]), a)
    longer_audio.update(v, torch.cat([a, torch.randn(9, 16)]))
    ref = LipSyncError()
    ref.update(v, a)
    for m in (longer_video, longer_audio):
        assert torch.allclose(m.compute()["lse_d"], ref.compute()["lse_d"])
        assert m.compute()["clip_offset"][0] == 2


def test_silence_and_zero_embeddings_are_finite():
    net = SyncNet(image_size=32, dim=32, width=8).eval()
    assert isinstance(net, SyncExpert)
    frames = torch.zeros(30, 3, 32, 32)
    mel = torch.full((80, 120), float(np.log(1e-5)))  # silence
    metric = LipSyncError(vshift=5)
    metric.update(*embed_clip(net, frames, mel))
    metric.update(*embed_clip(net, frames, torch.zeros(80, 120)))
    metric.update(torch.zeros(30, 8), torch.zeros(30, 8))
    out = metric.compute()
    assert int(out["num_clips"]) == 3
    assert np.isfinite([out["lse_d"], out["lse_c"], *out["clip_lse_d"], *out["clip_lse_c"]]).all()


def test_embed_clip_window_counts():
    net = SyncNet(image_size=32, dim=16, width=8).eval()
    v, a = embed_clip(net, torch.zeros(25, 3, 32, 32), torch.zeros(80, 80))  # 25 video frames, 20 audio frames
    assert v.shape == (21, 16) and a.shape == (16, 16)
    v, a = embed_clip(net, torch.zeros(3, 3, 32, 32), torch.zeros(80, 80))
    assert len(v) == 0


def test_audio_swap_control_gap():
    clips = [shifted_pair(40, 0, seed=s) for s in range(5)]
    out = audio_swap_control(lambda c, src: (c[0], src[1]), clips, vshift=5)
    assert out["gap_lse_c"] > 0.5 and out["gap_lse_d"] > 0.5
    assert float(out["own"]["offset_zero_frac"]) == 1.0
    ignore_audio = audio_swap_control(lambda c, src: (c[0], clips[0][1]), clips[1:], vshift=5)
    assert abs(ignore_audio["gap_lse_c"]) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        audio_swap_control(lambda c, src: c, clips[:1])


def test_export_load_round_trip_and_bad_files(tmp_path):
    net = SyncNet(image_size=32, dim=16, width=8, crop_top=0.4).eval()
    path = export_expert(net, tmp_path / "ck" / "syncnet.pt", meta={"val_acc": 0.9})
    assert [p.name for p in path.parent.iterdir()] == ["syncnet.pt"]  # no temp file left
    assert load_payload(path, "syncnet")["meta"] == {"val_acc": 0.9}
    loaded = load_expert(path)
    video, mel = torch.randn(3, 5, 3, 19, 32), torch.randn(3, 80, 20)
    assert loaded.config == net.config and not loaded.training
    assert torch.allclose(loaded(video, mel), net(video, mel))

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_expert(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    good = torch.load(path, weights_only=True)
    for payload, match in [
        ({**good, "format": "temposyncdiff.vae"}, "'temposyncdiff.vae' export"),
        ({**good, "version": 2}, "version 2"),
        ({**good, "config": {**good["config"], "dim": 8}}, "do not fit"),
        (torch.zeros(3), "not a TempoSyncDiff export"),
    ]:
        torch.save(payload, bad)
        with pytest.raises(WeightsError, match=match):
            load_expert(bad)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt: not a readable"):
        load_expert(bad)
    torch.save({"obj": WeightsError("pickled class")}, bad)  # arbitrary objects are refused
    with pytest.raises(WeightsError, match="weights-only"):
        load_expert(bad)
