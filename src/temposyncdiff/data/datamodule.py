"""The one LightningDataModule: manifests -> (cache | LitData shards) -> clips -> DataLoaders of Batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.batch import collate
from temposyncdiff.data.cache import CacheError, build_cache, cache_key, open_cache
from temposyncdiff.data.clips import CacheSource
from temposyncdiff.data.dataset import ClipDataset, EpochSampler
from temposyncdiff.errors import UserError

SPLITS = ("train", "val", "test")
FORMATS = ("cache", "litdata")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class DataConfigError(UserError, ValueError):
    """A missing or empty manifest split, or data settings that do not fit together."""


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy in each DataLoader worker from torch's per-worker seed."""
    np.random.seed(torch.initial_seed() % 2**32)


class ResumableLoader(DataLoader):
    """The training loader: its place in the epoch goes into checkpoints (Lightning calls ``state_dict`` when it
    saves and ``load_state_dict`` when it resumes), and a resumed epoch skips the batches already trained on
    without loading them."""

    position = 0  # batches handed out in the current epoch

    def __iter__(self) -> Iterator:
        self.position = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["position"] < len(self):  # a checkpoint at the very end of an epoch: the next one starts afresh
            self.sampler.start = state["position"] * self.batch_size


def _read_manifest(path: Path) -> list[dict]:
    from temposyncdiff.data.manifest import read_manifest  # imported late: manifests are another module's job

    return read_manifest(path)


class TalkingHeadDataModule(L.LightningDataModule):
    """Clips of ``<manifest_dir>/<name>_{train,val,test}.jsonl``, read from per-split caches when ``use_cache``,
    or with ``format="litdata"`` from the LitData shards ``tsd-data shards`` wrote under ``shard_dir``.

    ``talk_balance`` (cache only) draws training items in inverse proportion to their talk's item count to that
    power (``ClipDataset.talk_weights``), so a person with 70 s of footage does not drown one with 10 s.
    """

    def __init__(
        self,
        manifest_dir: str,
        name: str = "lrs3",
        cache_dir: str | None = None,
        use_cache: bool = True,
        image_size: int = 128,
        clip_len: int = 16,
        stride: int | None = None,
        audio: dict | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        reference: str = "other_clip",
        val_max_items: int | None = None,
        fps: float = 25.0,
        cache_workers: int = 1,
        format: str = "cache",
        shard_dir: str | None = None,
        shard_cache_dir: str | None = None,
        mirror: float = 0.0,
        talk_balance: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise DataConfigError(f"data.format={format!r}: choose one of {FORMATS}")
        if not 0.0 <= mirror <= 1.0 or (mirror and format == "litdata"):
            raise DataConfigError(f"data.mirror={mirror}: a probability in [0, 1], with data.format=cache")
        if not 0.0 <= talk_balance <= 1.0 or (talk_balance and format == "litdata"):
            raise DataConfigError(f"data.talk_balance={talk_balance}: in [0, 1], with data.format=cache")
        if format == "litdata" and not shard_dir:
            raise DataConfigError("data.format=litdata needs data.shard_dir")
        if use_cache and not cache_dir:
            raise DataConfigError("data.use_cache=true needs data.cache_dir (or set use_cache=false)")
        audio = dict(audio or {})
        if abs(audio.setdefault("fps", fps) - fps) > 1e-6:
            raise DataConfigError(f"data.audio.fps={audio['fps']} differs from data.fps={fps}")
        self.audio = AudioFeatures(**audio)
        self.datasets: dict[str, Dataset] = {}

    def manifest_path(self, split: str) -> Path:
        return Path(self.hparams.manifest_dir) / f"{self.hparams.name}_{split}.jsonl"

    def cache_path(self, split: str) -> Path:
        return Path(self.hparams.cache_dir) / f"{self.hparams.name}_{split}"

    def shard_path(self, split: str) -> str:
        """The split's shard set: a folder or an object-store URI."""
        return f"{str(self.hparams.shard_dir).rstrip('/')}/{self.hparams.name}_{split}"

    def rows(self, split: str) -> list[dict]:
        """Rows of one split; a clear error when its manifest is missing or empty."""
        path = self.manifest_path(split)
        if not path.is_file():
            raise DataConfigError(f"{path}: manifest for split {split!r} not found (run tsd-data manifest)")
        rows = _read_manifest(path)
        if not rows:
            raise DataConfigError(f"{path}: manifest for split {split!r} is empty")
        return rows

    def prepare_data(self) -> None:
        """Build (or reuse) the cache of every split that has a non-empty manifest (Lightning runs it on rank 0).

        Shards are not made here: ``tsd-data shards`` writes them from the cache.
        """
        if not self.hparams.use_cache or self.hparams.format == "litdata":
            return
        hp = self.hparams
        for split in SPLITS:
            path = self.manifest_path(split)
            rows = _read_manifest(path) if path.is_file() else []
            if rows:  # a missing or empty split is reported by setup() when a stage needs it
                build_cache(
                    rows,
                    self.cache_path(split),
                    hp.image_size,
                    self.audio,
                    hp.fps,
                    log=rank_zero_info,
                    workers=hp.cache_workers,
                )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if hp.format == "litdata":
                ds = self._shard_dataset(split)
            else:
                rows = self.rows(split)
                if hp.use_cache:
                    source = open_cache(self.cache_path(split), cache_key(rows, hp.image_size, self.audio, hp.fps))
                else:
                    source = rows
                ds = ClipDataset(
                    source,
                    hp.clip_len,
                    hp.stride,
                    self.audio,
                    train=split == "train",
                    seed=hp.seed,
                    reference=hp.reference,
                    image_size=hp.image_size,
                    fps=hp.fps,
                    mirror=hp.mirror,
                )
            if split != "train" and isinstance(getattr(ds, "src", None), CacheSource):
                ds.src.known_lips = self.train_lip_stats()
            if split == "val" and hp.val_max_items and len(ds) > hp.val_max_items:  # evenly spaced subset
                ds = Subset(ds, np.linspace(0, len(ds) - 1, hp.val_max_items).round().astype(int).tolist())
            self.datasets[split] = ds

    def train_lip_stats(self) -> dict[str, np.ndarray]:
        """Each talk's lip statistics in the training cache (``talk_lip_stats``; empty without one or its lips)."""
        if "train" in self.datasets and isinstance(getattr(self.datasets["train"], "src", None), CacheSource):
            reader = self.datasets["train"].src.reader
        else:
            try:
                reader = open_cache(self.cache_path("train"))
            except CacheError:
                return {}
        return reader.talk_lip_stats() or {}

    def _shard_dataset(self, split: str) -> Dataset:
        """``split`` from its shards: the training split streamed (``ClipStream``), the others by random access."""
        try:
            from temposyncdiff.data.shards import ClipStream, ShardSource, open_shards
        except ImportError as err:
            raise DataConfigError(f"data.format=litdata needs litdata ({err}): pip install -e '.[scale]'") from err
        hp, root = self.hparams, self.shard_path(split)
        meta = open_shards(
            root,
            {
                "image_size": hp.image_size,
                "fps": hp.fps,
                "audio": asdict(self.audio),
                "clip_len": hp.clip_len,
                "stride": hp.stride or hp.clip_len,
            },
        )
        if split == "train":
            return ClipStream(root, meta, seed=hp.seed, reference=hp.reference, cache_dir=hp.shard_cache_dir)
        source = ShardSource(root, meta, hp.shard_cache_dir)
        return ClipDataset(source, hp.clip_len, hp.stride, seed=hp.seed, reference=hp.reference)

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        if split not in self.datasets:
            raise DataConfigError(f"split {split!r} is not set up; call setup() with the right stage first")
        ds = self.datasets[split]
        if isinstance(ds, IterableDataset):  # a ClipStream: LitData shuffles, splits across ranks, resumes
            from litdata import StreamingDataLoader

            return StreamingDataLoader(
                ds,
                batch_size=hp.batch_size,
                collate_fn=collate,
                num_workers=hp.num_workers,
                pin_memory=hp.pin_memory,
                worker_init_fn=worker_init_fn,
                persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            )
        train = split == "train"
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        # val/test: in order, and Lightning shards them under DDP; train: our sampler shards itself
        sampler = None
        if train:
            weights = ds.talk_weights(hp.talk_balance) if hp.talk_balance else None
            sampler = EpochSampler(len(ds), seed=hp.seed, num_replicas=world, rank=rank, weights=weights)
        return (ResumableLoader if train else DataLoader)(
            ds,
            batch_size=hp.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            worker_init_fn=worker_init_fn,
            generator=torch.Generator().manual_seed(hp.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
