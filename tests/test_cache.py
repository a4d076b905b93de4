"""Decoded cache: contents, reuse, invalidation, atomic builds, viseme fallbacks, bad files, latents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from temposyncdiff.data import cache as cache_mod
from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.cache import (
    META_NAME,
    CacheError,
    add_latents,
    build_cache,
    cache_key,
    encoder_id,
    open_cache,
    resize_frames,
)
from temposyncdiff.data.video import probe, read_frames
from temposyncdiff.data.visemes import SILENCE

AUDIO = AudioFeatures()


def corpus_rows(root: Path) -> list[dict]:
    """Manifest-like rows (absolute paths) for every utterance of a synthetic corpus, ground-truth visemes included."""
    rows = []
    for mp4 in sorted(root.glob("*/*.mp4")):
        info = probe(mp4)
        rows.append(
            {
                "id": f"{mp4.parent.name}/{mp4.stem}",
                "talk_id": mp4.parent.name,
                "video_mp4": str(mp4),
                "transcript": str(mp4.with_suffix(".txt")),
                "viseme_npy": str(mp4.with_suffix(".visemes.npy")),
                "num_frames": info.num_frames,
                "fps": info.fps,
            }
        )
    return rows


@pytest.fixture
def corpus(synth_corpus: Path, tmp_path: Path) -> Path:
    """A private copy of the session corpus, free to modify."""
    return Path(shutil.copytree(synth_corpus, tmp_path / "corpus"))


def _build(rows: list[dict], out: Path, size: int = 64, **kw) -> list[str]:
    logs: list[str] = []
    build_cache(rows, out, size, AUDIO, log=logs.append, **kw)
    return logs


def test_contents_match_sources(synth_corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(synth_corpus)
    _build(rows, tmp_path / "c", size=32)
    r = open_cache(tmp_path / "c", cache_key(rows, 32, AUDIO, 25.0))
    assert r.ids == [row["id"] for row in rows] and len(r) == 9
    assert r.frames.dtype == np.uint8 and r.frames.shape == (int(r.num_frames.sum()), 3, 32, 32)
    assert r.mel.dtype == np.float16 and r.mel.shape == (int(r.mel_lens.sum()), 80)
    assert np.array_equal(r.offsets[1:], np.cumsum(r.num_frames)[:-1])
    assert np.array_equal(r.mel_offsets[1:], np.cumsum(r.mel_lens)[:-1])
    assert np.array_equal(r.mel_lens, r.num_frames * 640 // 160 + 1)  # 640 samples per frame, centred STFT
    truth = np.concatenate([np.load(row["viseme_npy"]) for row in rows])
    assert r.visemes.dtype == np.int64 and np.array_equal(r.visemes, truth)
    video, _ = read_frames(rows[4]["video_mp4"], 25.0)
    assert np.array_equal(r.frames[r.offsets[4] : r.offsets[4] + r.num_frames[4]], resize_frames(video, 32))
    assert r.latents is None and r.meta["skipped"] == []


def test_reuse_and_invalidation(corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(corpus)[:2]
    out = tmp_path / "c"
    assert "building" in _build(rows, out)[0]
    stamp = (out / "frames.npy").stat().st_mtime_ns
    assert "reusing" in _build(rows, out)[0]
    assert (out / "frames.npy").stat().st_mtime_ns == stamp
    assert "building" in _build(rows, out, size=32)[0]  # image size changed
    assert open_cache(out).frames.shape[2:] == (32, 32)
    assert "reusing" in _build(rows, out, size=32)[0]
    mp4 = Path(rows[1]["video_mp4"])
    os.utime(mp4, ns=(mp4.stat().st_atime_ns, mp4.stat().st_mtime_ns + 10**9))  # the video changed
    assert "building" in _build(rows, out, size=32)[0]
    np.save(rows[0]["viseme_npy"], np.load(rows[0]["viseme_npy"])[::-1].copy())  # the visemes changed
    assert "building" in _build(rows, out, size=32)[0]
    assert np.array_equal(open_cache(out).visemes[: rows[0]["num_frames"]], np.load(rows[0]["viseme_npy"]))
    with pytest.raises(CacheError, match="stale"):
        open_cache(out, cache_key(rows, 64, AUDIO, 25.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.")] == []


def test_interrupted_build_keeps_old_cache(synth_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    rows = corpus_rows(synth_corpus)[:3]
    out = tmp_path / "c"
    _build(rows, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = cache_mod.decode_utterance, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-build
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "decode_utterance", failing)
    with pytest.raises(KeyboardInterrupt):
        _build(rows, out, size=32)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old cache intact
    assert open_cache(out, cache_key(rows, 64, AUDIO, 25.0)).frames.shape[2:] == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no partial sibling left behind
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _build(rows, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(CacheError, match="no complete cache"):
        open_cache(tmp_path / "fresh")


def test_leftover_of_killed_build_is_removed(synth_corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(synth_corpus)[:1]
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that no longer runs
    leftover = tmp_path / f".c.tmp-{os.uname().nodename}-{proc.pid}-abc"
    leftover.mkdir()
    (leftover / "frames.npy").write_bytes(b"half")
    _build(rows, tmp_path / "c")
    assert not leftover.exists() and (tmp_path / "c" / META_NAME).is_file()


def test_bad_utterances_are_skipped(corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(corpus)[:2]
    bad = corpus / "spk000" / "99999.mp4"
    bad.write_bytes(b"not a video" * 100)
    rows += [
        {**rows[0], "id": "spk000/99999", "video_mp4": str(bad)},
        {**rows[0], "id": "spk000/missing", "video_mp4": str(corpus / "nope.mp4")},
    ]
    logs = _build(rows, tmp_path / "c")
    r = open_cache(tmp_path / "c")
    assert r.ids == [rows[0]["id"], rows[1]["id"]]
    assert [s["id"] for s in r.meta["skipped"]] == ["spk000/99999", "spk000/missing"]
    assert "file not found" in r.meta["skipped"][1]["reason"]
    assert sum("skipped spk000/" in line for line in logs) == 2
    with pytest.raises(CacheError, match="no utterance"):
        _build(rows[2:], tmp_path / "d")


def test_viseme_fallbacks(corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(corpus)[:3]
    np.save(corpus / "short.npy", np.zeros(5, np.int64))
    np.save(corpus / "float.npy", np.ones(rows[2]["num_frames"], np.float32))
    rows[0]["viseme_npy"] = None
    rows[1]["viseme_npy"] = str(corpus / "short.npy")
    rows[2]["viseme_npy"] = str(corpus / "float.npy")
    with pytest.warns(UserWarning, match="bad viseme file") as caught:
        logs = _build(rows, tmp_path / "c")
    messages = [str(w.message) for w in caught]
    assert any("short.npy" in m and "5 ids for" in m for m in messages)
    assert any("float.npy" in m and "integer" in m for m in messages)
    r = open_cache(tmp_path / "c")
    assert (r.visemes == SILENCE).all() and any("3 of 3 utterances" in line for line in logs)
    assert [u["visemes"] for u in json.loads((tmp_path / "c" / "index.json").read_text())] == ["silence"] * 3


def test_add_latents(synth_corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(synth_corpus)[:2]
    _build(rows, tmp_path / "c")
    logs: list[str] = []

    def pool(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8)

    add_latents(tmp_path / "c", pool, batch_size=50, log=logs.append)
    r = open_cache(tmp_path / "c")
    frames = torch.from_numpy(np.array(r.frames)).float() / 127.5 - 1
    assert r.latents.dtype == np.float16 and r.latents.shape == (len(frames), 3, 8, 8)
    assert np.allclose(r.latents, pool(frames).numpy(), atol=1e-3)
    assert r.meta["latents"] == {
        "encoder": encoder_id(pool),
        "shape": [len(frames), 3, 8, 8],
        "dtype": "float16",
        "mirror": False,
    }
    add_latents(tmp_path / "c", pool, log=logs.append)
    assert "already" in logs[-1]
    conv = torch.nn.Conv2d(3, 4, 8, stride=8)
    add_latents(tmp_path / "c", conv, batch_size=64, log=logs.append)
    assert open_cache(tmp_path / "c").latents.shape == (len(frames), 4, 8, 8)
    first = encoder_id(conv)
    with torch.no_grad():
        conv.weight.add_(1.0)
    assert encoder_id(conv) != first and first.startswith("Conv2d:")
    assert "reusing" in _build(rows, tmp_path / "c")[0]  # latents do not change the cache key
