"""Where a clip's arrays come from and how they become a dataset item: mel windows of a frame span, the sources a
``ClipDataset`` reads (a cache, manifest rows; LitData shards implement the same ``ClipSource``), ``clip_item``."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.cache import CacheError, CacheReader, Utterance, decode_utterance
from temposyncdiff.data.video import MediaError
from temposyncdiff.data.visemes import SILENCE


class ClipSource(Protocol):
    """What ``ClipDataset`` reads: utterance ids, talks and lengths, a frame span's arrays, one frame (``mirror``:
    left-right, with the cache's mirrored latents)."""

    ids: list[str]
    talk_ids: list[str]
    num_frames: list[int]

    def clip(
        self, u: int, a: int, b: int, mirror: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]: ...

    def frame(self, u: int, j: int, mirror: bool = False) -> tuple[np.ndarray, np.ndarray | None]: ...


def mel_span(audio: AudioFeatures, start: int, length: int) -> tuple[int, int, int]:
    """``(s0, m0, m1)``: the mel rows ``m0:m1`` that the windows of frames ``start..start+length-1`` read.

    The rows begin at frame ``s0``, whose mel index is an even integer (so centre rounding is unchanged), early
    enough that every window sees real mel frames, not the padding.
    """
    mpf = audio.mel_per_frame
    s0 = max(0, start - int(np.ceil(audio.window_frames / mpf)) - 1)
    while s0 > 0 and not (abs(s0 * mpf - round(s0 * mpf)) < 1e-6 and round(s0 * mpf) % 2 == 0):
        s0 -= 1
    return s0, round(s0 * mpf), round((start + length) * mpf) + audio.window_frames


def span_windows(audio: AudioFeatures, rows: np.ndarray, offset: int, length: int) -> torch.Tensor:
    """``[length, n_mels, W]`` windows of the ``length`` frames from frame ``offset`` of ``mel_span``'s rows."""
    sub = torch.from_numpy(np.array(rows, dtype=np.float32)).T
    return audio.frame_windows(sub, offset + length)[offset:]


def clip_mel_windows(audio: AudioFeatures, mel: np.ndarray, start: int, length: int) -> torch.Tensor:
    """``[length, n_mels, W]`` windows of frames ``start..start+length-1`` from an utterance's ``[M, n_mels]`` log-mel.

    Equal to ``audio.frame_windows(mel.T, start + length)[start:]`` but reads only ``mel_span``'s rows.
    """
    s0, m0, m1 = mel_span(audio, start, length)
    return span_windows(audio, mel[m0:m1], start - s0, length)


class CacheSource:
    """Clips sliced from a cache's memmaps."""

    def __init__(self, reader: CacheReader):
        self.reader, self.ids, self.talk_ids = reader, reader.ids, reader.talk_ids
        self.known_lips: dict[str, np.ndarray] = {}  # talks' lip statistics from elsewhere (the training split's)
        self.num_frames = [int(n) for n in reader.num_frames]
        self.root, self.audio, self.image_size = reader.root, reader.audio, reader.image_size

    def _latents(self, mirror: bool) -> np.ndarray | None:
        latents = self.reader.latents
        if mirror and latents is not None:
            latents = self.reader.latents_mirror
            if latents is None:
                raise CacheError(f"{self.root}: no mirrored latents (tsd-data cache vae=... data.mirror=<p> adds them)")
        return latents

    def clip(
        self, u: int, a: int, b: int, mirror: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        r = self.reader
        off, end = int(r.offsets[u]), int(r.offsets[u] + r.num_frames[u])
        lo, hi = off + a, min(off + b, end)
        mel = r.mel[int(r.mel_offsets[u]) : int(r.mel_offsets[u] + r.mel_lens[u])]
        latents = self._latents(mirror)
        frames = mirrored(r.frames[lo:hi]) if mirror else r.frames[lo:hi]
        return frames, mel, r.visemes[lo:hi], None if latents is None else latents[lo:hi]

    def lips(self, u: int, a: int, b: int) -> np.ndarray | None:
        """Landmark lip shapes ``[<= b - a, 3]`` of frames [a, b) of utterance ``u`` when the cache has them."""
        r = self.reader
        if r.lips is None:
            return None
        off, end = int(r.offsets[u]), int(r.offsets[u] + r.num_frames[u])
        return r.lips[off + a : min(off + b, end)]

    def lip_person(self, u: int) -> np.ndarray | None:
        """Utterance ``u``'s talk's lip shapes, ``[2, 3]``: their mean and std (``talk_lip_stats``), from
        ``known_lips`` when it holds the talk (a held-out split reads its people's range in their training footage),
        else from this cache."""
        stats = self.reader.talk_lip_stats()
        if stats is None:
            return None
        talk = self.talk_ids[u]
        return self.known_lips.get(talk, stats[talk])

    def frame(self, u: int, j: int, mirror: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        k = int(self.reader.offsets[u]) + j
        latents, frame = self._latents(mirror), self.reader.frames[k]
        return mirrored(frame) if mirror else frame, None if latents is None else latents[k]


class RowSource:
    """Clips decoded from the manifest rows' mp4s on every access (keeps the last two utterances)."""

    def __init__(self, rows: list[dict], image_size: int, audio: AudioFeatures, fps: float):
        self.rows, self.image_size, self.audio, self.fps = rows, image_size, audio, fps
        self.ids, self.talk_ids = [r["id"] for r in rows], [r["talk_id"] for r in rows]
        self.num_frames = [max(1, round(r["num_frames"] * fps / (r.get("fps") or fps))) for r in rows]
        self._memo: dict[int, Utterance] = {}

    def _load(self, u: int) -> Utterance:
        if u not in self._memo:
            if len(self._memo) >= 2:
                self._memo.pop(next(iter(self._memo)))
            self._memo[u] = decode_utterance(self.rows[u], self.image_size, self.audio, self.fps)
        return self._memo[u]

    def clip(self, u: int, a: int, b: int, mirror: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
        utt = self._load(u)
        if a >= len(utt.frames):
            raise MediaError(
                f"{self.rows[u]['video_mp4']}: {len(utt.frames)} frames decoded, manifest says {self.num_frames[u]}"
            )
        return mirrored(utt.frames[a:b]) if mirror else utt.frames[a:b], utt.mel, utt.visemes[a:b], None

    def frame(self, u: int, j: int, mirror: bool = False) -> tuple[np.ndarray, None]:
        frames = self._load(u).frames
        frame = frames[min(j, len(frames) - 1)]
        return mirrored(frame) if mirror else frame, None


def mirrored(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3, H, W]`` frames mirrored left-right."""
    return np.ascontiguousarray(np.asarray(frames)[..., ::-1])


def _pad(x: np.ndarray, length: int) -> np.ndarray:
    """Copy of ``x`` padded along axis 0 to ``length`` by repeating its last row."""
    return np.concatenate([x, np.repeat(x[-1:], length - len(x), axis=0)]) if len(x) < length else np.array(x)


def _image(x: np.ndarray) -> torch.Tensor:
    """uint8 -> float in [-1, 1], in numpy (single-threaded: no OpenMP overhead per item)."""
    out = np.array(x, dtype=np.float32)
    out /= 127.5
    out -= 1.0
    return torch.from_numpy(out)


def clip_item(
    audio: AudioFeatures, clip_len: int, window: dict, ref: np.ndarray, ref_latent: np.ndarray | None
) -> dict:
    """A dataset item (the ``Batch`` fields, ``id`` for ``ids``) from ``ClipDataset.window``'s dict and a reference."""
    n = len(window["frames"])
    vis = np.full(clip_len, SILENCE, dtype=np.int64)
    vis[:n] = window["visemes"]
    item = {
        "frames": _image(_pad(window["frames"], clip_len)),
        "reference": _image(ref),
        "mel": span_windows(audio, window["mel"], window["mel_offset"], clip_len),
        "visemes": torch.from_numpy(vis),
        "mask": torch.arange(clip_len) < n,
        "id": window["id"],
        "start": window["start"],
    }
    if "mel_mean" in window:  # LitData shards written before the field lack it
        item["mel_mean"] = torch.from_numpy(np.asarray(window["mel_mean"], dtype=np.float32))
    if "lips" in window:
        item["lips"] = torch.from_numpy(_pad(window["lips"], clip_len).astype(np.float32))
        item["lip_person"] = torch.from_numpy(np.array(window["lip_person"], dtype=np.float32))
    if "latents" in window:
        item["latents"] = torch.from_numpy(_pad(window["latents"], clip_len).astype(np.float32))
        item["ref_latent"] = torch.from_numpy(np.array(ref_latent, dtype=np.float32))
    return item
