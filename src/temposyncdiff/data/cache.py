"""Per-split decoded cache: frames (uint8), log-mel (float16) and visemes in memory-mappable ``.npy`` files.

Layout of ``<cache_dir>/``::

    frames.npy      uint8   [total_frames, 3, S, S]   all utterances' frames, concatenated
    mel.npy         float16 [total_mel, n_mels]       all utterances' log-mel, concatenated
    visemes.npy     int64   [total_frames]
    latents.npy     float16 [total_frames, C, h, w]   optional, written by ``add_latents``
    latents_mirror.npy                                the mirrored frames' latents (``add_latents(mirror=True)``)
    lips.npy        float32 [total_frames, 3]         optional, written by ``add_lips`` (``metrics.mouth.lip_shape``)
    index.json      per utterance: id, talk_id, offset, num_frames, mel_offset, mel_len, visemes source
    cache_meta.json key, settings, counts, skipped utterances, latents encoder (written last)

A build goes to a temporary sibling folder that is renamed into place when complete (``atomic_dir``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
import torch
from PIL import Image

from temposyncdiff.data.audio import AudioFeatures, load_audio
from temposyncdiff.data.video import MediaError, read_frames
from temposyncdiff.data.visemes import NUM_VISEMES, SILENCE
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_dir, atomic_path, write_json

CACHE_VERSION = 1
META_NAME = "cache_meta.json"
INDEX_NAME = "index.json"


class CacheError(UserError, ValueError):
    """A cache that is missing, incomplete, stale or cannot be built."""


@dataclass
class Utterance:
    """One decoded utterance, in the cache's formats."""

    frames: np.ndarray  # uint8 [N,3,S,S]
    mel: np.ndarray  # float16 [M, n_mels]
    visemes: np.ndarray  # int64 [N]
    viseme_source: str  # "file" or "silence"


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N,H,W,3]`` -> ``[N,3,size,size]``: centre-crop to square, PIL bicubic resize if the size differs."""
    _, h, w, _ = frames.shape
    s = min(h, w)
    frames = frames[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    if s != size:
        frames = np.stack(
            [np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BICUBIC)) for f in frames]
        )
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def load_visemes(path: str | os.PathLike | None, num_frames: int) -> tuple[np.ndarray, str]:
    """Per-frame viseme ids from an ``.npy`` file; silence (with a warning if the file is bad) otherwise."""
    silence = np.full(num_frames, SILENCE, dtype=np.int64)
    if not path:
        return silence, "silence"
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, TokenError) as err:  # TokenError: numpy parsing a corrupt header
        problem = f"unreadable ({err})"
    else:
        if not isinstance(ids, np.ndarray):  # an .npz archive
            ids.close()
            problem = "an .npz archive, not a .npy array"
        elif ids.ndim != 1 or ids.dtype.kind not in "iu":
            problem = f"expected a 1-D integer array, got {ids.dtype} {ids.shape}"
        elif len(ids) != num_frames:
            problem = f"{len(ids)} ids for {num_frames} video frames"
        elif len(ids) and (ids.min() < 0 or ids.max() >= NUM_VISEMES):
            problem = f"ids outside [0, {NUM_VISEMES})"
        else:
            return ids.astype(np.int64), "file"
    warnings.warn(f"{path}: bad viseme file: {problem}; using silence", stacklevel=2)
    return silence, "silence"


def decode_utterance(row: dict, image_size: int, audio: AudioFeatures, fps: float = 25.0) -> Utterance:
    """Decode one manifest row: frames at ``fps`` resized to ``image_size``, log-mel of its audio, visemes."""
    video, _ = read_frames(row["video_mp4"], fps)
    n = len(video)
    wave = load_audio(row["video_mp4"], audio.sample_rate, int(round(n * audio.sample_rate / fps)))
    mel = audio.log_mel(wave).T.numpy().astype(np.float16)
    visemes, source = load_visemes(row.get("viseme_npy"), n)
    return Utterance(resize_frames(video, image_size), mel, visemes, source)


def _stat(path: str | None) -> list | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns]


def cache_key(rows: list[dict], image_size: int, audio: AudioFeatures, fps: float) -> str:
    """sha256 of the rows (ids, file sizes and mtimes, viseme files), the settings and CACHE_VERSION."""
    items = [[r["id"], r["talk_id"], _stat(r["video_mp4"]), _stat(r.get("viseme_npy"))] for r in rows]
    blob = {"version": CACHE_VERSION, "rows": items, "image_size": image_size, "audio": asdict(audio), "fps": fps}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _read_meta(cache_dir: Path) -> dict | None:
    try:
        meta = json.loads((cache_dir / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON or not UTF-8
        return None
    ok = isinstance(meta, dict) and meta.get("version") == CACHE_VERSION and meta.get("complete") is True
    files = ("frames.npy", "mel.npy", "visemes.npy", INDEX_NAME)
    return meta if ok and all((cache_dir / f).is_file() for f in files) else None


class _NpyAppender:
    """Append rows to an ``.npy`` file of unknown length; the header is rewritten with the final shape on close."""

    def __init__(self, path: Path, dtype: np.dtype, tail: tuple[int, ...]):
        self.file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self.dtype, self.tail, self.rows = np.dtype(dtype), tuple(tail), 0
        self._header()
        self.data_start = self.file.tell()

    def _header(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.tail),
        }
        np.lib.format.write_array_header_1_0(self.file, header)  # padded so the first axis can grow in place

    def append(self, array: np.ndarray) -> None:
        if array.shape[1:] != self.tail:
            raise ValueError(f"row shape {array.shape[1:]} != {self.tail}")
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.rows += len(array)

    def __enter__(self) -> _NpyAppender:
        return self

    def __exit__(self, exc_type, *_) -> None:
        with self.file:
            if exc_type is None:
                self.file.seek(0)
                self._header()
                if self.file.tell() != self.data_start:
                    raise RuntimeError(f"{self.file.name}: npy header changed length")


def _decode_job(job: tuple[dict, int, AudioFeatures, float]) -> Utterance | str:
    row, image_size, audio, fps = job
    try:
        return decode_utterance(row, image_size, audio, fps)
    except (MediaError, OSError) as err:
        return str(err)


def _worker_init() -> None:
    torch.set_num_threads(1)


def build_cache(
    rows: list[dict],
    cache_dir: str | os.PathLike,
    image_size: int,
    audio: AudioFeatures,
    fps: float = 25.0,
    log: Callable[[str], Any] = print,
    workers: int = 1,
) -> Path:
    """Decode every row once into ``cache_dir`` (reused when its key matches); bad utterances are skipped."""
    cache_dir = Path(cache_dir)
    if abs(audio.fps - fps) > 1e-6:
        raise CacheError(f"audio.fps={audio.fps} differs from the video fps={fps}")
    key = cache_key(rows, image_size, audio, fps)
    old = _read_meta(cache_dir)
    if old is not None and old["key"] == key:
        log(f"cache: reusing {cache_dir} ({old['num_utterances']} utterances, {old['total_frames']} frames)")
        return cache_dir
    log(
        f"cache: building {cache_dir} from {len(rows)} utterances ({'stale cache' if cache_dir.exists() else 'none yet'})"
    )
    with atomic_dir(cache_dir) as tmp:
        start = time.perf_counter()
        meta = _write_cache(tmp, rows, image_size, audio, fps, log, workers)
        meta.update(key=key, build_seconds=round(time.perf_counter() - start, 2))
        write_json(tmp / META_NAME, meta)  # last: marks a complete cache
    log(
        f"cache: {meta['num_utterances']} utterances, {meta['total_frames']} frames, {len(meta['skipped'])} skipped "
        f"in {meta['build_seconds']} s -> {cache_dir}"
    )
    return cache_dir


def _write_cache(
    out: Path, rows: list[dict], image_size: int, audio: AudioFeatures, fps: float, log: Callable, workers: int
) -> dict:
    jobs = [(r, image_size, audio, fps) for r in rows]
    index, skipped = [], []
    with (
        _NpyAppender(out / "frames.npy", np.uint8, (3, image_size, image_size)) as frames,
        _NpyAppender(out / "mel.npy", np.float16, (audio.n_mels,)) as mel,
        _NpyAppender(out / "visemes.npy", np.int64, ()) as visemes,
        _decoded(jobs, workers) as results,
    ):
        for row, utt in zip(rows, results):
            if isinstance(utt, str):
                log(f"cache: skipped {row['id']}: {utt}")
                skipped.append({"id": row["id"], "reason": utt})
                continue
            index.append(
                {
                    "id": row["id"],
                    "talk_id": row["talk_id"],
                    "offset": frames.rows,
                    "num_frames": len(utt.frames),
                    "mel_offset": mel.rows,
                    "mel_len": len(utt.mel),
                    "visemes": utt.viseme_source,
                }
            )
            frames.append(utt.frames)
            mel.append(utt.mel)
            visemes.append(utt.visemes)
    if not index:
        raise CacheError(
            f"no utterance of {len(rows)} could be decoded (first: {skipped[0] if skipped else 'no rows'})"
        )
    silent = sum(u["visemes"] == "silence" for u in index)
    if silent:
        log(f"cache: {silent} of {len(index)} utterances have no usable viseme file; their visemes are silence")
    write_json(out / INDEX_NAME, index)
    return {
        "version": CACHE_VERSION,
        "complete": True,
        "image_size": image_size,
        "fps": fps,
        "audio": asdict(audio),
        "num_utterances": len(index),
        "total_frames": frames.rows,
        "total_mel": mel.rows,
        "skipped": skipped,
        "latents": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _decoded(jobs: list, workers: int) -> Iterator[Iterable[Utterance | str]]:
    """Decoded utterances in row order, from a spawn pool when ``workers > 1``."""
    if workers <= 1:
        yield map(_decode_job, jobs)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        yield pool.imap(_decode_job, jobs)


class CacheReader:
    """Read side of a cache; its arrays are checked against the meta on opening and memory-mapped anew in each
    process, so DataLoader workers can fork or spawn."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        meta = _read_meta(self.root)
        if meta is None:
            raise CacheError(f"{self.root}: no complete cache here (build it with tsd-data cache)")
        self.meta = meta
        try:
            index = json.loads((self.root / INDEX_NAME).read_text(encoding="utf-8"))
            self.ids = [u["id"] for u in index]
            self.talk_ids = [u["talk_id"] for u in index]
            self.offsets, self.num_frames, self.mel_offsets, self.mel_lens = (
                np.array([u[k] for u in index], dtype=np.int64)
                for k in ("offset", "num_frames", "mel_offset", "mel_len")
            )
            self.image_size: int = meta["image_size"]
            self.fps: float = meta["fps"]
            self.audio = AudioFeatures(**meta["audio"])
            frames, size = meta["total_frames"], self.image_size
            self._layout = {  # name -> the dtype and shape the meta promises
                "frames": (np.uint8, (frames, 3, size, size)),
                "mel": (np.float16, (meta["total_mel"], self.audio.n_mels)),
                "visemes": (np.int64, (frames,)),
            }
            if latents := meta.get("latents"):
                self._layout["latents"] = (np.float16, (frames, *latents["shape"][1:]))
                if latents.get("mirror"):
                    self._layout["latents_mirror"] = self._layout["latents"]
            if lips := meta.get("lips"):
                self._layout["lips"] = (np.float32, (frames, len(lips["features"])))
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise CacheError(f"{self.root}: unreadable cache index or meta ({reason}); rebuild it") from err
        self._arrays: dict[str, np.ndarray] = {}
        self._pid: int | None = None
        self._talk_lips: dict[str, np.ndarray] | None = None
        for name in self._layout:  # check every array's header now: a bad one is this line, not a worker's traceback
            self._array(name)

    def _array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            path, (dtype, shape) = self.root / f"{name}.npy", self._layout[name]
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError, TokenError) as err:  # truncated, object dtype, corrupt header
                reason = " ".join(str(err).split())
                raise CacheError(f"{path}: unreadable cache array ({reason}); rebuild the cache") from err
            if array.dtype != dtype or array.shape != shape:
                raise CacheError(
                    f"{path}: holds {array.dtype} {array.shape}, its meta says {np.dtype(dtype)} {shape}; rebuild it"
                )
            self._arrays[name] = array
        return self._arrays[name]

    @property
    def frames(self) -> np.ndarray:
        return self._array("frames")

    @property
    def mel(self) -> np.ndarray:
        return self._array("mel")

    @property
    def visemes(self) -> np.ndarray:
        return self._array("visemes")

    @property
    def latents(self) -> np.ndarray | None:
        """``[total_frames, C, h, w]`` float16 latents when ``add_latents`` has run, else None."""
        return self._array("latents") if self.meta.get("latents") else None

    @property
    def latents_mirror(self) -> np.ndarray | None:
        """Latents of the mirrored frames when ``add_latents(mirror=True)`` has run, else None."""
        return self._array("latents_mirror") if (self.meta.get("latents") or {}).get("mirror") else None

    @property
    def lips(self) -> np.ndarray | None:
        """``[total_frames, 3]`` float32 landmark lip shapes when ``add_lips`` has run, else None."""
        return self._array("lips") if self.meta.get("lips") else None

    def talk_lip_stats(self) -> dict[str, np.ndarray] | None:
        """Each talk's lip statistics over its frames in this cache (``metrics.mouth.lip_stats``, ``[2, 3]``: mean
        and std); None without lip shapes."""
        from temposyncdiff.metrics.mouth import lip_stats

        lips = self.lips
        if lips is None:
            return None
        if self._talk_lips is None:
            frames: dict[str, list[np.ndarray]] = {}
            for talk, off, n in zip(self.talk_ids, self.offsets, self.num_frames):
                frames.setdefault(talk, []).append(lips[off : off + n])
            self._talk_lips = {t: lip_stats(np.concatenate(f)) for t, f in frames.items()}
        return self._talk_lips

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}, "_pid": None}  # never pickle memmaps

    def __len__(self) -> int:
        return len(self.ids)


def open_cache(cache_dir: str | os.PathLike, key: str | None = None) -> CacheReader:
    """Open a complete cache; with ``key``, fail clearly when it was built from other rows or settings."""
    reader = CacheReader(cache_dir)
    if key is not None and reader.meta["key"] != key:
        raise CacheError(f"{cache_dir}: cache is stale (manifest or settings changed); rebuild it with prepare_data")
    return reader


def encoder_id(encode_fn: Callable) -> str:
    """Identify an encoder: sha256 of a module's class and weights, else the callable's qualified name."""
    if isinstance(encode_fn, torch.nn.Module):
        h = hashlib.sha256(type(encode_fn).__qualname__.encode())
        for name, t in encode_fn.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{type(encode_fn).__name__}:{h.hexdigest()[:16]}"
    return f"{getattr(encode_fn, '__module__', '')}.{getattr(encode_fn, '__qualname__', type(encode_fn).__qualname__)}"


def add_latents(
    cache_dir: str | os.PathLike,
    encode_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    encoder: str | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] = print,
    mirror: bool = False,
) -> Path:
    """Encode every cached frame (float ``[B,3,H,W]`` in [-1,1] -> latents) into ``latents.npy``; with ``mirror``,
    also every frame mirrored left-right into ``latents_mirror.npy`` (for ``ClipDataset(mirror=...)``).

    ``encoder`` names the encoder (default: ``encoder_id(encode_fn)``); latents already made by it are reused.
    """
    reader = open_cache(cache_dir)
    root, name = reader.root, encoder or encoder_id(encode_fn)
    meta = dict(reader.meta)
    made = meta.get("latents") or {}
    if made.get("encoder") == name and (made.get("mirror") or not mirror):
        log(f"cache: latents from {name} already in {root}")
        return root / "latents.npy"
    meta["latents"] = None
    write_json(root / META_NAME, meta)  # forget the old latents before replacing them
    frames, start = reader.frames, time.perf_counter()
    names = ["latents", "latents_mirror"] if mirror else ["latents"]
    with contextlib.ExitStack() as stack, torch.inference_mode():
        tmps = [stack.enter_context(atomic_path(root / f"{n}.npy")) for n in names]
        outs: list[np.ndarray] = []
        for a in range(0, len(frames), batch_size):
            x = torch.from_numpy(np.array(frames[a : a + batch_size])).to(device).float() / 127.5 - 1.0
            for k, tmp in enumerate(tmps):
                z = encode_fn(x.flip(-1) if k else x).float().cpu().numpy()
                if len(outs) == k:
                    outs.append(
                        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(frames), *z.shape[1:]))
                    )
                outs[k][a : a + len(z)] = z
        shape = list(outs[0].shape)
        for out in outs:
            out.flush()
        del outs
    meta["latents"] = {"encoder": name, "shape": shape, "dtype": "float16", "mirror": mirror}
    write_json(root / META_NAME, meta)
    log(
        f"cache: latents {shape}{' and mirrored' if mirror else ''} from {name} in {time.perf_counter() - start:.1f} s -> {root / 'latents.npy'}"
    )
    return root / "latents.npy"


def add_lips(cache_dir: str | os.PathLike, log: Callable[[str], Any] = print) -> Path | None:
    """Landmark lip shapes (``metrics.mouth.lip_shape``) of every cached frame into ``lips.npy``: the truth that
    lip-conditioned denoisers (``model.net.lip_dim``) learn to draw from and to predict from audio.

    Needs dlib and its 68-point model (``pip install -e .[faces]``). Faces are tracked per utterance as the lip metric
    tracks them; frames without a face near take the shape interpolated from their neighbours (an utterance without
    any face: its mean is unknown, so the whole cache's median). Shapes already there are reused. Where dlib finds
    no face in any frame (drawn faces), nothing is written and None returned: such data has no lip truth.
    """
    from temposyncdiff.metrics.mouth import LIP_FEATURES, LipLandmarks, interpolate_missing

    reader = open_cache(cache_dir)
    root, meta = reader.root, dict(reader.meta)
    if (meta.get("lips") or {}).get("features") == list(LIP_FEATURES):
        log(f"cache: lip shapes already in {root}")
        return root / "lips.npy"
    try:
        landmarks = LipLandmarks()
    except (ImportError, OSError, RuntimeError) as err:
        raise CacheError(f"lips=true needs dlib's face landmarks: {err}") from None
    meta["lips"] = None
    write_json(root / META_NAME, meta)
    start, shapes = time.perf_counter(), []
    for off, n in zip(reader.offsets, reader.num_frames):
        frames = np.asarray(reader.frames[off : off + n]).transpose(0, 2, 3, 1)
        track = landmarks.track(frames)
        shapes.append(landmarks.shapes(frames, track.boxes))
    missing = int(sum(np.isnan(s[:, 0]).sum() for s in shapes))
    found = np.concatenate([s[~np.isnan(s[:, 0])] for s in shapes])
    if not len(found):
        log(f"cache: dlib finds no face in any frame of {root}; no lip shapes written")
        return None
    fallback = np.median(found, axis=0)
    shapes = [interpolate_missing(s) if not np.isnan(s[:, 0]).all() else np.tile(fallback, (len(s), 1)) for s in shapes]
    with atomic_path(root / "lips.npy") as tmp:
        np.save(tmp, np.concatenate(shapes).astype(np.float32))
    meta["lips"] = {"features": list(LIP_FEATURES), "frames_without_face": missing}
    write_json(root / META_NAME, meta)
    log(
        f"cache: lip shapes of {len(found) + missing} frames ({missing} without a face, interpolated) in "
        f"{time.perf_counter() - start:.1f} s -> {root / 'lips.npy'}"
    )
    return root / "lips.npy"
