"""Manifests: scan a corpus, probe every video, split by talk or utterance, write jsonl + a meta sidecar."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from temposyncdiff.data.transcript import read_transcript
from temposyncdiff.data.video import probe
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import write_json, write_text

SPLITS = ("train", "val", "test")
LAYOUTS = ("lrs3", "hdtf")
SPLIT_BY = ("talk", "utterance", "utterance_per_talk")
PATH_KEYS = ("video_mp4", "transcript", "viseme_npy")


class ManifestError(UserError, ValueError):
    """A corpus, split setting or manifest file that cannot be used; the message names the path or setting."""


class ManifestNotFoundError(UserError, FileNotFoundError):
    """A corpus root or manifest sidecar that does not exist."""


class ManifestRow(TypedDict):
    """One utterance; paths are relative to the meta root in files, absolute after ``read_manifest``."""

    id: str
    talk_id: str
    video_mp4: str
    transcript: str | None
    viseme_npy: str | None
    num_frames: int
    fps: float
    duration_s: float
    audio_sample_rate: int
    width: int
    height: int


ROW_KEYS = tuple(ManifestRow.__annotations__)


def _scan(root: Path, layout: str) -> tuple[list[tuple[str, str, Path]], list[dict]]:
    """``(talk_id, utt, mp4)`` for every video of the layout (sorted), plus names that do not fit it."""
    if layout == "lrs3":
        files = sorted(p for d in root.iterdir() if d.is_dir() for p in d.glob("*.mp4"))
        entries = [(p.parent.name, p.stem, p) for p in files if not p.name.startswith(".")]
        return entries, []
    entries, skipped = [], []
    for p in sorted(root.glob("*.mp4")):
        if p.name.startswith("."):
            continue
        talk, _, clip = p.stem.rpartition("_")
        if talk and clip:
            entries.append((talk, clip, p))
        else:
            skipped.append({"path": p.name, "reason": "name is not <video>_<clip>.mp4"})
    return entries, skipped


def _reason(err: Exception, path: Path) -> str:
    """A skip reason: the error's message without the path (and with its type when it is no ``UserError``)."""
    msg = str(err).removeprefix(f"{path}: ").replace(str(path), path.name)
    if not isinstance(err, UserError) or not msg:  # a bug's message means little without its type
        msg = f"{type(err).__name__}: {msg}" if msg else type(err).__name__
    return " ".join(msg.split())


def _probe_entry(mp4: Path, with_transcript: bool) -> tuple[dict | str, str | None]:
    """Probe one video (and parse its transcript): ``(info dict or skip reason, bad-transcript reason)``."""
    try:
        info = probe(mp4)
    except Exception as err:  # one bad file must never stop the scan
        return _reason(err, mp4), None
    if info.audio_sample_rate is None:
        return "no audio stream", None
    txt = mp4.with_suffix(".txt") if with_transcript else None
    bad_txt = None
    if txt and txt.is_file():
        try:
            read_transcript(txt)
        except Exception as err:
            bad_txt = f"bad transcript, row kept without it: {_reason(err, txt)}"
    return {
        "num_frames": info.num_frames,
        "fps": info.fps,
        "duration_s": info.duration_s,
        "audio_sample_rate": info.audio_sample_rate,
        "width": info.width,
        "height": info.height,
        "transcript": txt if txt and txt.is_file() and bad_txt is None else None,
    }, bad_txt


def _count(ratio: float, n: int, least_from: int = 3) -> int:
    k = round(ratio * n)
    return max(k, 1) if ratio > 0 and n >= least_from else k


def split_groups(
    keys: list[str], val_ratio: float, test_ratio: float, seed: int, test_least_from: int = 3
) -> dict[str, str]:
    """Assign each distinct key to a split: sort, shuffle with ``default_rng(seed)``, cut val, test, rest train.

    A positive ratio holds out at least one group from 3 groups on (the test split from ``test_least_from``).
    """
    for r in (val_ratio, test_ratio):
        if not 0 <= r < 1:
            raise ManifestError(f"split ratios must be in [0, 1), got val={val_ratio} test={test_ratio}")
    groups = sorted(set(keys))
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    n_val, n_test = _count(val_ratio, len(groups)), _count(test_ratio, len(groups), test_least_from)
    if n_val + n_test >= len(groups):
        raise ManifestError(
            f"val_ratio={val_ratio} and test_ratio={test_ratio} leave no training data "
            f"({len(groups)} groups: {n_val} val, {n_test} test)"
        )
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (len(groups) - n_val - n_test)
    return dict(zip(order, names))


def _rel(path: Path | str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def build_manifest(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str = "lrs3",
    layout: str = "lrs3",
    viseme_root: str | os.PathLike | None = None,
    val_ratio: float = 0.01,
    test_ratio: float = 0.01,
    seed: int = 123,
    split_by: str = "talk",
    workers: int = 1,
    log: Callable[[str], Any] = print,
) -> dict:
    """Probe every video under ``root``, split, write ``<name>_{train,val,test}.jsonl`` + ``<name>_meta.json``."""
    if layout not in LAYOUTS:
        raise ManifestError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if split_by not in SPLIT_BY:
        raise ManifestError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    root_abs = os.path.abspath(root)
    if not os.path.isdir(root_abs):
        raise ManifestNotFoundError(f"{root_abs}: corpus root does not exist or is not a directory")
    vis_abs = os.path.abspath(viseme_root) if viseme_root is not None else None
    entries, skipped = _scan(Path(root_abs), layout)
    if not entries:
        raise ManifestError(f"{root_abs}: no .mp4 files found for layout {layout!r}")
    mp4s, lrs3 = [p for _, _, p in entries], repeat(layout == "lrs3")
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_probe_entry, mp4s, lrs3, chunksize=max(1, len(mp4s) // (8 * workers))))
    else:
        results = list(map(_probe_entry, mp4s, lrs3))

    rows: list[dict] = []
    for (talk, utt, mp4), (info, bad_txt) in zip(entries, results):
        if bad_txt:
            skipped.append({"path": _rel(mp4.with_suffix(".txt"), root_abs), "reason": bad_txt})
        if isinstance(info, str):
            skipped.append({"path": _rel(mp4, root_abs), "reason": info})
            continue
        vis = os.path.join(vis_abs, talk, f"{utt}.npy") if vis_abs else None
        txt = info.pop("transcript")
        rows.append(
            {
                "id": f"{talk}/{utt}",
                "talk_id": talk,
                "video_mp4": _rel(mp4, root_abs),
                "transcript": _rel(txt, root_abs) if txt else None,
                "viseme_npy": _rel(vis, root_abs) if vis and os.path.isfile(vis) else None,
                **info,
            }
        )
    for s in skipped:
        log(f"manifest: skipped {s['path']}: {s['reason']}")
    if not rows:
        raise ManifestError(f"{root_abs}: no usable video ({len(skipped)} files skipped, e.g. {skipped[0]})")

    key = "talk_id" if split_by == "talk" else "id"
    if split_by == "utterance_per_talk":  # held-out utterances of every talk (person): one test from 2 utterances
        assign = {}
        for talk in sorted({r["talk_id"] for r in rows}):
            assign |= split_groups([r["id"] for r in rows if r["talk_id"] == talk], val_ratio, test_ratio, seed, 2)
            if "test" not in (assign[r["id"]] for r in rows if r["talk_id"] == talk):
                log(f"manifest: talk {talk} has one utterance: it trains, none of it is held out")
    else:
        assign = split_groups([r[key] for r in rows], val_ratio, test_ratio, seed)
    out_dir = Path(out_dir)
    counts = {}
    for split in SPLITS:
        part = sorted((r for r in rows if assign[r[key]] == split), key=lambda r: r["id"])
        counts[split] = len(part)
        write_text(out_dir / f"{name}_{split}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in part))
    meta = {
        "name": name,
        "root": root_abs,
        "layout": layout,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "num_talks": len({r["talk_id"] for r in rows}),
        "skipped": skipped,
        "seed": seed,
        "val_ratio": val_ratio,
        "test_ratio": test_ratio,
        "split_by": split_by,
        "viseme_root": vis_abs,
    }
    write_json(out_dir / f"{name}_meta.json", meta)
    log(f"manifest {name}: {len(rows)} utterances {counts}, {len(skipped)} skipped -> {out_dir}")
    return meta


def meta_path(manifest: str | os.PathLike) -> Path:
    """The ``<name>_meta.json`` sidecar of ``<name>_{train,val,test}.jsonl``."""
    manifest = Path(manifest)
    name, _, split = manifest.stem.rpartition("_")
    if not name or split not in SPLITS:
        raise ManifestError(f"{manifest}: manifest name must end in _train, _val or _test")
    return manifest.with_name(f"{name}_meta.json")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Load a manifest's rows with ``video_mp4``, ``transcript``, ``viseme_npy`` made absolute against its root."""
    path = Path(path)
    meta_file = meta_path(path)
    if not meta_file.is_file():
        raise ManifestNotFoundError(f"{path}: sidecar {meta_file} not found")
    try:
        root = Path(json.loads(meta_file.read_text(encoding="utf-8"))["root"])
    except (ValueError, KeyError, TypeError) as err:  # ValueError: not JSON or not UTF-8
        raise ManifestError(f"{meta_file}: not a manifest meta file ({' '.join(repr(err).split())})") from err
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ManifestError(f"{path}:{n}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{n}: malformed JSON ({err.msg})") from err
        missing = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else list(ROW_KEYS)
        if missing:
            raise ManifestError(f"{path}:{n}: row lacks keys {missing}")
        for k in PATH_KEYS:
            if row[k] is None and k != "video_mp4":
                continue
            if not isinstance(row[k], str):
                raise ManifestError(f"{path}:{n}: {k} must be a path string, got {row[k]!r}")
            row[k] = os.path.normpath(root / row[k])
        for k in ("video_mp4", "transcript"):
            if row[k] is not None and not Path(row[k]).is_relative_to(root):
                raise ManifestError(f"{path}:{n}: {k} {row[k]} lies outside the manifest root {root}")
        rows.append(row)
    return rows
