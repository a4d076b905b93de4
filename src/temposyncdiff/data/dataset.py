"""Fixed-length clips with mel windows, visemes and a reference frame, from a cache, mp4s or LitData shards."""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.cache import CacheError, CacheReader, build_cache, open_cache
from temposyncdiff.data.clips import CacheSource, ClipSource, RowSource, clip_item, mel_span

REFERENCES = ("other_clip", "first_frame")


class ClipDataset(Dataset):
    """Windows of ``clip_len`` frames every ``stride`` frames over each utterance (a shorter one gives one padded item).

    ``source`` is a ``CacheReader``, a list of manifest rows (decoded on the fly, resized to ``image_size``) or
    another ``ClipSource`` (``data.shards.ShardSource``: random access to LitData shards). An item is a dict of the ``Batch`` fields (``id`` for
    ``ids``); the index may be ``(index, epoch)``, as ``EpochSampler`` yields it, so workers know the epoch
    without a shared ``set_epoch``. ``mirror``: in training, this share of the items (a fixed draw per item, so
    that the student's teacher couplings stay valid) has its frames, reference and latents mirrored left-right.
    """

    def __init__(
        self,
        source: CacheReader | list[dict] | ClipSource,
        clip_len: int = 16,
        stride: int | None = None,
        audio: AudioFeatures | None = None,
        train: bool = False,
        seed: int = 0,
        reference: str = "other_clip",
        image_size: int | None = None,
        fps: float = 25.0,
        mirror: float = 0.0,
    ):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if isinstance(source, CacheReader) or hasattr(source, "clip"):  # a cache or a ClipSource
            self.src: ClipSource = CacheSource(source) if isinstance(source, CacheReader) else source
            audio = audio or self.src.audio
            if asdict(audio) != asdict(self.src.audio) or image_size not in (None, self.src.image_size):
                raise CacheError(f"{self.src.root}: made with image_size={self.src.image_size}, audio={self.src.audio}")
        else:
            if image_size is None:
                raise ValueError("image_size is required when reading from manifest rows")
            audio = audio or AudioFeatures(fps=fps)
            self.src = RowSource(list(source), image_size, audio, fps)
        self.audio, self.clip_len, self.stride = audio, clip_len, stride or clip_len
        self.train, self.seed, self.reference, self.epoch = train, seed, reference, 0
        if not 0.0 <= mirror <= 1.0:
            raise ValueError(f"mirror must be a probability in [0, 1], got {mirror}")
        if mirror and not isinstance(self.src, CacheSource | RowSource):
            raise ValueError("mirror augmentation reads a cache or manifest rows, not LitData shards")
        self.mirror = mirror if train else 0.0
        self.items = [
            (u, s) for u, n in enumerate(self.src.num_frames) for s in range(0, max(n - clip_len, 0) + 1, self.stride)
        ]
        self._mel_means: dict[int, np.ndarray] = {}  # utterance -> its mean log-mel, read once (window)
        self.by_talk: dict[str, list[int]] = defaultdict(list)
        for u, talk in enumerate(self.src.talk_ids):
            self.by_talk[talk].append(u)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for items indexed by a plain int (training varies the reference frame per epoch)."""
        self.epoch = epoch

    def reference_frame(self, index: int, epoch: int = 0) -> tuple[int, int]:
        """``(utterance, frame)`` of item ``index``'s reference: the same talk, outside the clip window if possible."""
        u, start = self.items[index]
        if self.reference == "first_frame":
            return u, start
        rng = np.random.default_rng([self.seed, index, epoch if self.train else 0])
        others = [v for v in self.by_talk[self.src.talk_ids[u]] if v != u]
        if others:
            v = others[int(rng.integers(len(others)))]
            return v, int(rng.integers(self.src.num_frames[v]))
        n = self.src.num_frames[u]
        outside = start + max(0, n - start - self.clip_len)
        if outside:
            k = int(rng.integers(outside))
            return u, k if k < start else k + self.clip_len
        return u, 0

    def talk_weights(self, balance: float) -> np.ndarray:
        """Each item's sampling weight: one over its talk's item count to the power ``balance`` (0: every item
        alike; 1: every talk, i.e. every person of an own-footage corpus, alike; 0.5 between)."""
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"talk balance must be in [0, 1], got {balance}")
        talks = [self.src.talk_ids[u] for u, _ in self.items]
        counts = Counter(talks)
        return np.array([counts[t] ** -balance for t in talks])

    def mirrored(self, index: int) -> bool:
        """Whether item ``index`` is mirrored (``mirror``): the same draw in every epoch."""
        return bool(self.mirror) and np.random.default_rng([self.seed, index]).random() < self.mirror

    def window(self, index: int, mirror: bool | None = None) -> dict[str, Any]:
        """Item ``index`` without its (epoch-dependent) reference: unpadded frames, the mel rows of its windows,
        visemes and latents, as the LitData shards store it (``mirror`` None: the item's own draw)."""
        u, start = self.items[index]
        mirror = self.mirrored(index) if mirror is None else mirror
        frames, mel, visemes, latents = self.src.clip(u, start, start + self.clip_len, mirror)
        s0, m0, m1 = mel_span(self.audio, start, self.clip_len)
        window = {
            "index": index,
            "id": self.src.ids[u],
            "start": start,
            "frames": np.asarray(frames),
            "mel": np.asarray(mel[m0:m1]),
            "mel_offset": start - s0,
            "mel_mean": self._mel_mean(u, mel),  # the whole utterance's (audio encoders' mel_norm)
            "visemes": np.asarray(visemes),
        }
        if latents is not None:
            window["latents"] = np.asarray(latents)
        if hasattr(self.src, "lips") and (lips := self.src.lips(u, start, start + self.clip_len)) is not None:
            window["lips"] = np.asarray(lips)  # only a cache holds them (tsd-data cache lips=true)
            window["lip_person"] = self.src.lip_person(u)
        return window

    def _mel_mean(self, u: int, mel: np.ndarray) -> np.ndarray:
        """Utterance ``u``'s mean log-mel ``[n_mels]`` (audio encoders' ``mel_norm``), from its whole ``mel`` rows once:
        its windows overlap, and each would otherwise read every row again."""
        if u not in self._mel_means:
            self._mel_means[u] = np.asarray(mel, np.float32).mean(0)
        return self._mel_means[u]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        mirror = self.mirrored(index)
        ref, ref_latent = self.src.frame(*self.reference_frame(index, epoch), mirror)
        return clip_item(self.audio, self.clip_len, self.window(index, mirror), ref, ref_latent)


class EpochSampler(DistributedSampler):
    """This rank's share of an epoch as ``(index, epoch)`` pairs, shuffled with a generator seeded by ``seed + epoch``.

    A ``DistributedSampler`` (of one replica unless told otherwise), so under DDP Lightning uses it as it is and
    calls its ``set_epoch``. The next epoch begins at item ``start`` of this rank's share (see ``ResumableLoader``).
    With ``weights`` (one per item) an epoch is as many draws with replacement, in proportion to them; weights all
    alike (one talk) keep the plain shuffled epochs.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        weights: np.ndarray | None = None,
    ):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if weights is not None and len(weights) != size:
            raise ValueError(f"{len(weights)} sampling weights for {size} items")
        alike = weights is None or np.ptp(weights) == 0
        self.weights = None if alike else torch.as_tensor(weights, dtype=torch.float64)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        if self.weights is None:
            order = super().__iter__()
        else:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g).tolist()
            order = iter(drawn[self.rank :: self.num_replicas])
        return ((i, self.epoch) for i in itertools.islice(order, start, None))


def benchmark_loading(
    rows: list[dict],
    cache_dir: str | os.PathLike,
    image_size: int = 64,
    clip_len: int = 16,
    stride: int | None = None,
    audio: AudioFeatures | None = None,
    fps: float = 25.0,
    max_items: int = 32,
    seed: int = 0,
    log: Callable[[str], Any] = print,
) -> dict:
    """Clips/s reading the same (shuffled) items from the cache and by decoding the mp4s; builds the cache if needed."""
    audio = audio or AudioFeatures(fps=fps)
    start = time.perf_counter()
    build_cache(rows, cache_dir, image_size, audio, fps, log=log)
    build_s = time.perf_counter() - start
    cached = ClipDataset(open_cache(cache_dir), clip_len, stride, audio, seed=seed)
    direct = ClipDataset(rows, clip_len, stride, audio, seed=seed, image_size=image_size, fps=fps)
    order = [int(i) for i in np.random.default_rng(seed).permutation(min(len(cached), len(direct)))[:max_items]]

    def rate(ds: ClipDataset) -> float:
        ds[order[-1]]  # warm-up: open memmaps, build the mel transform
        t = time.perf_counter()
        for i in order:
            ds[i]
        return len(order) / (time.perf_counter() - t)

    cache_rate, mp4_rate = rate(cached), rate(direct)
    result = {
        "items": len(order),
        "clip_len": clip_len,
        "image_size": image_size,
        "cache_build_s": round(build_s, 3),
        "cache_clips_per_s": round(cache_rate, 1),
        "mp4_clips_per_s": round(mp4_rate, 1),
        "speedup": round(cache_rate / mp4_rate, 1),
    }
    log(f"data loading: {result}")
    return result
