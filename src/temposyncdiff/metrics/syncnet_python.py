"""syncnet_python's SyncNet (Chung & Zisserman 2016; github.com/joonson/syncnet_python) as a ``SyncExpert``.

With its published ``syncnet_v2.model`` (``load_syncnet_python``) and ``LipSyncError(protocol="syncnet_python")``,
LSE-C / LSE-D come in the units papers report. The protocol replicated here, with its sources:

- faces (run_pipeline.py ``crop_video``, default ``crop_scale`` 0.4): around a face box with half-size
  s = max(w, h) / 2 and centre (cx, cy), the crop is columns [cx - 1.4 s, cx + 1.4 s) and rows
  [cy - s, cy + 1.8 s) (integer-truncated), of the frame padded with grey 110, resized to 224x224
  (cv2 bilinear), written as 8-bit video. Our prepared crops hold the face at ``CROP_FACE_BOX``.
- pictures (SyncNetInstance.py ``evaluate``): those whole 224x224 frames, OpenCV BGR, floats 0..255 with no
  normalisation, in windows of 5 frames ``[B,3,5,224,224]`` starting at every frame.
- audio (``evaluate``): 16 kHz 16-bit PCM, ``python_speech_features.mfcc(audio, 16000)`` with its defaults
  (13 coefficients, 25 ms frames every 10 ms, 512-point FFT, 26 mel filters, pre-emphasis 0.97, lifter 22,
  c0 replaced by the log frame energy), i.e. 4 MFCC frames per video frame; the window of video frame v is
  MFCC frames [4v, 4v + 20) as ``[B,1,13,20]``.
- window count (``evaluate``): min(video frames, floor(samples / 640)) - 5 (the last full window is unused).
- embeddings: the raw 1024-d outputs of ``netfclip`` / ``netfcaud`` (SyncNetModel.py ``forward_lip`` /
  ``forward_aud``), not normalised.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from temposyncdiff.metrics.identity import CROP_FACE_BOX
from temposyncdiff.utils.weights import WeightsError, read_weights_only

Box = tuple[float, float, float, float]

IMAGE_SIZE = 224  # run_pipeline.crop_video's output size
CROP_SCALE = 0.4  # run_pipeline's --crop_scale default
PAD_VALUE = 110.0  # run_pipeline.crop_video pads frames with this grey
WINDOW_FRAMES = 5  # video frames per window
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
MFCC_WINDOW = 20  # MFCC frames per window
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
# python_speech_features.mfcc defaults at 16 kHz
WIN, HOP, NFFT, NFILT, NCEP, LIFTER, PREEMPH = 400, 160, 512, 26, 13, 22, 0.97


def syncnet_crop_box(face_box: Box, crop_scale: float = CROP_SCALE) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (end exclusive, may leave the frame) that syncnet_python's
    run_pipeline ``crop_video`` cuts around a face box ``(x0, y0, x1, y1)``: square, side 2 s (1 + crop_scale)."""
    s = max(face_box[2] - face_box[0], face_box[3] - face_box[1]) / 2
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    box = (cx - s * (1 + crop_scale), cy - s, cx + s * (1 + crop_scale), cy + s * (1 + 2 * crop_scale))
    x0, y0, x1, y1 = (math.floor(round(c, 6)) for c in box)  # round: float noise must not cost a pixel row
    return x0, y0, x1, y1


def _mel_filterbank() -> np.ndarray:
    """``[NFILT, NFFT//2+1]`` triangular filters, as python_speech_features ``get_filterbanks`` (0 Hz..8 kHz)."""
    mel_top = 2595 * np.log10(1 + 8000 / 700)
    hz = 700 * (10 ** (np.linspace(0, mel_top, NFILT + 2) / 2595) - 1)
    bins = np.floor((NFFT + 1) * hz / 16000).astype(int)
    bank = np.zeros((NFILT, NFFT // 2 + 1))
    for j, (lo, mid, hi) in enumerate(zip(bins, bins[1:], bins[2:])):
        up, down = np.arange(lo, mid), np.arange(mid, hi)
        bank[j, up] = (up - lo) / max(mid - lo, 1)
        bank[j, down] = (hi - down) / max(hi - mid, 1)
    return bank


def mfcc(signal: np.ndarray) -> np.ndarray:
    """``[M, 13]`` float64 MFCCs of a 16 kHz signal, as ``python_speech_features.mfcc(signal, 16000)``:
    M = 1 + ceil((len - 400) / 160) frames (the last zero-padded), c0 = log frame energy."""
    x = np.asarray(signal, dtype=np.float64)
    x = np.append(x[0], x[1:] - PREEMPH * x[:-1])
    n = 1 if len(x) <= WIN else 1 + math.ceil((len(x) - WIN) / HOP)
    x = np.pad(x, (0, (n - 1) * HOP + WIN - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, WIN)[::HOP]
    power = np.square(np.abs(np.fft.rfft(frames, NFFT))) / NFFT
    eps = np.finfo(float).eps
    bands = power @ _mel_filterbank().T
    k = np.arange(NFILT)
    dct = np.sqrt(2 / NFILT) * np.cos(np.pi * np.arange(NCEP)[:, None] * (2 * k + 1) / (2 * NFILT))
    dct[0] /= np.sqrt(2)  # DCT-II, norm="ortho"
    cep = np.log(np.where(bands == 0, eps, bands)) @ dct.T
    cep *= 1 + LIFTER / 2 * np.sin(np.pi * np.arange(NCEP) / LIFTER)
    energy = power.sum(1)
    cep[:, 0] = np.log(np.where(energy == 0, eps, energy))
    return cep


def _stage(conv: nn.Conv2d | nn.Conv3d, pool: nn.Module | None = None) -> list[nn.Module]:
    """conv, BatchNorm, ReLU[, pool]: the layer pattern (and state-dict indices) of SyncNetModel.py."""
    norm = nn.BatchNorm2d if isinstance(conv, nn.Conv2d) else nn.BatchNorm3d
    return [conv, norm(conv.out_channels), nn.ReLU(), *([pool] if pool is not None else [])]


def _head(embed_dim: int) -> nn.Sequential:
    """``netfcaud`` / ``netfclip``: 512 -> 512 (BatchNorm, ReLU) -> embed_dim."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))


class SyncNetV2(nn.Module):
    """SyncNetModel.py's ``S`` (same module names, so ``syncnet_v2.model`` loads key for key), plus our
    ``SyncExpert`` protocol and ``audio_features``. ``face_box``: where the face sits in the frames it is
    given, as fractions of the frame (our prepared crops by default)."""

    def __init__(self, embed_dim: int = 1024, face_box: Box = CROP_FACE_BOX) -> None:
        super().__init__()
        self.face_box = face_box
        c2, c3 = nn.Conv2d, nn.Conv3d
        self.netcnnaud = nn.Sequential(  # [B,1,13,20] -> [B,512,1,1]
            *_stage(c2(1, 64, 3, padding=1), nn.MaxPool2d(1, 1)),
            *_stage(c2(64, 192, 3, padding=1), nn.MaxPool2d(3, (1, 2))),
            *_stage(c2(192, 384, 3, padding=1)),
            *_stage(c2(384, 256, 3, padding=1)),
            *_stage(c2(256, 256, 3, padding=1), nn.MaxPool2d(3, 2)),
            *_stage(c2(256, 512, (5, 4))),
        )
        self.netfcaud = _head(embed_dim)
        self.netfclip = _head(embed_dim)
        self.netcnnlip = nn.Sequential(  # [B,3,5,224,224] -> [B,512,1,1,1]
            *_stage(c3(3, 96, (5, 7, 7), (1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_stage(c3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))),
            *_stage(c3(256, 256, (1, 3, 3), padding=(0, 1, 1))),
            *_stage(c3(256, 256, (1, 3, 3), padding=(0, 1, 1))),
            *_stage(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_stage(c3(256, 512, (1, 6, 6))),
        )

    def embed_video(self, video: Tensor) -> Tensor:
        """``[B,3,5,224,224]`` BGR 0..255 windows -> ``[B,embed_dim]`` raw embeddings (``forward_lip``)."""
        if tuple(video.shape[1:]) != (3, WINDOW_FRAMES, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"SyncNetV2 video input {tuple(video.shape)}, expected [B,3,5,224,224]")
        return self.netfclip(self.netcnnlip(video).flatten(1))

    def embed_audio(self, mfcc: Tensor) -> Tensor:
        """``[B,1,13,20]`` MFCC windows -> ``[B,embed_dim]`` raw embeddings (``forward_aud``)."""
        if tuple(mfcc.shape[1:]) != (1, NCEP, MFCC_WINDOW):
            raise ValueError(f"SyncNetV2 audio input {tuple(mfcc.shape)}, expected [B,1,13,20]")
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def crop_faces(self, frames: Tensor) -> Tensor:
        """Frames ``[T,3,H,W]`` in [-1,1] RGB -> syncnet_python's face crops ``[T,3,224,224]``: BGR, 8-bit levels."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [T,3,H,W], got {tuple(frames.shape)}")
        h, w = frames.shape[-2:]
        fx0, fy0, fx1, fy1 = self.face_box
        x0, y0, x1, y1 = syncnet_crop_box((fx0 * w, fy0 * h, fx1 * w, fy1 * h))
        left, top = max(0, -x0), max(0, -y0)
        x = ((frames.float() + 1) * 127.5).round().clamp(0, 255).flip(1)  # 8-bit frames, RGB -> BGR
        x = F.pad(x, (left, max(0, x1 - w), top, max(0, y1 - h)), value=PAD_VALUE)
        x = x[..., y0 + top : y1 + top, x0 + left : x1 + left]
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255)  # cv2.resize of 8-bit frames

    def video_windows(self, frames: Tensor) -> Tensor:
        """Frames ``[T,3,H,W]`` in [-1,1] RGB -> ``[T-5,3,5,224,224]`` windows (a view; syncnet_python's count)."""
        faces = self.crop_faces(frames)
        n = len(faces) - WINDOW_FRAMES
        if n <= 0:
            return faces.new_zeros(0, 3, WINDOW_FRAMES, IMAGE_SIZE, IMAGE_SIZE)
        return faces[: n + WINDOW_FRAMES - 1].unfold(0, WINDOW_FRAMES, 1).permute(0, 1, 4, 2, 3)

    def audio_windows(self, mfcc: Tensor) -> Tensor:
        """``audio_features`` ``[13,M]`` -> ``[ceil(M/4)-5,1,13,20]``: window v = MFCC frames [4v, 4v+20)."""
        if mfcc.ndim != 2 or mfcc.shape[0] != NCEP:
            raise ValueError(f"SyncNetV2 audio_windows takes MFCCs [13,M] (audio_features), got {tuple(mfcc.shape)}")
        n = max(0, -(-mfcc.shape[1] // MFCC_PER_FRAME) - WINDOW_FRAMES)
        if n == 0:
            return mfcc.new_zeros(0, 1, NCEP, MFCC_WINDOW)
        return (
            mfcc[:, : MFCC_PER_FRAME * (n - 1) + MFCC_WINDOW]
            .unfold(1, MFCC_WINDOW, MFCC_PER_FRAME)
            .transpose(0, 1)[:, None]
        )

    def audio_features(self, wave: np.ndarray) -> Tensor:
        """16 kHz mono float audio in [-1,1] -> MFCCs ``[13, M]`` (float32, CPU) for ``audio_windows``.

        As 16-bit PCM (what syncnet_python reads), cut to the 4 * floor(samples / 640) frames of the whole video
        frames it spans, so ``audio_windows`` gives evaluate's floor(samples / 640) - 5 windows.
        """
        wave = np.asarray(wave)
        if wave.ndim != 1 or wave.size == 0 or not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"audio_features takes 1-D float audio, got {wave.dtype} {wave.shape}")
        pcm = np.clip(np.round(wave.astype(np.float64) * 32768), -32768, 32767)
        feats = mfcc(pcm)[: MFCC_PER_FRAME * (len(pcm) // SAMPLES_PER_FRAME)]
        return torch.from_numpy(np.ascontiguousarray(feats.T, dtype=np.float32))


def load_syncnet_python(path: str | os.PathLike) -> SyncNetV2:
    """syncnet_python's ``syncnet_v2.model`` (a ``torch.save``'d state dict, as its ``loadParameters`` reads it)
    -> ``SyncNetV2`` in eval mode, on the CPU. ``WeightsError`` (one line) for any other file."""
    path = Path(path)
    state = read_weights_only(path, what="syncnet_python weights file")
    net = SyncNetV2()
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a syncnet_python weights file (expected a state dict of tensors)")
    expected = net.state_dict()
    # syncnet_python copies whatever keys the file has; files older than torch 0.4.1 lack num_batches_tracked
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not syncnet_python's SyncNet weights ({len(missing)} keys missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise WeightsError(f"{path}: syncnet_python weights of other sizes ({len(wrong)} tensors, e.g. {wrong[0]})")
    net.load_state_dict(state, strict=False)  # keys checked above
    return net.eval()
