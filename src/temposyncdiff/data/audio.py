"""The one audio-feature path: decode (PyAV), mono 16 kHz (torchaudio resample), log-mel, per-frame windows.

Frame k of a video at ``fps`` stands for time k/fps; its mel window is centred on mel frame
round(k * sample_rate / (fps * hop)), so an event at time t lands in frame round(t * fps).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torchaudio

from temposyncdiff.data.video import MediaError, read_audio_track


def resample(wave: np.ndarray, orig_sr: int, new_sr: int, block_s: float = 30.0) -> np.ndarray:
    """Band-limited resampling of a float32 ``[..., S]`` array.

    Long signals go in ``block_s`` blocks with enough context for the filter (the same samples as in one call;
    one call on 10 min at 48 kHz briefly needs ~600 MB).
    """
    if orig_sr == new_sr:
        return np.asarray(wave, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g  # every `down` input samples give `up` output samples
    block = max(1, round(block_s * orig_sr / down)) * down
    context = (math.ceil(6.1 * down / min(up, down)) // down + 2) * down  # > torchaudio's filter half-width + down
    out, n = [], x.shape[-1]
    for start in range(0, n, block):
        a = max(0, start - context)
        y = torchaudio.functional.resample(x[..., a : min(n, start + block + context)], orig_sr, new_sr)
        lo = (start - a) // down * up
        out.append(y[..., lo : lo + block // down * up] if start + block < n else y[..., lo:])
    return torch.cat(out, dim=-1).numpy()


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, num_samples: int | None = None) -> np.ndarray:
    """Decode any audio or video file's first audio track to float32 mono at ``sample_rate``.

    ``num_samples`` trims (AAC end padding) or zero-pads to an expected length, e.g. the video duration.
    """
    wave, rate = read_audio_track(path, mono=True)
    mono = resample(wave[0], rate, sample_rate)
    if not np.isfinite(mono).all():
        raise MediaError(f"{path}: audio contains NaN or inf samples")
    if num_samples is not None:
        mono = np.pad(mono[:num_samples], (0, max(0, num_samples - len(mono))))
    return mono


@dataclass
class AudioFeatures:
    """Log-mel settings shared by every stage (defaults: 16 kHz, 80 bins, 10 ms hop, 25 ms window)."""

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    f_min: float = 55.0
    f_max: float = 7600.0
    window_frames: int = 16  # mel frames seen by each video frame (16 = 160 ms)
    fps: float = 25.0

    @cached_property
    def _mel(self) -> torchaudio.transforms.MelSpectrogram:
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            power=2.0,
            center=True,
            norm="slaney",
            mel_scale="slaney",
        )

    @property
    def mel_per_frame(self) -> float:
        return self.sample_rate / (self.fps * self.hop_length)

    def log_mel(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[S]`` waveform -> ``[n_mels, M]`` natural-log mel energies (floored at 1e-5)."""
        wave = torch.as_tensor(wave, dtype=torch.float32)
        with torch.no_grad():
            return torch.log(self._mel(wave).clamp_min(1e-5))

    def num_frames(self, num_samples: int) -> int:
        """Video frames covered by ``num_samples`` audio samples (rounded to the nearest frame)."""
        return int(round(num_samples * self.fps / self.sample_rate))

    def frame_windows(self, mel: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``[n_mels, M]`` -> ``[num_frames, n_mels, window_frames]``, centred on each frame."""
        w = self.window_frames
        centres = torch.round(torch.arange(num_frames) * self.mel_per_frame).long()
        idx = centres[:, None] + torch.arange(w)[None, :] - w // 2
        padded = torch.nn.functional.pad(mel, (w, w), value=math.log(1e-5))  # silence outside the audio
        return padded[:, (idx + w).clamp(0, padded.shape[1] - 1)].permute(1, 0, 2).contiguous()
