"""tsd-infer ref_image=<image> audio=<file> [run_name=...] [runtime=onnx]: reference image + speech -> outputs/samples/<run_name>/."""

from __future__ import annotations

import datetime as dt
import platform

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from temposyncdiff.cli.common import CONFIG_DIR, VERSION_BASE
from temposyncdiff.inference.inputs import load_speech, load_visemes_for, paste_back
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings, num_output_frames
from temposyncdiff.inference.writer import write_sample
from temposyncdiff.utils.task import log, task


@task
def infer(cfg: DictConfig) -> dict:
    """Generate, write frames + sample.mp4 + summary.json atomically, and return the summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pipe = TalkingHeadPipeline.from_checkpoints(cfg.checkpoint, cfg.vae, kind=cfg.stage, steps=cfg.steps, sampler=cfg.sampler,
                                                guidance_scale=cfg.guidance_scale, device=cfg.device, seed=cfg.seed,
                                                detector=cfg.detector, runtime=cfg.runtime, onnx_dir=cfg.onnx_dir,
                                                onnx_threads=cfg.threads)  # fmt: skip
    wave = load_speech(cfg.audio, pipe.audio.sample_rate)
    num_frames = num_output_frames(len(wave), pipe.audio.sample_rate, cfg.fps)
    visemes = load_visemes_for(num_frames, cfg.fps, transcript=cfg.transcript, viseme_file=cfg.viseme_file)
    face, ref = pipe.reference(cfg.ref_image)
    timings = Timings()

    def frames():
        with Progress(transient=True) as progress:
            bar = progress.add_task("generating", total=num_frames)
            for frame in pipe.frames(ref, wave, visemes, timings):
                progress.advance(bar)
                yield paste_back(face.image, face.box, frame) if cfg.paste_back else frame

    def summary() -> dict:
        return {
            "ref_image": str(cfg.ref_image), "audio": str(cfg.audio), "checkpoint": str(cfg.checkpoint),
            "stage": cfg.stage, "runtime": cfg.runtime, "sampler": pipe.sampler, "steps": pipe.steps, "guidance_scale": pipe.guidance_scale,
            "device": str(pipe.device), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "face": {"method": face.method, "box": list(face.box)}, "fps": cfg.fps,
            "audio_seconds": round(len(wave) / pipe.audio.sample_rate, 3),
            "visemes": "file" if cfg.viseme_file else "transcript" if cfg.transcript else "audio encoder",
            "timings": timings.report(len(wave) / pipe.audio.sample_rate),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }  # fmt: skip

    out = write_sample(cfg.out_dir, frames(), wave, pipe.audio.sample_rate, cfg.fps, cfg.save_frames, summary)
    report = summary()
    t = report["timings"]
    log.info("wrote %s/sample.mp4 (%d frames): %.1f fps, real-time factor %.3f, first frame %.0f ms",
             out, t["frames"], t["fps"], t["real_time_factor"], t["first_frame_ms"] or 0)  # fmt: skip
    return report


def main() -> None:
    hydra.main(version_base=VERSION_BASE, config_path=CONFIG_DIR, config_name="infer")(infer)()


if __name__ == "__main__":
    main()
