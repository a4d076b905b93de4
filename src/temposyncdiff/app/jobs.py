"""One tsd-app generation: the page's inputs as tsd-infer's settings, run through tsd-infer's ``make_sample``, and what
the page shows of it (the summary, a user error as the CLI's one line)."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from temposyncdiff.app.models import Model, find_models
from temposyncdiff.cli.common import compose_run
from temposyncdiff.cli.infer import FrameProgress, make_sample
from temposyncdiff.data.tts import Espeak
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import VIDEO_SUFFIXES


@dataclass(frozen=True)
class Request:
    """What the page sends: a model label, the face (photo or video) and speech files, a sentence, the options."""

    model: str | None
    face: str | None
    audio: str | None = None
    text: str = ""
    steps: float | None = None
    paste_back: bool = True
    runtime: str = "torch"
    threads: float | None = None

    def uploads(self) -> tuple[str, ...]:
        return tuple(p for p in (self.face, self.audio) if p)


def whole(value: float | None) -> int | float | None:
    """A number field's value as tsd-infer takes it: empty or 0 is null (the default), 2.0 is 2; anything else as it
    is (tsd-infer names it if it is not a whole number)."""
    if value is None or value == "" or value == 0:
        return None
    return int(value) if float(value).is_integer() else value


def generate(app: DictConfig, request: Request, progress: FrameProgress) -> tuple[Path, dict]:
    """Generate ``request`` as tsd-infer does, into ``outputs/samples/app-<time>-<id>/``: its sample.mp4 and summary.
    Raises ``UserError`` with tsd-infer's one line for a bad input or setting."""
    model = pick_model(app, request.model)
    if not request.face:
        raise UserError("no photo or video: upload the face to animate (an image) or to re-voice (a video)")
    with tempfile.TemporaryDirectory(prefix="tsd-app-") as tmp:
        audio = request.audio or speak(request.text, Path(tmp) / "speech.wav", app.voice, app.max_text_chars)
        cfg = infer_settings(app, model, request, audio)
        report = make_sample(cfg, progress)
    return Path(os.path.abspath(cfg.out_dir)) / "sample.mp4", report


def pick_model(app: DictConfig, label: str | None) -> Model:
    models = {m.label: m for m in find_models(app.model_dirs)}
    if label in models:
        return models[label]
    if not models:
        raise UserError(
            f"no trained model in {', '.join(map(str, app.model_dirs))}: train one (make demo), or start tsd-app "
            "with model_dirs=[<folder with student_best.pt or teacher_best.pt and vae_pretrained.pt>]"
        )
    raise UserError(f"model {label!r} is not there any more; choose one of: {', '.join(models)}")


def base_settings(app: DictConfig) -> DictConfig:
    """tsd-infer's config as tsd-infer composes it, with the app's ``paths`` and its ``infer`` settings merged in (an
    unknown key or a bad value is a ``UserError``)."""
    # inside tsd-app's own Hydra run, Hydra is set up on conf/ already
    cfg = compose("infer") if GlobalHydra.instance().is_initialized() else compose_run("infer", [])
    cfg.paths = app.paths
    try:
        cfg.merge_with(app.infer)
    except OmegaConfBaseException as err:
        raise UserError(f"infer: {' '.join(str(err).split()[:12])} (tsd-infer's settings: conf/infer.yaml)") from None
    return cfg


def infer_settings(app: DictConfig, model: Model, request: Request, audio: str | os.PathLike) -> DictConfig:
    """tsd-infer's config (``base_settings``) for ``request``: a video file re-voiced, any other file animated as a
    photo."""
    cfg = base_settings(app)
    face = str(request.face)
    video = Path(face).suffix.lower() in VIDEO_SUFFIXES
    settings = {
        "ref_image": None if video else face,
        "video": face if video else None,
        "audio": str(audio),
        "stage": model.stage,
        "checkpoint": str(model.checkpoint),
        "vae": str(model.vae),
        "onnx_dir": str(model.onnx_dir),
        "steps": whole(request.steps),
        "threads": whole(request.threads),
        "paste_back": bool(request.paste_back),
        "runtime": request.runtime,
        "run_name": f"app-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
    }
    for key, value in settings.items():
        cfg[key] = value
    return cfg


def speak(text: str, path: Path, voice: str, max_chars: int) -> Path:
    """``text`` spoken by espeak-ng into a 16-bit mono wav at ``path``."""
    text = " ".join(text.split())
    if not text:
        raise UserError("no speech: upload or record audio, or type a sentence to speak")
    if len(text) > max_chars:
        raise UserError(f"the sentence has {len(text)} characters; at most max_text_chars={max_chars} are spoken")
    try:
        speech = Espeak().synthesize(text, voice=voice)
    except ValueError as err:  # an unknown voice
        raise UserError(f"voice={voice}: {err}") from None
    pcm = np.clip(np.round(speech.samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(speech.sample_rate)
        out.writeframes(pcm.tobytes())
    return path


def error_line(err: BaseException, uploads: Iterable[str] = ()) -> str:
    """The CLI's one line for ``err``, each uploaded file named by its own name instead of the server's copy's path."""
    text = " ".join(f"error: {err}".split())
    for path in uploads:
        text = text.replace(str(path), Path(path).name)
    return text


def summary_lines(report: dict) -> str:
    """The summary the page shows (markdown): length, speed (fps, real-time factor), the face box, the model."""
    t, face = report["timings"], report["face"]
    how = "centre crop" if face["method"] == "center" else f"found by {face['method']}"
    if face.get("used"):
        how += f", the largest of {face['faces_found']}"
    threads = f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}"
    rows = {
        "video": f"{t['frames']} frames at {report['fps']:g} fps, {report['audio_seconds']:g} s of speech",
        "speed": f"{t['fps']:g} frames/s, real-time factor {t['real_time_factor']:g} (below 1: faster than real "
        f"time), first frame after {t['first_frame_ms'] or 0:g} ms",
        "face box": f"x0, y0, x1, y1 = {', '.join(map(str, face['box']))} ({how})",
        "model": f"{report['stage']}, {report['steps']} steps ({report['sampler']}), {report['runtime']} on "
        f"{report['device']}, {threads}",
    }
    return "\n".join(f"- **{k}**: {v}" for k, v in rows.items())
