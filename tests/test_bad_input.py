"""Bad input to every CLI and every file type the project reads: exit status 2 (130 for Ctrl-C), exactly one
``error:`` line on stderr (its last line) naming the file or key, no traceback, nothing created, changed or deleted
outside the run's own log folder, and no booby-trapped weights file ever unpickled.

The CLIs run in this process (as their console scripts do, ~1 s each) in one project root per module; only the
Ctrl-C case starts a real process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import wave
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from temposyncdiff.cli import bench, data, eval, export, infer, pipeline, train
from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.cache import build_cache
from temposyncdiff.data.manifest import build_manifest, read_manifest
from temposyncdiff.data.transcript_visemes import write_viseme_files
from temposyncdiff.data.video import read_frames, write_video
from temposyncdiff.metrics.image import lpips_backbone_file
from temposyncdiff.nets.syncnet import SyncNet, export_expert
from tests.helpers.nets import save_tiny_exports

BIN = Path(sys.executable).parent
MAINS = {
    "tsd-infer": infer.main,
    "tsd-train": train.main,
    "tsd-data": data.main,
    "tsd-eval": eval.main,
    "tsd-bench": bench.main,
    "tsd-export": export.main,
    "tsd-pipeline": pipeline.main,
}
LIGHTNING = {"state_dict": {}, "global_step": 0, "epoch": 0, "pytorch-lightning_version": "2.6.0", "stage": "vae"}
SMALL = 1 << 20  # files up to this size are compared by content, larger ones by size and mtime


class Trap:
    """Unpickling this creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- the project root: a tiny corpus, exports, good inputs and one bad file of each kind ----------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (a decompression bomb by its header) with one empty IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _float_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """A 32-bit float WAV (format 3), which can carry NaN."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def _transcript(path: Path, words: list[str], text: str = "Text:  HELLO WORLD") -> None:
    path.write_text("\n".join([text, "Conf:  5", "", "WORD START END ASDSCORE", *words]) + "\n")


def _exports(out: Path, marker: Path) -> None:
    """Tiny random exports as the stages write them (32 px), and weights files that are wrong in every way."""
    good = out / "checkpoints"
    save_tiny_exports(good, ("teacher", "student"))
    export_expert(SyncNet(image_size=32, dim=16, width=8), good / "syncnet.pt")

    bad = out / "bad"
    export = torch.load(good / "vae_pretrained.pt", weights_only=True)
    torch.save(export | {"state_dict": {"encoder.weight": Trap(marker)}}, bad / "trap_vae.pt")
    teacher = torch.load(good / "teacher_best.pt", weights_only=True)
    torch.save(teacher | {"state_dict": {"w": Trap(marker)}}, bad / "trap_teacher.pt")
    torch.save({"format": "temposyncdiff.syncnet", "state_dict": {"w": Trap(marker)}}, bad / "trap_syncnet.pt")
    (bad / "pickle.pt").write_bytes(pickle.dumps(export | {"meta": Trap(marker)}))  # not a zip: never unpickled
    torch.save(teacher | {"target": "os.system"}, bad / "foreign_target.pt")
    torch.save(teacher | {"version": 99}, bad / "newer.pt")
    torch.save(teacher | {"config": {"bogus": 1}}, bad / "bad_config.pt")
    torch.save(teacher | {"target": "temposyncdiff.nets.vae.Nothing"}, bad / "missing_class.pt")
    torch.save(teacher | {"state_dict": {"w": torch.ones(3)}}, bad / "wrong_weights.pt")
    torch.save(teacher | {"meta": {}}, bad / "no_meta.pt")
    torch.save(LIGHTNING, bad / "lightning.ckpt")
    (bad / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (bad / "truncated.pt").write_bytes((good / "teacher_best.pt").read_bytes()[:3000])
    # Lightning checkpoints for ckpt_path=
    torch.save(LIGHTNING | {"callbacks": {"x": Trap(marker)}}, bad / "trap.ckpt")
    (bad / "pickle.ckpt").write_bytes(pickle.dumps(LIGHTNING | {"callbacks": Trap(marker)}))
    state = {"dirpath": str(out / "logs" / "run" / "checkpoints"), "best_model_path": str(bad / "trap.ckpt")}
    torch.save(LIGHTNING | {"callbacks": {"ModelCheckpoint{}": state}}, bad / "names_outside.ckpt")
    torch.save(LIGHTNING | {"stage": "teacher"}, bad / "teacher_stage.ckpt")
    # an LPIPS backbone, a pickle for Hydra's --experimental-rerun
    backbone = lpips_backbone_file(out / "bad" / "torch_home", "alex")
    backbone.parent.mkdir(parents=True)
    torch.save({"features.0.weight": Trap(marker)}, backbone)
    (bad / "rerun.pickle").write_bytes(pickle.dumps(Trap(marker)))


def _onnx_dirs(bad: Path, good: Path) -> None:
    """ONNX export folders for runtime=onnx: incomplete, unreadable sidecar, stale, and graphs that are garbage."""
    from temposyncdiff.export.onnx import GRAPHS, SIDECAR
    from temposyncdiff.utils.io import file_sha256

    def folder(name: str, sidecar: str, graph: bytes) -> None:
        (bad / name).mkdir()
        (bad / name / SIDECAR).write_text(sidecar)
        for g in GRAPHS:
            (bad / name / f"{g}.onnx").write_bytes(graph)

    (bad / "onnx_incomplete").mkdir()
    (bad / "onnx_incomplete" / SIDECAR).write_text("{}")
    folder("onnx_bad_sidecar", "{not json", b"")
    sources = {"checkpoint": {"sha256": "0" * 64}, "vae": {"sha256": "0" * 64}}
    folder("onnx_stale", json.dumps(sources), b"")
    sources = {
        k: {"sha256": file_sha256(good / f)}
        for k, f in (("checkpoint", "teacher_best.pt"), ("vae", "vae_pretrained.pt"))
    }
    folder("onnx_garbage", json.dumps(sources | {"window": 4}), b"\x08\x07garbage" * 64)


def _media(root: Path, corpus: Path, marker: Path) -> None:
    """Good inputs (inputs/) and bad images, audio, video, transcripts and viseme files (bad/)."""
    rng = np.random.default_rng(0)
    inputs, bad = root / "inputs", root / "bad"
    mp4 = sorted(corpus.glob("*/*.mp4"))[0]
    frame = read_frames(mp4)[0][0]
    Image.fromarray(frame).save(inputs / "ref.png")
    _wav(inputs / "speech.wav", rng.normal(0, 0.1, 16000))

    png = (inputs / "ref.png").read_bytes()
    (bad / "random.png").write_bytes(rng.bytes(4096))
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "bomb.png").write_bytes(_png_header(30000, 30000))
    Image.new("RGB", (20, 40)).save(bad / "tiny.png")
    (bad / "random.mp4").write_bytes(rng.bytes(8192))
    (bad / "truncated.mp4").write_bytes(mp4.read_bytes()[:1500])
    write_video(bad / "video_only.mp4", [frame] * 10, 25.0)
    (bad / "unknown_codec.mp4").write_bytes(mp4.read_bytes().replace(b"avc1", b"zzzz"))  # a codec PyAV does not know
    (bad / "random.wav").write_bytes(b"RIFF" + rng.bytes(4096))
    _wav(bad / "empty.wav", np.zeros(0))
    _wav(bad / "short.wav", rng.normal(0, 0.1, 1600))
    _float_wav(bad / "nan.wav", np.full(16000, np.nan))
    _transcript(bad / "no_text.txt", ["HELLO 0.10 0.40 7.0"], text="")
    _transcript(bad / "bad_word.txt", ["HELLO zero 0.40 7.0"])
    _transcript(bad / "backwards.txt", ["HELLO 0.40 0.10 7.0"])
    _transcript(bad / "no_words.txt", [])
    np.save(bad / "object.npy", np.array([Trap(marker), 1], dtype=object), allow_pickle=True)
    np.save(bad / "matrix.npy", np.zeros((25, 2), dtype=np.int64))
    np.save(bad / "float.npy", np.zeros(25, dtype=np.float32))
    np.save(bad / "range.npy", np.full(25, 99, dtype=np.int64))
    np.savez(bad / "archive.npz", ids=np.zeros(25, dtype=np.int64))
    (bad / "random.npy").write_bytes(rng.bytes(1024))


def _data(root: Path, corpus: Path, marker: Path) -> None:
    """Manifests of the corpus (data/manifests), their cache, and bad manifests, caches and shard sets."""
    quiet = {"log": lambda *_: None}
    visemes = root / "data" / "visemes" / "synth"
    write_viseme_files(corpus, visemes, **quiet)
    build_manifest(
        corpus,
        root / "data" / "manifests",
        name="synth",
        viseme_root=visemes,
        val_ratio=0.34,
        test_ratio=0.0,
        seed=0,
        **quiet,
    )
    rows = {s: read_manifest(root / "data" / "manifests" / f"synth_{s}.jsonl") for s in ("train", "val")}
    for split, r in rows.items():
        build_cache(r, root / "data" / "cache" / f"synth_{split}", 64, AudioFeatures(), **quiet)

    bad = root / "bad"
    meta = json.loads((root / "data" / "manifests" / "synth_meta.json").read_text())
    lines = (root / "data" / "manifests" / "synth_train.jsonl").read_text().splitlines()
    for name, text in [
        ("outside", lines[0].replace('"video_mp4": "', '"video_mp4": "../../')),
        ("malformed", lines[0][:40]),
        ("keys", '{"id": "a/b"}'),
        ("types", json.dumps(json.loads(lines[0]) | {"video_mp4": 5})),
    ]:
        folder = bad / f"manifests_{name}"
        folder.mkdir()
        (folder / "synth_meta.json").write_text(json.dumps(meta))
        for split in ("train", "val"):
            (folder / f"synth_{split}.jsonl").write_text(text + "\n")
    (bad / "manifests_no_meta").mkdir()
    shutil.copy(root / "data" / "manifests" / "synth_train.jsonl", bad / "manifests_no_meta")

    # a cache whose frames are a pickled object array (the key matches, so it would be read)
    shutil.copytree(root / "data" / "cache", bad / "cache_object")
    np.save(bad / "cache_object" / "synth_train" / "frames.npy", np.array([Trap(marker)], dtype=object))
    shutil.copytree(root / "data" / "cache", bad / "cache_bad_meta")
    (bad / "cache_bad_meta" / "synth_train" / "cache_meta.json").write_text("{not json")
    shutil.copytree(root / "data" / "cache", bad / "cache_truncated")
    frames = bad / "cache_truncated" / "synth_train" / "frames.npy"
    frames.write_bytes(frames.read_bytes()[:200])

    # corpora: no videos, only unreadable ones; a synth folder with an unreadable synth_meta.json, and one whose
    # corpus (of other settings) shares the folder with a file tsd-data synth did not write
    (bad / "no_videos").mkdir()
    (bad / "corrupt_corpus" / "talk").mkdir(parents=True)
    (bad / "corrupt_corpus" / "talk" / "00001.mp4").write_bytes(b"\0" * 100)
    (bad / "synth_corrupt_meta").mkdir()
    (bad / "synth_corrupt_meta" / "synth_meta.json").write_text("{not json")
    (bad / "synth_foreign" / "spk000").mkdir(parents=True)
    (bad / "synth_foreign" / "synth_meta.json").write_text(json.dumps({"settings": {"identities": 99}}))
    (bad / "synth_foreign" / "spk000" / "00001.txt").write_text("Text:  HELLO\n")
    (bad / "synth_foreign" / "notes.txt").write_text("the user's own notes")


def _shards(bad: Path, marker: Path) -> None:
    """A LitData shard set whose index names the pickle serializer, with a trap in its one item."""
    from litdata.streaming.writer import BinaryWriter

    from temposyncdiff.data.shards import SHARD_META, SHARDS_VERSION

    root = bad / "shards" / "synth_train"
    for sub in ("clips", "utterances"):
        writer = BinaryWriter(str(root / sub), chunk_bytes="1MB")
        writer[0] = Trap(marker)
        writer.done()
        writer.merge()
    settings = {"image_size": 64, "fps": 25.0, "audio": AudioFeatures().__dict__, "clip_len": 1, "stride": 1}
    meta = {"version": SHARDS_VERSION, **settings, "utterances": {"ids": ["a"], "talk_ids": ["a"], "num_frames": [8]}}
    (root / SHARD_META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_corpus) -> Path:
    """A project root: data/ (corpus, visemes, manifests, cache), checkpoints/, inputs/ and bad/."""
    base = tmp_path_factory.mktemp("bad_input")
    root, marker = base / "project", base / "pwned"
    for folder in ("inputs", "bad", "checkpoints"):
        (root / folder).mkdir(parents=True)
    corpus = root / "data" / "lrs3"
    shutil.copytree(synth_corpus, corpus)
    _exports(root, marker)
    _onnx_dirs(root / "bad", root / "checkpoints")
    _media(root, corpus, marker)
    _data(root, corpus, marker)
    if importlib.util.find_spec("litdata"):
        _shards(root / "bad", marker)
    return root


# ---- running a CLI in this process, and what it may touch -----------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """path -> ("dir",) or (size, mtime, sha256 of a small file) for everything under ``root``."""
    out: dict[str, tuple] = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel + "/"
        out[rel] = ("dir",)
        for name in files:
            path = Path(folder, name)
            st = path.lstat()
            small = st.st_size <= SMALL and not path.is_symlink()
            out[rel + name] = (st.st_size, st.st_mtime_ns, small and hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def outside_run_dir(before: dict[str, tuple], after: dict[str, tuple]) -> tuple[list[str], str | None]:
    """What changed outside the one Hydra run folder (``logs/<task>/runs/<time>/``) the command made, and that folder."""
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    runs = [k for k in changed if re.fullmatch(r"logs/[^/]+/runs/[^/]+/", k) and k not in before]
    if len(runs) != 1:
        return changed, None
    run = runs[0]
    made_for_it = {"logs/", run.split("runs/")[0], run.split("runs/")[0] + "runs/"} - before.keys()
    return [k for k in changed if not k.startswith(run) and k not in made_for_it], run


@dataclass
class Result:
    code: int | None
    out: str
    err: str


def run_cli(monkeypatch, capfd, root: Path, argv: list[str]) -> Result:
    """Run a console script's ``main()`` in this process in ``root``: its exit status, stdout and stderr."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("TSD_ROOT", raising=False)
    monkeypatch.setattr(sys, "argv", argv)
    capfd.readouterr()
    threads = torch.get_num_threads()
    try:
        MAINS[argv[0]]()
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:  # what a run sets for its process: torch threads, the logging Hydra configured for it
        torch.set_num_threads(threads)
        logging.getLogger().handlers.clear()
    out, err = capfd.readouterr()
    return Result(code, out, err)


# ---- the table ------------------------------------------------------------------------------------------------------
QUIET = "extras.print_config=false"  # added to every command
BASES = {  # the command a case adds its settings to
    "INFER": "tsd-infer ref_image=inputs/ref.png audio=inputs/speech.wav stage=teacher detector=center threads=1",
    "VIDEO": "tsd-infer video=bad/video_only.mp4 audio=inputs/speech.wav stage=teacher threads=1",
    "TRAIN": "tsd-train experiment=quickstart/vae",
    "EVAL": "tsd-eval split=val max_utterances=1 eval=generation eval.generation.max_frames=8 threads=1",
    "EXPORT": "tsd-export stage=teacher out_dir=outputs/onnx threads=1",
    "BENCH": "tsd-bench bench=latency_cpu",
}


@dataclass(frozen=True)
class Case:
    """``cmd`` (BASES expanded) run in the project root exits with 2 and one ``error:`` line containing ``says``."""

    cmd: str
    says: str
    defect: str = ""  # a known defect: the case is an xfail(strict) with this reason
    needs: str = ""  # an optional package the command needs (skipped without it)

    @property
    def marks(self) -> list[pytest.MarkDecorator]:
        marks = [pytest.mark.xfail(strict=True, reason=self.defect)] if self.defect else []
        if self.needs and importlib.util.find_spec(self.needs) is None:
            marks.append(pytest.mark.skip(reason=f"needs {self.needs}"))
        return marks

    @property
    def argv(self) -> list[str]:
        first, _, rest = self.cmd.partition(" ")
        return [*BASES.get(first, first).split(), *rest.split(), QUIET]


REFUSED = "refused by the weights-only loader (it names io.open"  # what a booby-trapped file gets
CLIS = (
    "tsd-infer",
    "tsd-train",
    *(f"tsd-data {c}" for c in data.COMMANDS),
    "tsd-eval",
    "tsd-bench",
    "tsd-export",
    "tsd-pipeline",
)

CASES = [
    # command-line settings: checked before Hydra runs, or by the task before it reads anything
    *(Case(f"{cli} nope.key=1", "error: bad command-line setting: Could not override 'nope.key'") for cli in CLIS),
    Case("tsd-data", "error: no command given; usage: tsd-data {synth|manifest|"),
    Case("tsd-data nope", "error: unknown command 'nope'; usage: tsd-data {synth|"),
    Case("tsd-train experiment=nope", "error: bad command-line setting: In 'train': Could not find 'experiment/nope'"),
    Case("tsd-pipeline experiment=nope", "error: bad command-line setting: In 'pipeline': Could not find 'pipeline/"),
    Case("tsd-eval eval=nope", "error: bad command-line setting: In 'eval': Could not find 'eval/nope'"),
    Case("tsd-bench bench=nope", "error: bad command-line setting: In 'bench': Could not find 'bench/nope'"),
    Case("tsd-eval --experimental-rerun bad/rerun.pickle", "error: --experimental-rerun is not supported"),
    Case("INFER fps=abc", "error: fps=abc: must be a number > 0"),
    Case("INFER steps=0", "error: steps=0: must be a whole number >= 1"),
    Case("INFER run_name=../x", "error: run_name='../x': not a plain name"),
    Case("INFER out_dir=inputs", "/inputs: not a sample folder written by tsd-infer"),
    Case("INFER out_dir=inputs/ref.png", "inputs/ref.png: exists and is not a folder"),
    Case("INFER ref_image=null", "error: ref_image=null: a path is required"),
    Case("INFER audio=null", "error: audio=null: a path is required"),
    Case("INFER checkpoint=null", "error: checkpoint=null: a path is required"),
    Case("tsd-train", "error: no stage chosen: pass experiment=<corpus>/<stage>"),
    Case("TRAIN ckpt_path=last", "error: ckpt_path=last: no earlier 'vae' run with a last.ckpt"),
    Case("TRAIN data.format=nope", "data.format='nope'"),
    Case("tsd-eval eval=denoise split=val lpips.net=nope", "error: lpips.net=nope: expected alex | vgg | squeeze"),
    Case("EVAL visemes=nope", "error: visemes=nope: expected audio | data"),
    Case("EXPORT tolerance=abc", "error: tolerance=abc: must be a number >= 0"),
    Case("BENCH task=nope", "error: task=nope: choose one of latency, data, prepare_memory"),
    Case("BENCH bench.runtimes=[nope]", "error: bench: unknown runtime ['nope']"),
    Case("tsd-pipeline only=[nope]", "error: unknown step 'nope'; this recipe has: synth, visemes"),
    Case("tsd-data synth identities=abc", "error: identities=abc: must be a whole number >= 1"),
    Case("tsd-data synth out=bad/synth_corrupt_meta", "bad/synth_corrupt_meta/synth_meta.json: unreadable ("),
    Case("tsd-data synth out=inputs/ref.png", "inputs/ref.png"),
    Case(
        "tsd-data synth out=bad/synth_foreign overwrite=true identities=1 utterances=1 image_size=32",
        "bad/synth_foreign: holds files tsd-data synth did not write (e.g. bad/synth_foreign/notes.txt)",
    ),
    Case("tsd-data manifest root=data/lrs3 val_ratio=2", "error: split ratios must be in [0, 1)"),
    Case("tsd-data manifest root=data/lrs3 layout=nope", "error: layout must be one of"),
    Case("tsd-data manifest root=data/lrs3 out_dir=inputs/ref.png", "inputs/ref.png"),
    Case("tsd-data prepare", "error: inputs required: pass inputs=..."),
    Case("tsd-data visemes root=data/lrs3 source=nope", "error: visemes: unknown source='nope'"),
    Case("tsd-data cache data.name=nope", "no manifest of data.name=nope"),
    # image
    Case("INFER ref_image=bad/missing.png", "error: bad/missing.png: file not found"),
    Case("INFER ref_image=bad/random.png", "error: bad/random.png: not an image"),
    Case("INFER ref_image=bad/empty.png", "error: bad/empty.png: not an image"),
    Case("INFER ref_image=bad/truncated.png", "error: bad/truncated.png: unreadable image"),
    Case("INFER ref_image=bad/bomb.png", "error: bad/bomb.png: image too large to decode safely"),
    Case("INFER ref_image=bad/tiny.png", "error: bad/tiny.png: the face would be 20 px across"),
    # audio and video
    Case("INFER ref_image=bad/random.mp4", "error: bad/random.mp4: unreadable media"),
    Case("INFER ref_image=bad/unknown_codec.mp4", "error: bad/unknown_codec.mp4: unsupported or corrupt video"),
    Case("INFER audio=bad/random.wav", "error: bad/random.wav: unreadable media"),
    Case("INFER audio=bad/empty.wav", "error: bad/empty.wav"),
    Case("INFER audio=bad/short.wav", "error: bad/short.wav: audio is 0.10 s long; at least 0.2 s is needed"),
    Case("INFER audio=bad/nan.wav", "error: bad/nan.wav: audio contains NaN or inf samples"),
    Case("INFER audio=bad/video_only.mp4", "error: bad/video_only.mp4: no audio stream"),
    Case("INFER audio=bad/truncated.mp4", "error: bad/truncated.mp4"),
    Case("INFER audio=bad", "error: bad: file not found"),
    # video mode (tsd-infer video=)
    Case("VIDEO", "error: bad/video_only.mp4: no face found (3 sampled frames checked)", needs="dlib"),
    Case("VIDEO video=bad/missing.mp4", "error: bad/missing.mp4: file not found"),
    Case("VIDEO video=bad/random.mp4", "error: bad/random.mp4: unreadable media"),
    Case("VIDEO video=bad/unknown_codec.mp4", "error: bad/unknown_codec.mp4: unsupported or corrupt video"),
    Case("VIDEO video=bad/truncated.mp4", "error: bad/truncated.mp4: "),
    Case("VIDEO video=inputs/speech.wav", "error: inputs/speech.wav: no video stream"),
    Case("VIDEO video=inputs/ref.png", "error: inputs/ref.png: a single image, not a video; animate a photo with"),
    Case("VIDEO ref_image=bad/video_only.mp4", "error: ref_image=bad/video_only.mp4 is the video itself; leave"),
    Case("VIDEO ref_image=bad/random.png", "error: bad/random.png: not an image"),
    Case("VIDEO detector=center", "error: detector=center: video mode tracks the face with dlib"),
    Case("VIDEO video_loop=nope", "error: video_loop=nope: choose pingpong | hold"),
    Case("VIDEO detect_every=0", "error: detect_every=0: must be a whole number >= 1"),
    Case("VIDEO feather=0.9", "error: feather=0.9: must be at most 0.5"),
    Case("INFER score_lips=true", "error: score_lips=true: it scores a re-voiced video against its source"),
    Case("tsd-data manifest root=bad/missing", "bad/missing: corpus root does not exist"),
    Case("tsd-data manifest root=bad/no_videos", "bad/no_videos: no .mp4 files found"),
    Case("tsd-data manifest root=bad/corrupt_corpus", "bad/corrupt_corpus: no usable video"),
    Case("tsd-data prepare inputs=bad/missing.mp4", "error: inputs=bad/missing.mp4: no such file or folder"),
    Case("tsd-data prepare inputs=bad/no_videos", "error: inputs=bad/no_videos: no video files"),
    Case(
        "tsd-data prepare inputs=bad/random.mp4 out=outputs/prepared",
        "nothing prepared: skipped 1 of 1 inputs: bad/random",
    ),
    # transcript
    Case("INFER transcript=bad/missing.txt", "error: bad/missing.txt: file not found"),
    Case("INFER transcript=bad/no_text.txt", "error: bad/no_text.txt: no 'Text:' line"),
    Case("INFER transcript=bad/bad_word.txt", "error: bad/bad_word.txt:5: bad word line"),
    Case("INFER transcript=bad/backwards.txt", "error: bad/backwards.txt:5: word ends before it starts"),
    Case("INFER transcript=bad/no_words.txt", "error: bad/no_words.txt: transcript has no word timings"),
    Case("tsd-data visemes root=bad/missing viseme_root=outputs/v", "error: bad/missing: corpus root does not exist"),
    Case("tsd-data visemes root=bad/no_videos viseme_root=outputs/v", "error: bad/no_videos: no utterances here"),
    # viseme file
    Case("INFER viseme_file=bad/object.npy", "error: bad/object.npy: not a .npy array"),
    Case("INFER viseme_file=bad/matrix.npy", "error: bad/matrix.npy: expected a 1-D integer array"),
    Case("INFER viseme_file=bad/float.npy", "error: bad/float.npy: expected a 1-D integer array"),
    Case("INFER viseme_file=bad/range.npy", "error: bad/range.npy: viseme ids must lie in 0..14"),
    Case("INFER viseme_file=bad/archive.npz", "error: bad/archive.npz: expected a 1-D integer array"),
    Case("INFER viseme_file=bad/random.npy", "error: bad/random.npy: not a .npy array"),
    # manifest
    Case("tsd-data cache data.manifest_dir=bad/manifests_outside", "synth_train.jsonl:1: video_mp4"),
    Case("tsd-data cache data.manifest_dir=bad/manifests_malformed", "synth_train.jsonl:1: malformed JSON"),
    Case("tsd-data cache data.manifest_dir=bad/manifests_keys", "synth_train.jsonl:1: row lacks keys"),
    Case("tsd-data cache data.manifest_dir=bad/manifests_types", "synth_train.jsonl:1: video_mp4"),
    Case("tsd-data cache data.manifest_dir=bad/manifests_no_meta", "synth_meta.json not found"),
    Case("TRAIN data.manifest_dir=bad/manifests_malformed", "synth_train.jsonl:1: malformed JSON"),
    Case("EVAL manifest=bad/manifests_malformed/synth_val.jsonl", "synth_val.jsonl:1: malformed JSON"),
    Case("EVAL manifest=bad/missing_val.jsonl", "bad/missing_val.jsonl"),
    Case("BENCH task=data data_bench.manifest=bad/manifests_outside/synth_train.jsonl", "outside the"),
    # cache folder
    Case("tsd-data shards data.cache_dir=bad/missing out=outputs/shards", "no complete cache here", needs="litdata"),
    Case(
        "tsd-data shards data.cache_dir=bad/cache_bad_meta out=outputs/shards",
        "no complete cache here",
        needs="litdata",
    ),
    Case(
        "tsd-data shards data.cache_dir=bad/cache_object out=outputs/shards workers=1",
        "frames.npy: unreadable cache array",
        needs="litdata",
    ),
    Case(
        "tsd-data shards data.cache_dir=bad/cache_truncated out=outputs/shards workers=1",
        "frames.npy: unreadable cache array",
        needs="litdata",
    ),
    Case("BENCH task=data data_bench.cache_dir=bad/cache_object/synth_train", "frames.npy: unreadable cache array"),
    # Lightning checkpoint
    Case("TRAIN ckpt_path=bad/missing.ckpt", "error: bad/missing.ckpt: checkpoint not found"),
    Case("TRAIN ckpt_path=bad/random.pt", "error: bad/random.pt: not a readable checkpoint"),
    Case("TRAIN ckpt_path=bad/trap.ckpt", f"error: bad/trap.ckpt: {REFUSED}"),
    Case("TRAIN ckpt_path=bad/pickle.ckpt", "error: bad/pickle.ckpt: not a readable checkpoint (not a PyTorch zip"),
    Case("TRAIN ckpt_path=bad/names_outside.ckpt", "error: bad/names_outside.ckpt: its ModelCheckpoint state names"),
    Case("TRAIN ckpt_path=bad/teacher_stage.ckpt", "a checkpoint of the 'teacher' stage, not of 'vae'"),
    Case("TRAIN ckpt_path=checkpoints/vae_pretrained.pt", "a weights-only export (temposyncdiff.vae), not a Lightning"),
    Case("INFER checkpoint=bad/lightning.ckpt", "error: bad/lightning.ckpt: not a TempoSyncDiff export"),
    # weights export
    Case("INFER checkpoint=bad/trap_teacher.pt", f"error: bad/trap_teacher.pt: {REFUSED}"),
    Case("INFER vae=bad/trap_vae.pt", f"error: bad/trap_vae.pt: {REFUSED}"),
    Case("INFER checkpoint=bad/pickle.pt", "error: bad/pickle.pt: not a readable weights file (not a PyTorch zip"),
    Case("INFER checkpoint=bad/random.pt", "error: bad/random.pt: not a readable weights file"),
    Case("INFER checkpoint=bad/truncated.pt", "error: bad/truncated.pt: not a readable weights file"),
    Case("INFER checkpoint=bad/missing.pt", "error: bad/missing.pt: weights file not found"),
    Case("INFER checkpoint=checkpoints/vae_pretrained.pt", "holds a 'temposyncdiff.vae' export, expected 'temposyn"),
    Case("INFER checkpoint=bad/foreign_target.pt", "error: bad/foreign_target.pt: refusing to build 'os.system'"),
    Case("INFER checkpoint=bad/newer.pt", "error: bad/newer.pt: format version 99 is newer than this code"),
    Case("INFER checkpoint=bad/bad_config.pt", "error: bad/bad_config.pt: Denoiser.__init__() got an unexpected"),
    Case("INFER checkpoint=bad/missing_class.pt", "error: bad/missing_class.pt: module 'temposyncdiff.nets.vae' has"),
    Case("INFER checkpoint=bad/wrong_weights.pt", "error: bad/wrong_weights.pt: weights do not fit"),
    Case("INFER checkpoint=bad/no_meta.pt", "error: bad/no_meta.pt: its meta holds no noise schedule"),
    Case("EVAL models.0.checkpoint=bad/trap_teacher.pt", f"error: bad/trap_teacher.pt: {REFUSED}"),
    Case("EVAL vae=bad/trap_vae.pt", f"error: bad/trap_vae.pt: {REFUSED}"),
    Case("EVAL eval.generation.syncnet=bad/trap_syncnet.pt", f"error: bad/trap_syncnet.pt: {REFUSED}"),
    Case("EVAL eval.generation.syncnet=checkpoints/vae_pretrained.pt", "expected 'temposyncdiff.syncnet'"),
    Case("EXPORT checkpoint=bad/trap_teacher.pt", f"error: bad/trap_teacher.pt: {REFUSED}"),
    Case("EXPORT vae=bad/trap_vae.pt", f"error: bad/trap_vae.pt: {REFUSED}"),
    Case("EXPORT checkpoint=bad/missing.pt", "bad/missing.pt"),
    Case(
        "BENCH bench.models.teacher.weights=bad/trap_teacher.pt",
        f"error: bad/trap_teacher.pt: {REFUSED}",
    ),
    Case("BENCH bench.vae.weights=bad/trap_vae.pt", f"error: bad/trap_vae.pt: {REFUSED}"),
    Case("tsd-data cache vae=bad/trap_vae.pt", f"error: bad/trap_vae.pt: {REFUSED}"),
    Case("tsd-data cache vae=bad/random.pt", "error: bad/random.pt: not a readable weights file"),
    Case("tsd-data cache vae=bad/random.pt data.cache_dir=outputs/cache", "bad/random.pt"),  # checked before a build
    # ONNX folder
    Case("INFER runtime=onnx onnx_dir=bad/missing", "bad/missing: no complete ONNX export", needs="onnxruntime"),
    Case(
        "INFER runtime=onnx onnx_dir=bad/onnx_incomplete",
        "bad/onnx_incomplete: no complete ONNX export",
        needs="onnxruntime",
    ),
    Case(
        "INFER runtime=onnx onnx_dir=bad/onnx_bad_sidecar",
        "bad/onnx_bad_sidecar/export.json: not a readable export sidecar",
        needs="onnxruntime",
    ),
    Case("INFER runtime=onnx onnx_dir=bad/onnx_stale", "bad/onnx_stale: stale ONNX export", needs="onnxruntime"),
    Case(
        "INFER runtime=onnx onnx_dir=bad/onnx_garbage",
        "bad/onnx_garbage/vae_encoder.onnx: not a loadable ONNX graph",
        needs="onnxruntime",
    ),
    # a LitData shard set whose index names the pickle serializer (its one item is a trap)
    Case("TRAIN data.format=litdata data.shard_dir=bad/shards", "clips/index.json: refusing", needs="litdata"),
]


@pytest.fixture
def marker(world: Path):
    """The file a trap creates when unpickled: it must never exist after a command."""
    path = world.parent / "pwned"
    yield path
    assert not path.exists(), "a booby-trapped file was unpickled"


def check(result: Result, world: Path, before: dict, says: str, code: int = 2, allowed: tuple[str, ...] = ()) -> None:
    """One ``error:`` line (the last on stderr; ``interrupted:`` for 130) containing ``says``, the exit status, no
    traceback, nothing touched outside the run's log folder (or ``allowed`` paths). What the command created is
    removed again."""
    after = snapshot(world)
    changed, run = outside_run_dir(before, {k: v for k, v in after.items() if not k.startswith(allowed)})
    for made in sorted(after.keys() - before.keys(), reverse=True):  # the next case starts from the same tree
        path = world / made
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    text = f"exit {result.code}\nstderr:\n{result.err[-3000:]}\nstdout:\n{result.out[-1500:]}"
    assert "Traceback" not in result.out + result.err, text
    lines = result.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("interrupted:" if code == 130 else "error:")]
    assert result.code == code and len(errors) == 1 and lines[-1] == errors[0], text
    assert says in errors[0], text
    assert not changed, f"changed outside the run folder: {changed}\n{text}"


@pytest.mark.parametrize(
    "c",
    [pytest.param(c, marks=c.marks, id=c.cmd) for c in CASES],
)
def test_bad_input(c: Case, world: Path, marker: Path, monkeypatch, capfd) -> None:
    before = snapshot(world)
    check(run_cli(monkeypatch, capfd, world, c.argv), world, before, c.says)


def test_tsd_data_shards_without_litdata_is_one_line(world: Path, marker: Path, monkeypatch, capfd) -> None:
    """The scale extra is optional: without litdata, tsd-data shards says how to install it."""
    monkeypatch.setitem(sys.modules, "litdata", None)  # makes `import litdata` fail
    monkeypatch.delitem(sys.modules, "temposyncdiff.data.shards", raising=False)
    before = snapshot(world)
    result = run_cli(monkeypatch, capfd, world, ["tsd-data", "shards", "out=outputs/shards", QUIET])
    check(result, world, before, "error: tsd-data shards needs litdata (")
    assert "pip install -e '.[scale]'" in result.err


def test_bad_viseme_files_are_silence_on_the_data_side(world: Path, marker: Path) -> None:
    """The cache builder never fails on a viseme file: each bad one is silence, with a warning naming it."""
    from temposyncdiff.data.cache import load_visemes
    from temposyncdiff.data.visemes import SILENCE

    for name in ("object.npy", "matrix.npy", "float.npy", "range.npy", "archive.npz", "random.npy", "missing.npy"):
        with pytest.warns(UserWarning, match=re.escape(name)):
            ids, source = load_visemes(world / "bad" / name, 25)
        assert source == "silence" and ids.tolist() == [SILENCE] * 25, name


def test_synth_overwrite_replaces_only_its_own_corpus(tmp_path: Path) -> None:
    """overwrite=true deletes the files of the corpus synth wrote (and its emptied spk folders), then writes anew."""
    from temposyncdiff.data.synthetic.corpus import META_NAME, SynthConfig, synthesize_corpus

    out = tmp_path / "corpus"
    for rel in ("spk000/00001.mp4", "spk000/00002.visemes.npy", "spk007/00003.mouth.npy", "spk007/00003.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"old")
    (out / META_NAME).write_text(json.dumps({"settings": {"identities": 99}}))
    cfg = SynthConfig(out=str(out), identities=1, utterances=1, image_size=32, workers=1)
    synthesize_corpus(cfg, overwrite=True, log=lambda *_: None)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == sorted(
        [META_NAME, "spk000", *(f"spk000/00001.{e}" for e in ("mp4", "txt", "visemes.npy", "mouth.npy"))]
    )
    assert (out / "spk000" / "00001.mp4").read_bytes() != b"old"


def test_every_trap_is_armed(world: Path, marker: Path) -> None:
    """Each booby-trapped file does run its payload when loaded unsafely, so the cases above test something."""
    unsafe: dict[str, Callable[[Path], object]] = {
        "trap_vae.pt": lambda p: torch.load(p, weights_only=False),
        "trap_teacher.pt": lambda p: torch.load(p, weights_only=False),
        "trap_syncnet.pt": lambda p: torch.load(p, weights_only=False),
        "trap.ckpt": lambda p: torch.load(p, weights_only=False),
        "pickle.pt": lambda p: pickle.loads(p.read_bytes()),
        "pickle.ckpt": lambda p: pickle.loads(p.read_bytes()),
        "rerun.pickle": lambda p: pickle.loads(p.read_bytes()),
        "object.npy": lambda p: np.load(p, allow_pickle=True),
        "cache_object/synth_train/frames.npy": lambda p: np.load(p, allow_pickle=True),
        str(lpips_backbone_file("torch_home", "alex")): lambda p: torch.load(p, weights_only=False),
    }
    if importlib.util.find_spec("litdata"):
        from litdata import StreamingDataset

        unsafe["shards/synth_train/clips"] = lambda p: StreamingDataset(str(p))[0]
    for name, load in unsafe.items():
        load(world / "bad" / name)
        assert marker.exists(), name
        marker.unlink()


def test_a_trapped_lpips_backbone_is_unavailable_not_loaded(world: Path, marker: Path, monkeypatch, capfd) -> None:
    """LPIPS is optional: a backbone file the weights-only loader refuses makes it unavailable, with the reason."""
    run = "${hydra:runtime.output_dir}"  # every output in the run's own folder
    argv = (
        "tsd-eval split=val max_utterances=1 eval=denoise eval.denoise.max_frames=2 eval.denoise.noise_levels=[500] "
        "models.0.steps=[1] models.1.checkpoint=bad/missing.pt lpips.torch_home=bad/torch_home threads=1 "
        f"out_json={run}/eval_report.json tables_dir={run}/tables plots_dir={run}/plots {QUIET}"
    ).split()
    before = snapshot(world)
    result = run_cli(monkeypatch, capfd, world, argv)
    changed, run_dir = outside_run_dir(before, snapshot(world))
    assert result.code == 0 and "Traceback" not in result.err, result.err[-3000:]
    report = json.loads((world / run_dir / "eval_report.json").read_text())
    lpips = report["denoise"]["levels"]["500"]["teacher@1"]["lpips"]
    assert lpips["status"] == "unavailable" and "could not load LPIPS backbone" in lpips["reason"]
    assert not changed, changed
    shutil.rmtree(world / run_dir)


def test_a_failing_pipeline_step_is_one_line(world: Path, marker: Path, monkeypatch, capfd) -> None:
    """A step's own error line becomes the pipeline's one line; its log's last lines go to stdout."""
    before = snapshot(world)
    result = run_cli(monkeypatch, capfd, world, ["tsd-pipeline", "only=[manifest]", QUIET])
    # the pipeline's own step log and the step's own run folder are the pipeline's outputs too
    own = ("logs/pipeline/manifest.log", "logs/data_manifest/")
    check(result, world, before, "error: step 'manifest' failed (exit 2: ", allowed=own)
    assert "synth_lrs3: corpus root does not exist" in result.err
    assert "last lines of its log" in result.out


def test_ctrl_c_removes_the_partial_sample_and_keeps_the_previous_one(
    world: Path, marker: Path, tmp_path: Path
) -> None:
    """SIGINT to a tsd-infer process while it writes frames: exit 130, one line, no partial folder left, and the
    sample it would have replaced is unchanged."""
    samples = world / "outputs" / "samples"
    previous = samples / "ctrl_c"
    (previous / "frames").mkdir(parents=True)
    (previous / ".tsd-sample").write_text(json.dumps({"written_by": "tsd-infer"}))
    (previous / "sample.mp4").write_bytes(b"the previous sample")
    (previous / "summary.json").write_text("{}")
    _wav(world / "outputs" / "long.wav", np.random.default_rng(1).normal(0, 0.1, 16000 * 120))
    before = snapshot(world)
    cmd = [str(BIN / "tsd-infer"), *BASES["INFER"].split()[1:], "audio=outputs/long.wav", "run_name=ctrl_c", QUIET]
    env = {k: v for k, v in os.environ.items() if k != "TSD_ROOT"} | {"OMP_NUM_THREADS": "1"}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        # a shell's background job (`make test &`) starts with SIGINT ignored, which the child would inherit
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(cmd, cwd=world, env=env, stdout=stdout, stderr=stderr, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not list(samples.glob(".ctrl_c.partial-*/frames/00002.png")):  # generating: frames are being written
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        result = Result(proc.returncode, out.read_text(), err.read_text())
        check(result, world, before, "interrupted: partial outputs were removed", code=130)
        assert (previous / "sample.mp4").read_bytes() == b"the previous sample"
        assert sorted(p.name for p in samples.iterdir()) == ["ctrl_c"]
    finally:
        proc.kill()
        shutil.rmtree(world / "outputs")
