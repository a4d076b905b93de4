"""Manifest building: probing, bad-file skipping, deterministic splits, path resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from temposyncdiff.data.manifest import ROW_KEYS, build_manifest, meta_path, read_manifest
from temposyncdiff.data.video import write_video
from temposyncdiff.errors import UserError

SPLITS = ("train", "val", "test")


def _quiet(_msg: str) -> None:
    pass


def _build(root: Path, out: Path, **kw) -> dict:
    return build_manifest(root, out, log=_quiet, **kw)


def _rows(out: Path, name: str = "lrs3") -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / f"{name}_{s}.jsonl").read_text().splitlines()] for s in SPLITS}


@pytest.fixture
def corpus(synth_corpus: Path, tmp_path: Path) -> Path:
    """A private copy of the session corpus, free to add bad files to."""
    return Path(shutil.copytree(synth_corpus, tmp_path / "corpus"))


def test_rows_and_determinism_across_workers(synth_corpus: Path, tmp_path: Path) -> None:
    meta = _build(synth_corpus, tmp_path / "a")
    _build(synth_corpus, tmp_path / "b", workers=2)
    for s in SPLITS:
        assert (tmp_path / "a" / f"lrs3_{s}.jsonl").read_bytes() == (tmp_path / "b" / f"lrs3_{s}.jsonl").read_bytes()
    rows = _rows(tmp_path / "a")
    all_rows = [r for s in SPLITS for r in rows[s]]
    assert len(all_rows) == 9 and sum(meta["counts"].values()) == 9 and meta["skipped"] == []
    for r in all_rows:
        assert set(r) == set(ROW_KEYS)
        assert r["id"] == f"{r['talk_id']}/{Path(r['video_mp4']).stem}"
        assert r["video_mp4"] == f"{r['id']}.mp4" and r["transcript"] == f"{r['id']}.txt"
        assert r["viseme_npy"] is None
        assert r["num_frames"] > 0 and r["fps"] == 25.0 and r["audio_sample_rate"] == 16000
        assert (r["width"], r["height"]) == (64, 64) and r["duration_s"] == pytest.approx(
            r["num_frames"] / 25, abs=0.05
        )
    for s in SPLITS:
        assert [r["id"] for r in rows[s]] == sorted(r["id"] for r in rows[s])
    on_disk = json.loads((tmp_path / "a" / "lrs3_meta.json").read_text())
    assert on_disk == meta and Path(meta["root"]).is_absolute() and meta["seed"] == 123


def test_split_by_talk_is_speaker_disjoint(synth_corpus: Path, tmp_path: Path) -> None:
    meta = _build(synth_corpus, tmp_path)
    talks = {s: {r["talk_id"] for r in rows} for s, rows in _rows(tmp_path).items()}
    assert all(len(t) == 1 for t in talks.values())  # 3 talks, ratio 0.01 -> at least one each
    assert len(talks["train"] | talks["val"] | talks["test"]) == 3
    assert meta["counts"] == {"train": 3, "val": 3, "test": 3}
    other = _build(synth_corpus, tmp_path / "other_seed", seed=5, val_ratio=0.0, test_ratio=0.0)
    assert other["counts"] == {"train": 9, "val": 0, "test": 0}


def test_split_by_utterance(synth_corpus: Path, tmp_path: Path) -> None:
    meta = _build(synth_corpus, tmp_path, split_by="utterance", val_ratio=0.2, test_ratio=0.2)
    assert meta["counts"] == {"train": 5, "val": 2, "test": 2} and meta["split_by"] == "utterance"
    ids = [r["id"] for rows in _rows(tmp_path).values() for r in rows]
    assert len(ids) == len(set(ids)) == 9


def test_split_by_utterance_per_talk_holds_out_every_talk(corpus: Path, tmp_path: Path) -> None:
    talks = sorted(d.name for d in corpus.iterdir() if d.is_dir())
    for k, talk in enumerate(talks[1:], 1):  # talks of 3, 2 and 1 utterances
        for mp4 in sorted((corpus / talk).glob("*.mp4"))[3 - k :]:
            mp4.unlink()
    said: list[str] = []
    meta = build_manifest(
        corpus, tmp_path, split_by="utterance_per_talk", val_ratio=0.15, test_ratio=0.15, log=said.append
    )
    rows = _rows(tmp_path)
    per_talk = {t: {s: sum(r["talk_id"] == t for r in rows[s]) for s in SPLITS} for t in talks}
    assert per_talk == {
        talks[0]: {"train": 1, "val": 1, "test": 1},
        talks[1]: {"train": 1, "val": 0, "test": 1},
        talks[2]: {"train": 1, "val": 0, "test": 0},
    }
    assert meta["split_by"] == "utterance_per_talk"
    assert any(f"talk {talks[2]} has one utterance" in line for line in said)
    single = _build(corpus, tmp_path / "one", split_by="utterance", val_ratio=0.15, test_ratio=0.15)
    assert single["counts"]["test"] == 1  # the global split gives 6 utterances one test utterance, from one talk


def test_ratios_that_leave_no_train_raise(synth_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training data"):
        _build(synth_corpus, tmp_path, val_ratio=0.5, test_ratio=0.5)
    with pytest.raises(ValueError, match="ratios"):
        _build(synth_corpus, tmp_path, val_ratio=1.5)


def test_viseme_paths_found_or_null(synth_corpus: Path, tmp_path: Path) -> None:
    vis = tmp_path / "visemes"
    (vis / "spk000").mkdir(parents=True)
    np.save(vis / "spk000" / "00001.npy", np.zeros(10, dtype=np.int64))
    out = tmp_path / "manifests"
    meta = _build(synth_corpus, out, viseme_root=vis)
    assert meta["viseme_root"] == str(vis)
    rows = {r["id"]: r for rows in _rows(out).values() for r in rows}
    assert rows["spk000/00001"]["viseme_npy"].startswith("..")
    assert [i for i, r in rows.items() if r["viseme_npy"]] == ["spk000/00001"]
    resolved = {r["id"]: r for s in SPLITS for r in read_manifest(out / f"lrs3_{s}.jsonl")}
    assert resolved["spk000/00001"]["viseme_npy"] == str(vis / "spk000" / "00001.npy")


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _write_zero_frames(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        out.add_stream("aac", rate=16000, layout="mono")
        out.start_encoding()


def test_bad_files_are_skipped_with_reasons(corpus: Path, tmp_path: Path) -> None:
    good = (corpus / "spk000" / "00001.mp4").read_bytes()
    bad = corpus / "spk999"
    bad.mkdir()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (bad / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "dir.mp4").mkdir()
    (bad / "notes.md").write_text("not a video")
    write_video(bad / "noaudio.mp4", [np.zeros((64, 64, 3), np.uint8)] * 5)
    _write_audio_only(bad / "audioonly.mp4")
    _write_zero_frames(bad / "zeroframes.mp4")
    (corpus / "spk001" / "00001.txt").write_text("garbage without a text line\n")
    logged: list[str] = []
    meta = build_manifest(corpus, tmp_path / "m", log=logged.append)
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    names = ("truncated", "random", "empty", "dir", "noaudio", "audioonly", "zeroframes")
    assert set(reasons) == {f"spk999/{n}.mp4" for n in names} | {"spk001/00001.txt"}
    assert reasons["spk999/noaudio.mp4"] == "no audio stream"
    assert reasons["spk999/empty.mp4"] == "empty file"
    assert reasons["spk999/audioonly.mp4"] == "no video stream"
    assert "Text:" in reasons["spk001/00001.txt"]
    assert all(r and "\n" not in r for r in reasons.values())
    assert sum(meta["counts"].values()) == 9 and len(logged) == len(reasons) + 1
    rows = {r["id"]: r for rows in _rows(tmp_path / "m").values() for r in rows}
    assert rows["spk001/00001"]["transcript"] is None and rows["spk001/00002"]["transcript"]


def test_hdtf_layout(synth_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "hdtf"
    root.mkdir()
    src = sorted(synth_corpus.glob("spk000/*.mp4"))
    for dst, s in zip(("WDA_BarackObama_000", "WDA_BarackObama_001", "RD_Radio1_000", "noclip"), src + src):
        shutil.copy(s, root / f"{dst}.mp4")
        shutil.copy(s.with_suffix(".txt"), root / f"{dst}.txt")
    meta = _build(root, tmp_path / "m", name="hdtf", layout="hdtf", val_ratio=0.0, test_ratio=0.0)
    rows = _rows(tmp_path / "m", "hdtf")["train"]
    assert [r["id"] for r in rows] == ["RD_Radio1/000", "WDA_BarackObama/000", "WDA_BarackObama/001"]
    assert rows[1]["talk_id"] == "WDA_BarackObama" and rows[1]["video_mp4"] == "WDA_BarackObama_000.mp4"
    assert all(r["transcript"] is None for r in rows)
    assert [s["path"] for s in meta["skipped"]] == ["noclip.mp4"] and meta["layout"] == "hdtf"


def test_read_manifest_resolves_and_rejects(synth_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    _build(synth_corpus, out, name="syn")
    train = out / "syn_train.jsonl"
    assert meta_path(train) == out / "syn_meta.json"
    rows = read_manifest(train)
    assert len(rows) == 3
    for r in rows:
        assert Path(r["video_mp4"]).is_file() and Path(r["transcript"]).is_file()
        assert Path(r["video_mp4"]).is_relative_to(synth_corpus)

    lines = train.read_text().splitlines()
    evil = json.loads(lines[1])
    evil["video_mp4"] = "../../etc/passwd"
    bad = out / "syn_val.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(evil)]) + "\n")
    with pytest.raises(ValueError, match=r"syn_val\.jsonl:2: video_mp4 .*outside"):
        read_manifest(bad)
    bad.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"syn_val\.jsonl:2: malformed JSON"):
        read_manifest(bad)
    bad.write_text('{"id": "a/b"}\n')
    with pytest.raises(ValueError, match=r"syn_val\.jsonl:1: row lacks keys"):
        read_manifest(bad)
    with pytest.raises(ValueError, match="_train, _val or _test"):
        read_manifest(shutil.copy(train, out / "syn.jsonl"))


def test_missing_or_empty_root_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)) as err:
        _build(missing, tmp_path / "m")
    assert isinstance(err.value, UserError)  # the CLIs print it as one line
    empty = tmp_path / "empty"
    (empty / "spk000").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .mp4 files"):
        _build(empty, tmp_path / "m")
    (empty / "spk000" / "x.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable video"):
        _build(empty, tmp_path / "m")
