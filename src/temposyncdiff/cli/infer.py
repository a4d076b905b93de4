"""tsd-infer ref_image=<image> | video=<talking video> audio=<file> [run_name=...] [runtime=auto|torch|onnx|bf16|int8|fp16]:
a photo animated, or a video re-voiced, by the speech -> outputs/samples/<run_name>/."""

from __future__ import annotations

import datetime as dt
import math
import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from temposyncdiff.cli.common import CONFIG_DIR, hydra_main
from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.diffusion.sampling import SAMPLERS, make_sampler
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import (
    ReferenceFace,
    check_reference_file,
    even_size,
    load_speech,
    load_visemes_for,
    paste_back,
)
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings, num_output_frames
from temposyncdiff.inference.precision import RUNTIMES, Probe, cache_root, check_runtime, use_runtime
from temposyncdiff.inference.video_in import (
    LOOPS,
    VideoRevoicer,
    VideoTrack,
    changed_region,
    check_video,
    reference_frame,
    track_video,
    video_summary,
)
from temposyncdiff.inference.writer import check_out_dir, write_sample
from temposyncdiff.metrics.mouth import LipLandmarks
from temposyncdiff.utils.io import safe_name
from temposyncdiff.utils.task import log, task
from temposyncdiff.utils.threads import set_threads

CHOICES = {
    "stage": ("student", "teacher"),
    "runtime": RUNTIMES,
    "detector": ("auto", "dlib", "center"),
    "video_loop": LOOPS,
}


FrameProgress = Callable[[Iterable[np.ndarray], int], Iterable[np.ndarray]]  # (frames, how many) -> them, shown


@task
def infer(cfg: DictConfig) -> dict:
    """tsd-infer: ``make_sample`` with a progress bar on the console."""
    return make_sample(cfg, console_progress)


def console_progress(frames: Iterable[np.ndarray], total: int) -> Iterator[np.ndarray]:
    """The frames as they come, counted on a transient rich progress bar."""
    with Progress(transient=True) as progress:
        bar = progress.add_task("generating", total=total)
        for frame in frames:
            progress.advance(bar)
            yield frame


def make_sample(cfg: DictConfig, progress: FrameProgress) -> dict:
    """Check every setting and input, then generate and write frames + sample.mp4 + summary.json; return the summary.

    The one generation path of tsd-infer and tsd-app: ``progress`` shows the frames' progress (the console, the page).
    Bad settings and inputs raise ``UserError``."""
    out_dir = check_settings(cfg)
    video = check_video(cfg.video, cfg.min_face_px) if cfg.video else None
    # video mode: pass 1 tracks the face before any model loads, so a video without one fails fast
    track = track_video(cfg.video, cfg.fps, cfg.detect_every, cfg.smooth_window) if video else None
    rate = AudioFeatures.sample_rate  # every stage's audio rate, so the pipeline's too
    wave = load_speech(cfg.audio, rate)
    num_frames = num_output_frames(len(wave), rate, cfg.fps)
    visemes = load_visemes_for(
        num_frames,
        cfg.fps,
        transcript=cfg.transcript,
        viseme_file=cfg.viseme_file,
        wave=wave if cfg.phones else None,
        sample_rate=rate,
    )
    threads = set_threads(cfg.threads)
    keys = ("steps", "sampler", "guidance_scale", "device", "seed", "detector", "min_face_px", "onnx_dir")
    pipe = TalkingHeadPipeline.from_checkpoints(  # float32 torch nets: the other runtimes are made from them
        cfg.checkpoint,
        cfg.vae,
        kind=cfg.stage,
        onnx_threads=threads,
        runtime="onnx" if cfg.runtime == "onnx" else "torch",
        **{k: cfg[k] for k in keys},
    )
    try:  # the sampler's own limit on steps (the training timesteps; LCM: its original steps)
        make_sampler(pipe.sampler, pipe.schedule, **pipe.sampler_kwargs).set_timesteps(pipe.steps)
    except ValueError as err:
        raise UserError(f"steps={pipe.steps}: {err}") from None
    timings = Timings()
    face, reference, runtime, stream, revoicer = generation(cfg, pipe, track, wave, visemes, timings)

    def summary() -> dict:
        return {
            "ref_image": str(reference),
            "audio": str(cfg.audio),
            "checkpoint": str(cfg.checkpoint),
            "stage": cfg.stage,
            "runtime": runtime["chosen"],
            "runtime_choice": runtime,
            "sampler": pipe.sampler,
            "steps": pipe.steps,
            "guidance_scale": pipe.guidance_scale,
            "device": str(pipe.device),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "face": {"method": face.method, "box": list(face.box), "faces_found": face.faces}
            | ({"used": "largest"} if face.faces > 1 else {}),
            "fps": cfg.fps,
            "audio_seconds": round(len(wave) / rate, 3),
            "visemes": "file"
            if cfg.viseme_file
            else "transcript"
            if cfg.transcript
            else "phones"
            if cfg.phones
            else "audio encoder",
            "timings": timings.report(len(wave) / rate),
            **({"video": video_summary(video, track), "revoice": revoicer.report()} if revoicer else {}),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    out = write_sample(
        out_dir, progress(stream, num_frames), wave, rate, cfg.fps, cfg.save_frames, summary, protected_dirs(cfg)
    )
    report = summary()
    t = report["timings"]
    log.info(
        "wrote %s/sample.mp4 (%d frames): %.1f fps, real-time factor %.3f, first frame %.0f ms",
        out,
        t["frames"],
        t["fps"],
        t["real_time_factor"],
        t["first_frame_ms"] or 0,
    )
    return report


def generation(
    cfg: DictConfig,
    pipe: TalkingHeadPipeline,
    track: VideoTrack | None,
    wave: np.ndarray,
    visemes: np.ndarray | None,
    timings: Timings,
) -> tuple[ReferenceFace, str, dict, Iterator[np.ndarray], VideoRevoicer | None]:
    """The reference face (and what it came from), the runtime put into ``pipe`` (``pick_runtime``) and the output
    frames: the photo animated (pasted back into it with ``paste_back``) or, given a video's ``track``, the video
    re-voiced."""
    image, reference = cfg.ref_image, str(cfg.ref_image)
    if track is None:
        face, ref = pipe.reference(image)
        runtime = pick_runtime(cfg, pipe, ref, wave, visemes)
        canvas = even_size(face.image) if cfg.paste_back else None  # H.264 needs an even frame size
        frames = pipe.frames(ref, wave, visemes, timings)
        if canvas is not None:
            frames = (paste_back(canvas, face.box, frame, cfg.feather) for frame in frames)
        return face, reference, runtime, frames, None
    if image is None:
        image, at = reference_frame(track)
        reference = f"{cfg.video} at {at:.2f} s"
    face, ref = pipe.reference(image)
    runtime = pick_runtime(cfg, pipe, ref, wave, visemes)
    region = changed_region(pipe)
    lips = None
    if cfg.score_lips:
        try:
            lips = LipLandmarks()
        except (ImportError, OSError, RuntimeError) as err:
            raise UserError(f"score_lips=true: {err}") from None
    revoicer = VideoRevoicer(pipe, track, face.crop, region, cfg.feather, cfg.video_loop, lips=lips)
    return face, reference, runtime, revoicer.frames(ref, wave, visemes, timings), revoicer


def pick_runtime(
    cfg: DictConfig, pipe: TalkingHeadPipeline, ref: torch.Tensor, wave: np.ndarray, visemes: np.ndarray | None
) -> dict:
    """Put ``cfg.runtime``'s nets into ``pipe`` (auto: measured on the first window, or cached); what was done."""
    if cfg.runtime in ("torch", "onnx"):  # from_checkpoints loaded them
        return {"requested": cfg.runtime, "chosen": cfg.runtime}
    probe = Probe(
        pipe, ref, wave, visemes, cfg.onnx_dir, torch.get_num_threads(), cache_root() if cfg.runtime_cache else None
    )
    candidates = None if cfg.runtime_candidates is None else list(cfg.runtime_candidates)
    return use_runtime(probe, cfg.runtime, candidates, cfg.runtime_min_psnr, cfg.runtime_repeats)


def check_settings(cfg: DictConfig) -> Path:
    """Refuse a bad setting, input file or out_dir with one line naming it, before any model loads; returns out_dir."""
    if missing := [k for k in ("audio", "checkpoint", "out_dir") if cfg[k] is None]:
        raise UserError(f"{missing[0]}=null: a path is required")
    if cfg.ref_image is None and cfg.video is None:
        raise UserError("ref_image=null: a path is required (or video=<talking video> to re-voice it)")
    safe_name(cfg.run_name, "run_name")
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise UserError(f"{key}={cfg[key]}: choose {' | '.join(choices)}")
    if cfg.sampler is not None and cfg.sampler not in SAMPLERS:
        raise UserError(f"sampler={cfg.sampler}: choose {' | '.join(SAMPLERS)} or null (the checkpoint's)")
    _check_number(cfg, "fps", low=0, strict=True)
    if cfg.fps != AudioFeatures.fps:
        raise UserError(f"fps={cfg.fps}: the models generate {AudioFeatures.fps:g} fps video (their training rate)")
    _check_number(cfg, "steps", low=1, whole=True, optional=True)
    _check_number(cfg, "threads", low=1, whole=True, optional=True)
    _check_number(cfg, "min_face_px", low=1, whole=True)
    _check_number(cfg, "guidance_scale", low=0, optional=True)
    _check_number(cfg, "seed", low=0, whole=True)
    _check_number(cfg, "feather", low=0)
    _check_number(cfg, "runtime_min_psnr", low=0)
    _check_number(cfg, "runtime_repeats", low=1, whole=True)
    if cfg.feather > 0.5:
        raise UserError(f"feather={cfg.feather}: must be at most 0.5 (a fraction of the face crop's side)")
    if cfg.video is not None:
        _check_video_settings(cfg)
    elif cfg.score_lips:
        raise UserError("score_lips=true: it scores a re-voiced video against its source; give video=<talking video>")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"device={cfg.device}: not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device}: no CUDA device is available here; use device=cpu")
    check_runtime(cfg.runtime, cfg.device, None if cfg.runtime_candidates is None else list(cfg.runtime_candidates))
    if cfg.ref_image is not None:
        check_reference_file(cfg.ref_image, cfg.min_face_px)
    return check_out_dir(cfg.out_dir, protected_dirs(cfg))


def _check_video_settings(cfg: DictConfig) -> None:
    """Video mode: settings that contradict it, and its own numbers."""
    if cfg.detector == "center":
        raise UserError("detector=center: video mode tracks the face with dlib; use detector=auto or dlib")
    if cfg.ref_image is not None and Path(cfg.ref_image).resolve() == Path(cfg.video).resolve():
        raise UserError(
            f"ref_image={cfg.ref_image} is the video itself; leave ref_image=null to take the reference from it"
        )
    _check_number(cfg, "detect_every", low=1, whole=True)
    _check_number(cfg, "smooth_window", low=1, whole=True)


def _check_number(
    cfg: DictConfig, key: str, low: float, strict: bool = False, whole: bool = False, optional: bool = False
) -> None:
    """``cfg[key]`` must be a finite number >= ``low`` (> with ``strict``), an integer when ``whole``, or null."""
    value = cfg[key]
    if value is None and optional:
        return
    number = isinstance(value, (int,) if whole else (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and (value > low or (value == low and not strict)):
        return
    what = "a whole number" if whole else "a number"
    raise UserError(f"{key}={value}: must be {what} {'>' if strict else '>='} {low:g}{' or null' if optional else ''}")


def protected_dirs(cfg: DictConfig) -> tuple[Path, ...]:
    """Folders out_dir must neither be nor hold (besides the current one and home): the repository and the project root."""
    return Path(CONFIG_DIR).parent, Path(cfg.paths.root_dir)


def main() -> None:
    hydra_main("infer", infer)


if __name__ == "__main__":
    main()
