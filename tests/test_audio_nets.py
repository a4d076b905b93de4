"""AudioEncoder and SyncNet: shapes, window alignment, and contrastive training on a toy sync task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.visemes import NUM_VISEMES
from temposyncdiff.metrics.sync import LipSyncError, embed_clip
from temposyncdiff.nets.audio_encoder import AudioEncoder, window_centres
from temposyncdiff.nets.syncnet import SILENCE, SyncNet, lower_face, mel_context, mel_from_windows
from temposyncdiff.utils.weights import load_net, save_weights


def test_audio_encoder_shapes_and_context():
    enc = AudioEncoder(dim=32, context=2, width=32).eval()
    mel = torch.randn(2, 12, 80, 16)
    emb, logits = enc(mel)
    assert emb.shape == (2, 12, 32) and logits.shape == (2, 12, NUM_VISEMES)
    mel2 = mel.clone()
    mel2[:, 0] += 1.0
    changed = (enc(mel2)[0] - emb).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [True] * 4 + [False] * 8  # receptive field +-(2**context - 1) frames
    assert enc.visemes(mel).shape == (2, 12)


def test_utterance_mel_norm_removes_a_recordings_gain_and_colouring():
    """mel_norm=utterance: a gain and spectral tilt constant over the utterance leave the embeddings unchanged."""
    torch.manual_seed(0)
    enc = AudioEncoder(dim=16, context=1, width=16, mel_norm="utterance").eval()
    plain = AudioEncoder(dim=16, context=1, width=16).eval()
    plain.load_state_dict(enc.state_dict())
    mel, mean = torch.randn(2, 10, 80, 16), torch.randn(2, 80)
    colour = 2.0 + torch.linspace(-3, 3, 80)  # log-mel offset per bin: a louder, brighter microphone
    shifted = mel + colour[None, None, :, None]
    assert torch.allclose(enc(mel, mean)[0], enc(shifted, mean + colour)[0], atol=1e-5)
    assert not torch.allclose(plain(mel)[0], plain(shifted)[0], atol=1e-2)
    assert enc.config["mel_norm"] == "utterance" and plain.config["mel_norm"] == "none"
    with pytest.raises(ValueError, match="mel_norm"):
        AudioEncoder(mel_norm="speaker")


def test_without_a_mean_the_windows_are_the_utterance():
    """No mel_mean: the mean of the windows' own frames, which is the utterance's log-mel mean when they span it."""
    audio = AudioFeatures()
    wave = torch.randn(16000 * 2 + 640 * 3) * torch.linspace(0.01, 1, 16000 * 2 + 640 * 3)
    log_mel, n = audio.log_mel(wave), audio.num_frames(len(wave))
    windows = audio.frame_windows(log_mel, n)[None]
    mean = log_mel[:, : 4 * n].mean(1)  # every mel frame but center=True's one past the last video frame
    assert torch.allclose(window_centres(windows)[0], mean, atol=1e-5)
    enc = AudioEncoder(dim=16, context=1, width=16, mel_norm="utterance").eval()
    assert torch.allclose(enc(windows)[0], enc(windows, mean[None])[0], atol=1e-5)


def test_audio_encoder_export_round_trip(tmp_path):
    enc = AudioEncoder(dim=16, context=1, width=16, window=12).eval()
    loaded, meta = load_net(save_weights(tmp_path / "audio_encoder.pt", "audio", enc, {"k": 1}), "audio")
    mel = torch.randn(1, 4, 80, 12)
    assert loaded.config == enc.config and meta == {"k": 1} and torch.equal(loaded.visemes(mel), enc.visemes(mel))


def test_syncnet_shapes_and_normalisation():
    net = SyncNet(image_size=64, dim=24, width=8).eval()
    assert lower_face(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 32, 64)
    assert lower_face(torch.zeros(2, 3, 64, 64), side=0.25).shape == (2, 3, 32, 32)
    mouth = SyncNet(image_size=64, width=4, crop_side=0.25).video_windows(torch.zeros(7, 3, 64, 64))
    assert mouth.shape == (3, 5, 3, 32, 32)
    video, mel = torch.randn(4, 5, 3, 32, 64), torch.randn(4, 80, 20)
    for emb in (net.embed_video(video), net.embed_audio(mel)):
        assert emb.shape == (4, 24) and torch.allclose(emb.norm(dim=-1), torch.ones(4))
    assert net(video, mel).shape == (4,)
    with pytest.raises(ValueError, match="expected"):
        net.embed_video(torch.randn(4, 5, 3, 64, 64))
    with pytest.raises(ValueError, match="64 px"):
        net.video_windows(torch.zeros(10, 3, 32, 32))


@pytest.mark.parametrize("offset", [-3, 0, 2])
def test_syncnet_window_alignment(offset):
    net = SyncNet(image_size=16, dim=8, width=4)
    t_frames = 12
    frames = torch.arange(t_frames).float().view(t_frames, 1, 1, 1).expand(t_frames, 3, 16, 16)
    mel = torch.arange(4 * t_frames).float().expand(80, -1)  # column value = mel frame index
    video, audio = net.windows(frames.unsqueeze(0), mel.unsqueeze(0), offset=offset)  # leading batch dim
    t0 = max(0, -offset)
    assert video.shape == (1, 8 - abs(offset), 5, 3, 8, 16) and audio.shape == (1, 8 - abs(offset), 80, 20)
    assert video[0, 0, :, 0, 0, 0].tolist() == list(range(t0, t0 + 5))
    start = 4 * (t0 + 2 + offset) - 10  # centred on the middle frame of the video window, shifted by offset
    expected = [m if 0 <= m < 4 * t_frames else SILENCE for m in range(start, start + 20)]
    assert audio[0, 0, 0].tolist() == pytest.approx(expected)


def test_mel_from_windows_inverts_frame_windows():
    feats = AudioFeatures()
    mel = torch.randn(80, 4 * 9 + 1)
    windows = feats.frame_windows(mel, 9)
    assert torch.equal(mel_from_windows(windows.unsqueeze(0))[0], mel[:, : 4 * 9])
    context = mel_context(windows.unsqueeze(0))[0]  # starts window_frames // 2 = 8 columns before frame 0
    assert context.shape == (80, 16 + 4 * 8) and torch.equal(context[:, 8:45], mel)
    assert (context[:, :8] == SILENCE).all() and (context[:, 45:] == SILENCE).all()  # outside the audio


def toy_clips(n: int, t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A square in the lower face whose size follows a random signal; the "mel" is a band of the same height."""
    s = torch.rand(n, t, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    half = 1 + 6 * s[..., None, None]
    square = ((yy - 24).abs() <= half) & ((xx - 16).abs() <= half)
    frames = (square.float() * 2 - 1)[:, :, None].expand(n, t, 3, 32, 32)
    s_mel = s[:, ((torch.arange(4 * t) + 2) // 4).clamp(max=t - 1)]  # mel frame m belongs to video frame round(m/4)
    band = torch.arange(80.0)[None, :, None] < 80 * s_mel[:, None, :]
    mel = band.float() * 2 - 1 + 0.1 * torch.randn(n, 80, 4 * t, generator=g)
    return frames, mel


def test_syncnet_learns_toy_sync(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = SyncNet(image_size=32, dim=16, width=8)
    frames, mel = toy_clips(48, 24, g)
    video, audio = net.windows(frames, mel)  # [48, 20, ...]
    n_clips, n_win = video.shape[:2]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(200):
        c, t = torch.randint(n_clips, (32,), generator=g), torch.randint(n_win, (32,), generator=g)
        t_neg = (t + torch.randint(1, n_win, (32,), generator=g)) % n_win  # shifted audio of the same clip
        c_neg = torch.where(torch.rand(32, generator=g) < 0.3, (c + 1) % n_clips, c)  # or another clip's audio
        label = (torch.arange(32) < 16).float()
        a = torch.where(label.bool()[:, None, None], audio[c, t], audio[c_neg, t_neg])
        loss = F.binary_cross_entropy_with_logits(net(video[c, t], a), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    test_frames, test_mel = toy_clips(6, 30, g)
    metric = LipSyncError(vshift=5)
    for f, m in zip(test_frames, test_mel):
        metric.update(*embed_clip(net, f, m))
    out = metric.compute()
    assert float(out["offset_zero_frac"]) == 1.0 and float(out["lse_c"]) > 0.2, out  # untrained: ~0.01
    assert math.isfinite(float(out["lse_d"]))
