"""The synthetic LRS3-layout corpus: espeak-ng speech and drawn faces whose mouths follow the phonemes.

Each identity has its own face and voice; each utterance is a random sentence from a built-in word
list. Output per utterance: ``<talk_id>/<utt>.mp4`` (H.264 25 fps + AAC 16 kHz), ``<utt>.txt`` (LRS3
transcript with espeak-ng's word timings) and ground truth ``<utt>.visemes.npy`` (int64 per frame)
and ``<utt>.mouth.npy`` (float32 ``[N, 5]`` mouth parameters, see ``face_render.MOUTH_PARAMS``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from temposyncdiff.data.synthetic.face_render import VISEME_MOUTH_TABLE, FaceRenderer, Identity
from temposyncdiff.data.transcript import Transcript, write_transcript
from temposyncdiff.data.tts import Espeak
from temposyncdiff.data.video import write_video
from temposyncdiff.data.visemes import espeak_visemes, expand_segments, frame_visemes
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_path, write_json

META_NAME = "synth_meta.json"
SPK_DIR = re.compile(r"spk\d{3,}")  # what synth writes under out=: these folders, META_NAME, nothing else
CORPUS_FILE = re.compile(r"\d{5}\.(mp4|txt|visemes\.npy|mouth\.npy)")  # inside an SPK_DIR
VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SUBJECTS = "my friend|the doctor|a small boy|our teacher|the old man|his mother|the pilot|a farmer|the queen|my brother|the police|every child".split("|")  # fmt: skip
VERBS = "bought|found|moved|played|brought|watched|painted|measured|opened|pushed|fixed|chose|wrapped|washed|shared|loved|needed|threw|covered|visited".split("|")  # fmt: skip
OBJECTS = "a blue boat|the heavy box|some fresh bread|a shiny watch|the yellow chair|five purple balloons|the wooden bridge|a map of Boston|the empty bottle|a funny movie|the pepper jar|three warm blankets|the broken phone|a huge pumpkin|the violin|some orange juice".split("|")  # fmt: skip
TAILS = "|yesterday|before noon|with great care|in the morning|near the window|by the river|for the whole family|very quickly|on Thursday|at the theatre|without a word|while it was raining".split("|")  # fmt: skip
FPS = 25.0
SAMPLE_RATE = 16000
ALIGN_SAMPLES = 5120  # 0.32 s: a whole number of 25 fps frames (8) and of AAC frames (5 x 1024)


@dataclass
class SynthConfig:
    out: str = "data/synth_lrs3"
    identities: int = 8
    utterances: int = 12  # per identity
    image_size: int = 128
    seed: int = 0
    workers: int = 2
    supersample: int = 4

    def __post_init__(self) -> None:
        """Refuse a setting of the wrong type or range (one line naming it) before anything is written."""
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out).strip():
            raise UserError(f"out={self.out!r}: a folder path is required")
        least = {"identities": 1, "utterances": 1, "image_size": 16, "seed": 0, "workers": 0, "supersample": 1}
        for key, low in least.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{key}={value}: must be a whole number >= {low}")
        if self.image_size % 2:
            raise UserError(f"image_size={self.image_size}: must be even (H.264 yuv420p)")


def make_sentence(rng: np.random.Generator) -> str:
    parts = [
        SUBJECTS[rng.integers(len(SUBJECTS))],
        VERBS[rng.integers(len(VERBS))],
        OBJECTS[rng.integers(len(OBJECTS))],
    ]
    tail = TAILS[rng.integers(len(TAILS))]
    text = " ".join(parts + ([tail] if tail else []))
    return text[0].upper() + text[1:] + "."


def voice_for(rng: np.random.Generator) -> dict:
    return {
        "voice": f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}",
        "rate": int(rng.integers(135, 185)),
        "pitch": int(rng.integers(25, 75)),
        "pitch_range": int(rng.integers(30, 80)),
    }


def mouth_track(segments: list[tuple[str, float, float]], num_frames: int, sigma_s: float = 0.03) -> np.ndarray:
    """Mouth parameters per frame: viseme targets at 100 Hz, Gaussian-smoothed (co-articulation), sampled at k/fps."""
    step = 0.01
    t = np.arange(0, num_frames / FPS + 0.1, step)
    ids = frame_visemes(segments, len(t), 1.0 / step)
    targets = VISEME_MOUTH_TABLE[ids]
    half = int(4 * sigma_s / step)
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * step / sigma_s) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(targets, ((half, half), (0, 0)), mode="edge")
    smooth = np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(targets.shape[1])], axis=1)
    frame_t = np.arange(num_frames) / FPS
    return np.stack([np.interp(frame_t, t, smooth[:, j]) for j in range(smooth.shape[1])], axis=1).astype(np.float32)


def blink_track(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    blink = np.zeros(num_frames, np.float32)
    profile = np.array([0.4, 0.9, 1.0, 0.7, 0.3], np.float32)
    t = rng.uniform(0.3, 2.5)
    while (k := int(t * FPS)) < num_frames:
        seg = profile[: num_frames - k]
        blink[k : k + len(seg)] = seg
        t += rng.uniform(1.5, 4.5)
    return blink


def pose_track(rng: np.random.Generator, num_frames: int, energy: np.ndarray) -> np.ndarray:
    """Small head motion: slow sinusoids plus a nod that follows speech loudness."""
    t = np.arange(num_frames) / FPS
    out = np.zeros((num_frames, 3), np.float32)
    for j, amp in enumerate((0.012, 0.008, 0.035)):
        for _ in range(2):
            out[:, j] += amp / 2 * np.sin(2 * np.pi * rng.uniform(0.1, 0.6) * t + rng.uniform(0, 2 * np.pi))
    out[:, 1] += 0.006 * energy
    return out


def frame_energy(wave: np.ndarray, num_frames: int) -> np.ndarray:
    hop = int(SAMPLE_RATE / FPS)
    rms = np.array([np.sqrt(np.mean(wave[k * hop : (k + 1) * hop] ** 2) + 1e-12) for k in range(num_frames)])
    return (rms / (rms.max() + 1e-9)).astype(np.float32)


def _speech(cfg: SynthConfig, ident: int, utt: int) -> tuple[Identity, np.random.Generator, np.ndarray, list, list]:
    """An utterance's identity, its speech (audio with lead-in and tail, phoneme segments, word timings) and its
    generator, left where the head motion and blinks are drawn from it."""
    from temposyncdiff.data.audio import resample  # torch import stays in the workers

    id_rng = np.random.default_rng([cfg.seed, ident])
    identity, voice = Identity.random(id_rng), voice_for(id_rng)
    rng = np.random.default_rng([cfg.seed, ident, utt + 1])
    text = make_sentence(rng)
    speech = Espeak().synthesize(text, **voice)
    wave = resample(speech.samples, speech.sample_rate, SAMPLE_RATE)
    n_lead = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
    total = -(-(n_lead + len(wave) + int(0.12 * SAMPLE_RATE)) // ALIGN_SAMPLES) * ALIGN_SAMPLES
    audio = np.zeros(total, np.float32)
    audio[n_lead : n_lead + len(wave)] = 0.9 * wave / max(np.abs(wave).max(), 1e-6)
    lead = n_lead / SAMPLE_RATE
    segments = expand_segments([(espeak_visemes(p), s + lead, e + lead) for p, s, e in speech.phonemes])
    words = [(w, round(s + lead, 2), round(e + lead, 2)) for w, s, e in speech.words]
    return identity, rng, audio, segments, words


def _num_frames(audio: np.ndarray) -> int:
    """Video frames of an utterance's audio (its length is a whole number of frames, ``ALIGN_SAMPLES``)."""
    return len(audio) * int(FPS) // SAMPLE_RATE


def _render(
    cfg: SynthConfig, identity: Identity, mouth: np.ndarray, audio: np.ndarray, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Frames of a face speaking with ``mouth``; blinks and head motion are drawn from ``rng``."""
    num_frames = len(mouth)
    blink = blink_track(rng, num_frames)
    pose = pose_track(rng, num_frames, frame_energy(audio, num_frames))
    renderer = FaceRenderer(identity, cfg.image_size, cfg.supersample)
    return (renderer.render(mouth[k], float(blink[k]), tuple(pose[k])) for k in range(num_frames))


def _utterance(job: tuple[dict, int, int]) -> tuple[str, float, int]:
    """Make one utterance (runs in a worker process)."""
    cfg, ident, utt = job
    cfg = SynthConfig(**cfg)
    talk = Path(cfg.out) / f"spk{ident:03d}"
    name = f"{utt + 1:05d}"
    mp4 = talk / f"{name}.mp4"
    if mp4.exists() and (talk / f"{name}.mouth.npy").exists():
        return str(mp4), 0.0, 0
    start = time.perf_counter()
    identity, rng, audio, segments, words = _speech(cfg, ident, utt)
    num_frames = _num_frames(audio)
    visemes = frame_visemes(segments, num_frames, FPS)
    mouth = mouth_track(segments, num_frames)
    write_transcript(talk / f"{name}.txt", Transcript(text=" ".join(w for w, _, _ in words), words=words))
    _save_npy(talk / f"{name}.visemes.npy", visemes)
    write_video(mp4, _render(cfg, identity, mouth, audio, rng), FPS, audio, SAMPLE_RATE, deterministic=True)
    _save_npy(talk / f"{name}.mouth.npy", mouth)  # written last: it marks a finished utterance
    return str(mp4), time.perf_counter() - start, num_frames


def retake(video: str | Path, draw: int = 1) -> np.ndarray:
    """The corpus utterance ``<out>/spkNNN/MMMMM.mp4`` drawn again with other head motion and blinks.

    Identity, speech, lips and the loudness-driven nod are those of the original; ``draw`` (>= 1) picks the new
    head motion and blinks. uint8 ``[N,H,W,3]`` as rendered, before H.264. What a generator that makes exactly the
    right face and lips, but cannot know the take's head motion and blinks, would produce.
    """
    video = Path(video)
    meta = video.parent.parent / META_NAME
    if not meta.is_file() or not video.parent.name.startswith("spk") or not video.stem.isdigit():
        raise ValueError(f"{video} is not an utterance of a synthetic corpus (no {meta})")
    cfg = SynthConfig(out=str(meta.parent), **_read_settings(meta))
    ident, utt = int(video.parent.name[3:]), int(video.stem) - 1
    identity, _, audio, segments, _ = _speech(cfg, ident, utt)
    mouth = mouth_track(segments, _num_frames(audio))
    rng = np.random.default_rng([cfg.seed, ident, utt + 1, draw])
    return np.stack(list(_render(cfg, identity, mouth, audio, rng)))


def _read_settings(meta_path: Path) -> dict:
    """The settings a corpus' ``synth_meta.json`` records; a one-line error when it is unreadable."""
    try:
        settings = json.loads(meta_path.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:  # ValueError: not JSON or not UTF-8
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UserError(f"{meta_path}: unreadable ({reason}); not a corpus written by tsd-data synth") from err
    if not isinstance(settings, dict):
        raise UserError(f"{meta_path}: its settings are not a mapping; not a corpus written by tsd-data synth")
    return settings


def _remove_corpus(out: Path) -> None:
    """Delete the corpus files synth wrote under ``out`` and then its empty spk folders; when ``out`` holds anything
    else, refuse (naming it) and delete nothing."""
    entries = sorted(out.rglob("*"))
    spk = {p for p in entries if p.parent == out and SPK_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()}
    ours = {p for p in entries if p.parent in spk and CORPUS_FILE.fullmatch(p.name) and not p.is_dir()}
    ours.add(out / META_NAME)
    if other := [p for p in entries if p not in spk and p not in ours]:
        raise FileExistsError(
            f"{out}: holds files tsd-data synth did not write (e.g. {other[0]}); overwrite=true deletes only a "
            f"corpus of its own: move them away or choose another out="
        )
    for path in ours:
        path.unlink(missing_ok=True)
    for folder in spk:
        folder.rmdir()


def synthesize_corpus(cfg: SynthConfig, overwrite: bool = False, log=print) -> dict:
    """Write (or finish) the corpus under ``cfg.out``; returns a summary with timings and size.

    A corpus made with other settings is replaced only with ``overwrite`` and only when ``cfg.out`` holds nothing
    but that corpus' files.
    """
    Espeak()  # fail fast with a clear message when espeak-ng is missing
    out = Path(cfg.out)
    meta_path = out / META_NAME
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}
    if meta_path.exists():
        old = _read_settings(meta_path)
        if old != settings:
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds a corpus made with other settings {old}; pass overwrite=true or another out="
                )
            _remove_corpus(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(asdict(cfg), i, u) for i in range(cfg.identities) for u in range(cfg.utterances)]
    start = time.perf_counter()
    made = frames = 0
    # spawned workers even when there is one: the bytes written must not depend on this process's state
    # (the same corpus came out different inside a long test session than in a fresh process)
    with mp.get_context("spawn").Pool(max(1, cfg.workers), initializer=_worker_init) as pool:
        results = list(pool.imap_unordered(_utterance, jobs))
    for _, secs, n in results:
        made += secs > 0
        frames += n
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {
        "settings": settings,
        "utterances": len(jobs),
        "made_now": int(made),
        "frames_made_now": int(frames),
        "seconds": round(elapsed, 1),
        "bytes": size,
    }
    write_json(meta_path, summary)
    log(
        f"synthetic corpus: {len(jobs)} utterances ({made} made now, {frames} frames) in {elapsed:.1f} s, {size / 1e6:.1f} MB at {out}"
    )
    return summary


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
