"""tsd-infer ref_image=<image> audio=<file> [run_name=...] [runtime=onnx]: reference image + speech -> outputs/samples/<run_name>/."""

from __future__ import annotations

import datetime as dt
import math
import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from temposyncdiff.cli.common import CONFIG_DIR, hydra_main
from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.diffusion.sampling import SAMPLERS, make_sampler
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import check_reference_file, even_size, load_speech, load_visemes_for, paste_back
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings, num_output_frames
from temposyncdiff.inference.writer import check_out_dir, write_sample
from temposyncdiff.utils.io import safe_name
from temposyncdiff.utils.task import log, task
from temposyncdiff.utils.threads import set_threads

CHOICES = {"stage": ("student", "teacher"), "runtime": ("torch", "onnx"), "detector": ("auto", "dlib", "center")}


@task
def infer(cfg: DictConfig) -> dict:
    """Check every setting and input, then generate and write frames + sample.mp4 + summary.json; return the summary."""
    out_dir = check_settings(cfg)
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
    keys = ("steps", "sampler", "guidance_scale", "device", "seed", "detector", "min_face_px", "runtime", "onnx_dir")
    pipe = TalkingHeadPipeline.from_checkpoints(
        cfg.checkpoint, cfg.vae, kind=cfg.stage, onnx_threads=threads, **{k: cfg[k] for k in keys}
    )
    try:  # the sampler's own limit on steps (the training timesteps; LCM: its original steps)
        make_sampler(pipe.sampler, pipe.schedule, **pipe.sampler_kwargs).set_timesteps(pipe.steps)
    except ValueError as err:
        raise UserError(f"steps={pipe.steps}: {err}") from None
    face, ref = pipe.reference(cfg.ref_image)
    canvas = even_size(face.image) if cfg.paste_back else None  # H.264 needs an even frame size
    timings = Timings()

    def frames():
        with Progress(transient=True) as progress:
            bar = progress.add_task("generating", total=num_frames)
            for frame in pipe.frames(ref, wave, visemes, timings):
                progress.advance(bar)
                yield frame if canvas is None else paste_back(canvas, face.box, frame)

    def summary() -> dict:
        return {
            "ref_image": str(cfg.ref_image),
            "audio": str(cfg.audio),
            "checkpoint": str(cfg.checkpoint),
            "stage": cfg.stage,
            "runtime": cfg.runtime,
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
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    out = write_sample(out_dir, frames(), wave, rate, cfg.fps, cfg.save_frames, summary, protected_dirs(cfg))
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


def check_settings(cfg: DictConfig) -> Path:
    """Refuse a bad setting, input file or out_dir with one line naming it, before any model loads; returns out_dir."""
    if missing := [k for k in ("ref_image", "audio", "checkpoint", "out_dir") if cfg[k] is None]:
        raise UserError(f"{missing[0]}=null: a path is required")
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
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"device={cfg.device}: not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device}: no CUDA device is available here; use device=cpu")
    check_reference_file(cfg.ref_image, cfg.min_face_px)
    return check_out_dir(cfg.out_dir, protected_dirs(cfg))


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
