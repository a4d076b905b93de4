"""The one audio-feature path: decoding any container/rate, exact mel/frame alignment, silence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from temposyncdiff.data.audio import AudioFeatures, load_audio
from temposyncdiff.data.video import MediaError, write_video


@pytest.mark.parametrize("t", [0.0, 0.2, 0.52, 1.0, 1.37, 2.96])
def test_click_lands_in_frame_round_t_times_fps(t):
    feats = AudioFeatures()
    wave = np.zeros(3 * 16000, np.float32)
    wave[int(t * 16000)] = 1.0
    mel = feats.log_mel(wave)
    windows = feats.frame_windows(mel, feats.num_frames(len(wave)))  # [N, 80, 16]
    centre = windows[:, :, feats.window_frames // 2].mean(dim=1)  # energy at each frame's centre mel frame
    assert int(torch.argmax(centre)) == round(t * 25)


def test_window_shapes_and_silence_padding():
    feats = AudioFeatures(window_frames=16)
    mel = feats.log_mel(np.zeros(16000, np.float32))
    assert mel.shape[0] == 80 and torch.isfinite(mel).all()
    windows = feats.frame_windows(mel, 30)  # more frames than the audio covers: padded with silence
    assert windows.shape == (30, 80, 16)
    assert torch.allclose(windows[-1], torch.full_like(windows[-1], np.log(1e-5)))


def test_load_audio_resamples_any_rate_and_trims(tmp_path):
    for rate in (8000, 22050, 48000):
        t = np.arange(rate) / rate
        tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frames = [np.zeros((16, 16, 3), np.uint8)] * 25
        path = write_video(tmp_path / f"a{rate}.mp4", frames, 25.0, tone, rate)
        audio = load_audio(path, 16000, num_samples=16000)
        assert audio.shape == (16000,) and audio.dtype == np.float32
        spectrum = np.abs(np.fft.rfft(audio[2000:14000]))
        assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 5


def test_missing_and_silent_audio(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    path = write_video(tmp_path / "v.mp4", [np.zeros((16, 16, 3), np.uint8)] * 5, 25.0)
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(path)
