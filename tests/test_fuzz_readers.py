"""A small fuzz pass over the readers (fixed seed): random bytes, truncated and bit-flipped real files written by the
project's own writers. A reader either returns or raises its documented error (a ``UserError``) with a one-line
message; never another exception type, a crash or a hang."""

from __future__ import annotations

import io
import json
import warnings
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.cache import load_visemes
from temposyncdiff.data.manifest import read_manifest
from temposyncdiff.data.transcript import Transcript, format_transcript, read_transcript
from temposyncdiff.data.video import probe, read_frames, write_video
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import check_reference_file, load_image, load_speech, load_visemes_for
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.utils.checkpoints import check_resume
from temposyncdiff.utils.weights import load_net, save_weights

SEED = 1234
MUTATIONS = 30


def mutations(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """``MUTATIONS`` variants of ``data``: random bytes, truncations, bit flips and overwritten runs."""
    out = [("empty", b""), ("one byte", data[:1])]
    out += [(f"random {n}", rng.bytes(n)) for n in (16, 300, len(data))]
    for _ in range(11):
        n = int(rng.integers(1, max(2, len(data))))
        out.append((f"truncated at {n}", data[:n]))
    for bits in (1, 1, 1, 2, 2, 4, 4, 8, 16, 64):
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data) * 8, bits):
            flipped[pos // 8] ^= 1 << int(pos % 8)
        out.append((f"{bits} bits flipped", bytes(flipped)))
    for size in (4, 16, 64, 256):
        start = int(rng.integers(0, max(1, len(data) - size)))
        out.append((f"{size} bytes overwritten at {start}", data[:start] + rng.bytes(size) + data[start + size :]))
    assert len(out) == MUTATIONS
    return out


# ---- one real file per reader, from the project's writers ---------------------------------------------------------
def _frames(n: int = 12, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _png(tmp: Path) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_frames(1, 48)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(tmp: Path) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_frames(1, 48)[0]).save(buf, format="JPEG")
    return buf.getvalue()


def _wav(tmp: Path) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.random.default_rng(0).normal(0, 0.1, 8000) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _mp4(tmp: Path) -> bytes:
    wave = np.random.default_rng(0).normal(0, 0.1, 8000)
    path = write_video(tmp / "clip.mp4", _frames(), 25.0, wave, 16000, deterministic=True)  # the same bytes anywhere
    return path.read_bytes()


def _transcript(tmp: Path) -> bytes:
    return format_transcript(Transcript("HELLO WORLD", [("HELLO", 0.04, 0.2), ("WORLD", 0.24, 0.44)])).encode()


def _npy(tmp: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.int64) % 15)
    return buf.getvalue()


def _manifest(tmp: Path) -> bytes:
    (tmp / "m_meta.json").write_text(json.dumps({"root": str(tmp)}))
    row = {
        "id": "t/u",
        "talk_id": "t",
        "video_mp4": "t/u.mp4",
        "transcript": "t/u.txt",
        "viseme_npy": None,
        "num_frames": 12,
        "fps": 25.0,
        "duration_s": 0.48,
        "audio_sample_rate": 16000,
        "width": 32,
        "height": 32,
    }
    return "".join(json.dumps(row | {"id": f"t/u{i}"}) + "\n" for i in range(3)).encode()


def _weights(tmp: Path) -> bytes:
    torch.manual_seed(0)
    return save_weights(tmp / "vae.pt", "vae", TinyVAE(channels=(8,), patch_size=4), {"image_size": 32}).read_bytes()


def _checkpoint(tmp: Path) -> bytes:
    ckpt = {
        "state_dict": {"net.w": torch.ones(8)},
        "global_step": 3,
        "epoch": 0,
        "pytorch-lightning_version": "2.6.0",
        "stage": "vae",
        "callbacks": {"ModelCheckpoint{}": {"dirpath": str(tmp), "best_model_path": str(tmp / "b")}},
    }
    torch.save(ckpt, tmp / "last.ckpt")
    return (tmp / "last.ckpt").read_bytes()


def _read_visemes_data_side(path: Path) -> None:
    """The data side never fails on a viseme file: silence with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, source = load_visemes(path, 12)
    assert len(ids) == 12 and source in ("file", "silence")


# reader name -> (file name, real file, what reads it)
READERS: dict[str, tuple[str, Callable[[Path], bytes], Callable[[Path], object]]] = {
    "image png": ("ref.png", _png, lambda p: (check_reference_file(p, 1), load_image(p))),
    "image jpeg": ("ref.jpg", _jpeg, lambda p: (check_reference_file(p, 1), load_image(p))),
    "speech wav": ("speech.wav", _wav, lambda p: load_speech(p, min_seconds=0.01)),
    "audio wav": ("audio.wav", _wav, lambda p: load_audio(p)),
    "video mp4": ("clip.mp4", _mp4, lambda p: (probe(p), read_frames(p, 25.0), load_audio(p))),
    "reference mp4": ("ref.mp4", _mp4, lambda p: (check_reference_file(p, 1), load_image(p))),
    "speech mp4": ("speech.mp4", _mp4, lambda p: load_speech(p, min_seconds=0.01)),
    "transcript": ("u.txt", _transcript, read_transcript),
    "transcript visemes": ("v.txt", _transcript, lambda p: load_visemes_for(12, transcript=p)),
    "viseme file": ("v.npy", _npy, lambda p: load_visemes_for(12, viseme_file=p)),
    "viseme file (data)": ("d.npy", _npy, _read_visemes_data_side),
    "manifest": ("m_train.jsonl", _manifest, read_manifest),
    "weights export": ("vae_pretrained.pt", _weights, lambda p: load_net(p, "vae")),
    "lightning checkpoint": ("last.ckpt", _checkpoint, lambda p: check_resume(p, "vae")),
}


# known defects (xfail strict): reader -> what goes wrong, where
DEFECTS: dict[str, str] = {}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "reader",
    [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=DEFECTS[r])) if r in DEFECTS else r for r in READERS],
)
def test_reader_survives_mutations(reader: str, tmp_path: Path, one_thread) -> None:
    name, make, read = READERS[reader]
    real, path = make(tmp_path), tmp_path / name
    path.write_bytes(real)
    read(path)  # the real file reads
    rng = np.random.default_rng([SEED, *reader.encode()])
    failures = []
    for what, data in mutations(real, rng):
        path.write_bytes(data)
        try:
            read(path)
        except UserError as err:
            if "\n" in str(err) or not str(err):
                failures.append(f"{what}: {type(err).__name__} not one line: {str(err)!r}")
        except Exception as err:  # any other type is the finding
            failures.append(f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    assert not failures, "\n".join(failures)
