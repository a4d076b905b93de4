"""LitData shards of a cache: ``tsd-data shards`` writes them, the data module streams them (``data.format=litdata``).

Layout of one split's shard set ``<shard_dir>/<name>_<split>/`` (a local folder or an object-store URI)::

    clips/             one item per ClipDataset window, in its order: the window's frames (uint8, unpadded), the
                       mel rows its windows read, visemes, latents and lip shapes (with their talk's mean and
                       std, ``lip_person``) when the cache has them, id, start, index
    utterances/        one item per utterance: frames, mel, visemes, latents (random access)
    shards_meta.json   digest, source cache, counts, clip settings, utterance ids/talks/lengths (written last)

One item per window, not per utterance: a streamed item then is ClipDataset's item with a single other read, its
reference frame. That frame cannot be stored with the window: training draws a new one every epoch, from another
utterance of the same talk, so ``ClipStream`` looks it up in ``utterances/`` with ClipDataset's own rule. The
validation and test splits are ClipDatasets over ``utterances/`` (``ShardSource``): small, read in order, and the
stages that walk whole held-out utterances work on them unchanged.

Ordering (one process, ``num_workers=0``): with ``shuffle=False`` the stream yields ClipDataset's items in its
order, so the batches equal the cache path's. With ``shuffle=True`` LitData permutes the chunks and blocks of items
inside each chunk, not all items at once as ``EpochSampler`` does: an epoch holds the same items as the cache
path's (each identical to the cache's item for that epoch), in an order fixed by seed and epoch but not the cache
path's order. Across ranks LitData gives each rank distinct items and, to keep ranks in step, drops fewer than
``world_size * batch_size`` of them per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from litdata import StreamingDataset, optimize

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.cache import CacheReader
from temposyncdiff.data.clips import clip_item
from temposyncdiff.data.dataset import ClipDataset
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_dir, write_json

SHARDS_VERSION = 2  # 2: windows with lips also hold their talk's lip statistics (lip_person)
SHARD_META = "shards_meta.json"


class ShardError(UserError, ValueError):
    """A shard set that is missing, unlike the data settings, or in the way of a different one."""


def _remote(path: str) -> bool:
    return "://" in path


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _fs(url: str) -> Any:
    from litdata.streaming.fs_provider import _get_fs_provider  # LitData's own client for the URIs it streams

    return _get_fs_provider(url)


SAFE_FORMATS = (
    "str",
    "text",
    "bool",
    "int",
    "float",
    "bytes",
    "numpy",
    "no_header_numpy",
    "tensor",
    "no_header_tensor",
)


def _read_json(url: str) -> dict:
    """A JSON file of a shard set, local or on an object store."""
    if not _remote(url):
        return json.loads(Path(url).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        _fs(url).download_file(url, f"{tmp}/file.json")
        return json.loads(Path(tmp, "file.json").read_text(encoding="utf-8"))


def check_formats(root: str) -> None:
    """Refuse a LitData set whose index names a serializer that could unpickle (or decode) arbitrary data:
    ``tsd-data shards`` writes plain arrays and numbers only, so anything else is not ours."""
    url = _join(root, "index.json")
    try:
        formats = _read_json(url)["config"]["data_format"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{url}: not a readable LitData index ({err})") from None
    bad = sorted({f for f in formats if str(f).split(":")[0] not in SAFE_FORMATS})
    if bad:
        raise UserError(
            f"{url}: refusing serializer(s) {bad}: a shard set written by tsd-data shards holds arrays only"
        )


def read_shard_meta(root: str) -> dict | None:
    """The meta of the complete shard set at ``root`` (folder or object-store URI), else None."""
    url = _join(root, SHARD_META)
    try:
        if _remote(root) and not _fs(url).exists(url):
            return None
        meta = _read_json(url)
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("version") == SHARDS_VERSION else None


def open_shards(root: str, settings: dict[str, Any]) -> dict:
    """The meta of the shard set at ``root``; a clear error when there is none or it was written with other
    ``settings`` (image_size, fps, audio, clip_len, stride)."""
    meta = read_shard_meta(root)
    if meta is None:
        raise ShardError(f"{root}: no complete shard set here (write it with tsd-data shards)")
    differ = {k: (meta[k], v) for k, v in settings.items() if meta[k] != v}
    if differ:
        got = ", ".join(f"{k}={a} (data asks {b})" for k, (a, b) in differ.items())
        raise ShardError(f"{root}: shards written with {got}; rewrite them with tsd-data shards force=true")
    return meta


def _window(dataset: ClipDataset, index: int) -> dict:
    """optimize() worker: one ``clips/`` item (module level, so spawned workers can import it)."""
    return dataset.window(index)


def _utterance(dataset: ClipDataset, u: int) -> dict:
    """optimize() worker: one ``utterances/`` item."""
    frames, mel, visemes, latents = dataset.src.clip(u, 0, dataset.src.num_frames[u])
    record = {"frames": np.asarray(frames), "mel": np.asarray(mel), "visemes": np.asarray(visemes)}
    if latents is not None:
        record["latents"] = np.asarray(latents)
    return record


def _optimize(
    dataset: ClipDataset, root: str, chunk_bytes: int | str, workers: int, start_method: str | None, mode: str | None
) -> None:
    """Write ``clips/`` and ``utterances/`` under ``root``, in dataset order (each worker writes a contiguous run)."""
    for name, fn, count in (("clips", _window, len(dataset)), ("utterances", _utterance, len(dataset.src.num_frames))):
        optimize(
            fn=partial(fn, dataset),
            inputs=list(range(count)),
            output_dir=_join(root, name),
            chunk_bytes=chunk_bytes,
            num_workers=min(workers, count),
            keep_data_ordered=True,
            reorder_files=False,
            start_method=start_method,
            mode=mode,
            verbose=False,
        )


def _describe(meta: dict) -> str:
    return (
        f"digest {meta['digest'][:12]}, {meta['num_items']} clips of {meta['clip_len']} frames from "
        f"{meta['source']['cache_dir']}"
    )


def write_shards(
    reader: CacheReader,
    out: str,
    clip_len: int,
    stride: int | None = None,
    chunk_bytes: int | str = "64MB",
    workers: int = 1,
    force: bool = False,
    start_method: str | None = None,
    log: Callable[[str], Any] = print,
) -> dict:
    """Write one split's cache as a shard set at ``out`` (folder or object-store URI) and return its meta.

    The same shard set already there is reused; a different one (or other files) is replaced only with ``force``.
    A local set is built in a temporary sibling folder and renamed into place; on an object store the meta is
    deleted first and uploaded last, so a set without it is incomplete.
    """
    dataset = ClipDataset(reader, clip_len, stride)
    source = {
        "cache_dir": str(reader.root),
        "cache_key": reader.meta["key"],
        "latents": (reader.meta.get("latents") or {}).get("encoder"),
    }
    content = {
        "version": SHARDS_VERSION,
        "cache_key": source["cache_key"],
        "latents": source["latents"],
        "clip_len": clip_len,
        "stride": dataset.stride,
    }
    meta = {
        **content,
        "digest": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
        "source": source,
        "image_size": reader.image_size,
        "fps": reader.fps,
        "audio": reader.meta["audio"],
        "num_items": len(dataset),
        "num_utterances": len(reader),
        "total_frames": int(sum(reader.num_frames)),
        "chunk_bytes": chunk_bytes,
        "utterances": {
            "ids": reader.ids,
            "talk_ids": reader.talk_ids,
            "num_frames": [int(n) for n in reader.num_frames],
        },
    }
    old = read_shard_meta(out)
    if old is not None and old["digest"] == meta["digest"] and not force:
        log(f"shards: {out} is up to date ({_describe(old)})")
        return old
    empty = _fs(out).is_empty(out) if _remote(out) else not Path(out).exists() or not any(Path(out).iterdir())
    if not force and not empty:
        what = f"a different shard set ({_describe(old)})" if old else "files that are not a complete shard set"
        raise ShardError(f"{out}: holds {what}; pass force=true to replace it")
    start, settings = time.perf_counter(), (chunk_bytes, workers, start_method)
    if _remote(out):
        _fs(out).delete_file_or_directory(_join(out, SHARD_META))
        _optimize(dataset, out, *settings, mode="overwrite")
        meta["build_seconds"] = round(time.perf_counter() - start, 2)
        with tempfile.TemporaryDirectory() as tmp:
            write_json(Path(tmp, SHARD_META), meta)
            _fs(out).upload_file(str(Path(tmp, SHARD_META)), _join(out, SHARD_META))
    else:
        with atomic_dir(out) as tmp:
            _optimize(dataset, str(tmp), *settings, mode=None)
            meta["build_seconds"] = round(time.perf_counter() - start, 2)
            write_json(tmp / SHARD_META, meta)  # last: marks a complete shard set
    log(f"shards: {meta['num_items']} clips, {meta['num_utterances']} utterances in {meta['build_seconds']} s -> {out}")
    return meta


class ShardSource:
    """Random access to a shard set's ``utterances/``, with the interface ClipDataset reads a cache through.

    The LitData reader opens lazily in each process, so DataLoader workers can fork or spawn.
    """

    def __init__(self, root: str, meta: dict, cache_dir: str | None = None):
        self.root, self.cache_dir = root, cache_dir
        utts = meta["utterances"]
        self.ids, self.talk_ids, self.num_frames = utts["ids"], utts["talk_ids"], utts["num_frames"]
        self.audio, self.image_size = AudioFeatures(**meta["audio"]), meta["image_size"]
        self._store: StreamingDataset | None = None
        self._pid: int | None = None

    def _utterance(self, u: int) -> dict:
        if self._pid != os.getpid():
            check_formats(_join(self.root, "utterances"))
            self._store = StreamingDataset(_join(self.root, "utterances"), cache_dir=self.cache_dir, batch_decode=0)
            self._pid = os.getpid()
        return self._store[u]  # batch_decode=0 as in ClipStream

    def clip(
        self, u: int, a: int, b: int, mirror: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        _no_mirror(mirror)
        r = self._utterance(u)  # arrays may map LitData's chunk files: copy what is kept
        latents = r.get("latents")
        return (
            np.array(r["frames"][a:b]),
            np.array(r["mel"]),
            np.array(r["visemes"][a:b]),
            None if latents is None else np.array(latents[a:b]),
        )

    def frame(self, u: int, j: int, mirror: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        _no_mirror(mirror)
        r = self._utterance(u)
        latents = r.get("latents")
        return np.array(r["frames"][j]), None if latents is None else np.array(latents[j])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None}


def _no_mirror(mirror: bool) -> None:
    if mirror:  # ClipDataset refuses mirror augmentation over shards before it gets here
        raise ValueError("LitData shards hold no mirrored latents: mirror augmentation reads a cache")


class ClipStream(StreamingDataset):
    """The ``clips/`` items streamed by LitData, each completed with its reference frame as ClipDataset picks it.

    It streams a training split (references vary per epoch); ``self.clips`` is the same split as a ClipDataset
    over ``utterances/``. LitData counts epochs from 1, Lightning and ``EpochSampler`` from 0.
    """

    def __init__(
        self,
        root: str,
        meta: dict,
        shuffle: bool = True,
        seed: int = 0,
        reference: str = "other_clip",
        cache_dir: str | None = None,
    ):
        # batch_decode=0: decode the item asked for only (LitData's default decodes blocks of neighbours: slower here)
        check_formats(_join(root, "clips"))
        super().__init__(_join(root, "clips"), cache_dir=cache_dir, shuffle=shuffle, seed=seed, batch_decode=0)
        self.clips = ClipDataset(
            ShardSource(root, meta, cache_dir),
            meta["clip_len"],
            meta["stride"],
            train=True,
            seed=seed,
            reference=reference,
        )

    def __getitem__(self, index: Any) -> dict:
        window, clips = super().__getitem__(index), self.clips
        ref, ref_latent = clips.src.frame(*clips.reference_frame(window["index"], self.current_epoch - 1))
        return clip_item(clips.audio, clips.clip_len, window, ref, ref_latent)
