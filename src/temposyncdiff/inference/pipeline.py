"""Reference image + speech -> talking-head frames, offline or streaming, with per-component timings.

Generation runs window by window (``window`` frames, the last ``overlap`` frames of the previous window
given as motion frames), so memory stays bounded for any audio length. Audio features for a window are
computed from the samples around it with a margin wider than every receptive field (mel window, STFT,
the audio encoder's temporal context), so a window's conditions do not depend on how much audio lies
beyond the margin: streaming, which waits for that margin before generating a window, yields exactly
the frames offline generation does (same noise, same windows).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.diffusion.sampling import make_sampler, next_window, sample
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import MIN_FACE_PX, ReferenceFace, prepare_reference
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.vae import FrameVAE
from temposyncdiff.utils.weights import load_net

log = logging.getLogger(__name__)
MARGIN_FRAMES = 8  # > mel half-window (2) + STFT half-window (0.4) + audio-encoder context (3) frames


@dataclass
class Timings:
    """Wall time per component (seconds) and frame count; ``report()`` gives ms per frame."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    frames: int = 0
    first_frame_s: float | None = None

    def add(self, name: str, start: float) -> None:
        self.seconds[name] += time.perf_counter() - start

    def report(self, audio_seconds: float) -> dict[str, Any]:
        total = sum(self.seconds.values())
        per = {k: 1e3 * v / max(self.frames, 1) for k, v in self.seconds.items()}
        return {
            "frames": self.frames,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "ms_per_frame": {k: round(v, 3) for k, v in per.items()}
            | {"total": round(1e3 * total / max(self.frames, 1), 3)},
            "fps": round(self.frames / max(total, 1e-9), 2),
            "real_time_factor": round(total / max(audio_seconds, 1e-9), 4),
            "first_frame_ms": None if self.first_frame_s is None else round(1e3 * self.first_frame_s, 2),
        }


class TalkingHeadPipeline:
    """A denoiser (student or teacher) + the VAE decoder + the denoiser's own audio encoder.

    The nets are torch modules or their onnxruntime stand-ins (``temposyncdiff.export.onnx``).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        vae: FrameVAE,
        schedule: dict,
        sampler: str = "ddim",
        sampler_kwargs: dict | None = None,
        steps: int = 2,
        guidance_scale: float = 1.0,
        overlap: int = 2,
        image_size: int = 64,
        audio: AudioFeatures | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        detector: str = "auto",
        min_face_px: int = MIN_FACE_PX,
    ) -> None:
        if denoiser.audio is None:
            raise ValueError("the denoiser has no audio encoder")
        self.device = torch.device(device)
        self.net, self.vae = denoiser.eval().to(self.device), vae.eval().to(self.device)
        self.schedule, self.sampler, self.steps = dict(schedule), sampler, steps
        self.sampler_kwargs = dict(sampler_kwargs or {})  # e.g. the student's set_alpha_to_one
        self.guidance_scale, self.overlap, self.window = guidance_scale, overlap, denoiser.window
        self.image_size, self.seed, self.detector, self.min_face_px = image_size, seed, detector, min_face_px
        enc = denoiser.audio.config
        self.audio = audio or AudioFeatures(n_mels=enc["n_mels"], window_frames=enc["window"])
        if overlap >= self.window:
            raise ValueError(f"overlap {overlap} must be smaller than the window {self.window}")
        self.hop = int(round(self.audio.sample_rate / self.audio.fps))
        size = image_size // vae.downsample
        self.latent_shape = (vae.latent_channels, size, size)
        self.source: tuple[Path, Path, str] | None = None  # (checkpoint, vae, kind) when loaded from files

    @classmethod
    def from_checkpoints(
        cls,
        denoiser: str | Path,
        vae: str | Path | None = None,
        kind: str = "student",
        runtime: str = "torch",
        onnx_dir: str | Path | None = None,
        onnx_threads: int | None = None,
        **overrides: Any,
    ) -> TalkingHeadPipeline:
        """Load exports (``student_best.pt`` or ``teacher_best.pt`` + ``vae_pretrained.pt``); meta gives defaults.

        ``runtime="onnx"`` runs the nets with onnxruntime on CPU (``onnx_threads`` intra-op threads) from
        ``tsd-export``'s graphs of these files in ``onnx_dir`` (default: ``onnx/<kind>`` beside the checkpoint).
        """
        if runtime not in ("torch", "onnx"):
            raise UserError(f"unknown runtime {runtime!r} (torch | onnx)")
        if runtime == "onnx" and torch.device(overrides.get("device") or "cpu").type != "cpu":
            raise UserError("runtime=onnx runs on the CPU: use device=cpu")
        net, meta = load_net(denoiser, kind)
        if not isinstance(meta.get("schedule"), dict):
            raise UserError(f"{denoiser}: its meta holds no noise schedule (not an export of a {kind} stage)")
        vae_path = vae or meta.get("vae_weights") or Path(denoiser).with_name("vae_pretrained.pt")
        vae_net, vae_meta = load_net(vae_path, "vae")
        if runtime == "onnx":
            from temposyncdiff.export.onnx import default_onnx_dir, load_onnx

            onnx_dir = onnx_dir or default_onnx_dir(denoiser, kind)
            net, vae_net = load_onnx(onnx_dir, denoiser, vae_path, kind, onnx_threads)
        settings = {
            "schedule": meta["schedule"],
            "sampler": meta.get("sampler", "ddim"),
            "sampler_kwargs": meta.get("sampler_kwargs"),
            "steps": meta.get("steps", 2),
            "guidance_scale": meta.get("guidance_scale", 1.0),
            "overlap": meta.get("overlap", 2),
            "image_size": meta.get("image_size") or vae_meta.get("image_size"),
        }
        if settings["image_size"] is None and overrides.get("image_size") is None:  # exports older than the field
            log.warning("%s and %s store no image size: assuming 64 px (pass image_size= if not)", denoiser, vae_path)
            settings["image_size"] = 64
        settings.update({k: v for k, v in overrides.items() if v is not None})
        pipe = cls(net, vae_net, **settings)
        pipe.source = (Path(denoiser), Path(vae_path), kind)
        return pipe

    # ---- inputs ---------------------------------------------------------------------------------------------
    def reference(
        self, image: str | Path | np.ndarray, detector: str | None = None
    ) -> tuple[ReferenceFace, torch.Tensor]:
        """The face crop of ``image`` (``detector``: auto | dlib | center; None: the pipeline's) and its latent."""
        detector = detector or self.detector
        face = prepare_reference(image, self.image_size, detector=detector, min_face_px=self.min_face_px)
        x = (
            torch.from_numpy(np.ascontiguousarray(face.crop).copy())
            .permute(2, 0, 1)
            .float()
            .div(127.5)
            .sub(1)
            .to(self.device)
        )
        with torch.inference_mode():
            return face, self.vae.to_latent(x[None])

    def conditions(
        self,
        wave: np.ndarray,
        f0: int,
        f1: int,
        total: int | None,
        timings: Timings,
        mel_mean: UtteranceMelMean | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio embeddings and viseme tokens for frames [f0, f1) from the samples around them.

        ``total`` is the utterance length in samples when known; frames past the audio see silence. ``mel_mean``
        (encoders built with ``mel_norm=utterance``) gives the mean log-mel of all the audio received so far.
        """
        start = time.perf_counter()
        s0 = max(0, f0 - MARGIN_FRAMES)
        b = min((f1 + MARGIN_FRAMES) * self.hop, total if total is not None else len(wave))
        mel = self.audio.log_mel(wave[s0 * self.hop : b])
        windows = self.audio.frame_windows(mel, f1 + MARGIN_FRAMES - s0)[None].to(self.device)
        mean = None if mel_mean is None else mel_mean(wave)[None].to(self.device)
        timings.add("audio_features", start)
        start = time.perf_counter()
        with torch.inference_mode():
            emb, logits = self.net.embed_audio(windows, mean)
        timings.add("audio_encoder", start)
        return emb[:, f0 - s0 : f1 - s0], logits[:, f0 - s0 : f1 - s0].argmax(-1)

    # ---- generation -----------------------------------------------------------------------------------------
    def frames(
        self,
        ref_latent: torch.Tensor,
        wave_source: Iterable[np.ndarray] | np.ndarray,
        visemes: np.ndarray | None = None,
        timings: Timings | None = None,
        pose: Callable[[int, int], np.ndarray] | None = None,
        lips: np.ndarray | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield uint8 ``[H,W,3]`` frames; ``wave_source`` is the whole 16 kHz waveform or an iterable of chunks.

        ``lips`` (``[frames, lip_dim]`` raw ``metrics.mouth.lip_shape`` values, nets built with ``lip_dim``) draws
        those lip shapes instead of the net's prediction from the audio (e.g. the truth's, to measure the renderer);
        a ``lip_relative`` net takes them relative to their own mean (and std), as the person's.

        ``pose(start, stop)`` gives the uint8 face crops ``[stop - start, H, W, 3]`` of the frames to re-voice (a
        driving video; nets built with a ``pose_mask`` keep all but the masked box of them); without it, such a net
        takes the reference as every frame's pose.

        Windows are placed by ``diffusion.sampling.next_window``, as offline generation places them: each starts
        ``overlap`` frames before the end of what exists, the last one is moved back to end on the last frame; the
        frames it overlaps are given as motion frames. Only the last ``window`` latents are kept.
        """
        timings = timings or Timings()
        clock = time.perf_counter()
        chunks = iter([wave_source]) if isinstance(wave_source, np.ndarray) else iter(wave_source)
        wave, ended, end = np.zeros(0, np.float32), False, 0
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        history = torch.zeros(1, 0, *self.latent_shape, device=self.device)  # latents of frames [end - len, end)
        person = None  # a lip_relative net: the given shapes' own statistics stand for the person's
        mel_mean = UtteranceMelMean(self.audio) if self.net.audio.config.get("mel_norm", "none") != "none" else None
        if lips is not None:
            from temposyncdiff.metrics.mouth import lip_stats

            person = torch.from_numpy(lip_stats(lips))
        while True:
            num_frames = num_output_frames(len(wave), self.audio.sample_rate, self.audio.fps) if ended else None
            if ended and end >= num_frames:
                return
            start, known = next_window(end, self.window, self.overlap, num_frames)
            stop = start + self.window
            if not ended and len(wave) < (stop + MARGIN_FRAMES) * self.hop:  # wait for more audio
                try:
                    wave = np.concatenate([wave, np.asarray(next(chunks), np.float32).reshape(-1)])
                except StopIteration:
                    ended = True
                continue
            emb, tokens = self.conditions(wave, start, stop, len(wave) if ended else None, timings, mel_mean)
            if visemes is not None:
                tokens = torch.from_numpy(_fit(visemes, start, stop))[None].to(self.device)
            motion = torch.zeros(1, self.window, *self.latent_shape, device=self.device)
            if known:
                motion[:, :known] = history[:, -known:]
            pose_latents = self._pose(pose, start, stop, timings) if pose is not None else None
            shapes = None
            if lips is not None:
                rows = np.asarray(lips[np.clip(np.arange(start, stop), 0, len(lips) - 1)], np.float32)
                shapes = self.net.standardize_lips(torch.from_numpy(rows)[None].to(self.device), person.to(self.device))
            latents = self._denoise(ref_latent, emb, tokens, motion, known, generator, timings, pose_latents, shapes)
            new_end = min(stop, num_frames) if ended else stop
            fresh = latents[:, known : new_end - start]
            history = torch.cat([history, fresh], dim=1)[:, -self.window :]
            t0 = time.perf_counter()
            with torch.inference_mode():
                images = self.vae.from_latent(fresh.flatten(0, 1))
            out = to_uint8(images)
            timings.add("decoder", t0)
            for frame in out:
                timings.frames += 1
                if timings.first_frame_s is None:
                    timings.first_frame_s = time.perf_counter() - clock
                yield frame
            end = new_end

    def _pose(
        self, pose: Callable[[int, int], np.ndarray], start: int, stop: int, timings: Timings
    ) -> torch.Tensor | None:
        """Latents ``[1, window, C, h, w]`` of the pose frames [start, stop) (the last one repeated past their end)."""
        if getattr(self.net, "pose_mask", None) is None:
            return None
        t0 = time.perf_counter()
        crops = np.asarray(pose(start, stop))
        crops = np.concatenate([crops, np.repeat(crops[-1:], stop - start - len(crops), axis=0)])
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        with torch.inference_mode():
            z = self.vae.to_latent(x)[None]
        timings.add("pose_encoder", t0)
        return z

    def _denoise(self, ref, emb, tokens, motion, known, generator, timings, pose=None, lips=None) -> torch.Tensor:
        start = time.perf_counter()
        mask = torch.zeros(1, self.window, dtype=torch.bool, device=self.device)
        mask[:, :known] = True
        cond = {"ref_latent": ref, "audio_emb": emb, "visemes": tokens, "motion": motion, "motion_mask": mask}
        if getattr(self.net, "pose_mask", None) is not None:  # without a driving video the photo gives every pose
            cond["pose"] = pose if pose is not None else ref[:, None].expand(-1, self.window, -1, -1, -1)
        if lips is not None:
            cond["lips"] = lips
        scheduler = make_sampler(self.sampler, self.schedule, **self.sampler_kwargs)
        with torch.inference_mode():
            x = sample(
                self.net,
                (1, self.window, *self.latent_shape),
                cond,
                scheduler,
                self.steps,
                self.guidance_scale,
                generator,
                self.device,
            )
        timings.add("denoiser", start)
        return x

    def generate(
        self, image: str | Path | np.ndarray, wave: np.ndarray, visemes: np.ndarray | None = None
    ) -> tuple[list[np.ndarray], dict]:
        """Offline: all frames (uint8) for the whole waveform, plus the timing report."""
        timings = Timings()
        face, ref = self.reference(image)
        frames = list(self.frames(ref, wave, visemes, timings))
        return frames, timings.report(len(wave) / self.audio.sample_rate) | {
            "face_box": list(face.box),
            "face_method": face.method,
        }


class UtteranceMelMean:
    """The mean log-mel ``[n_mels]`` of a waveform that may still grow (streamed chunks), for audio encoders built
    with ``mel_norm=utterance``. Given the whole waveform it is the utterance's mean, as in training; streamed, the
    mean of what has arrived. Whole ``block_s`` blocks are summed once; the rest is redone when the waveform grows.
    """

    def __init__(self, audio: AudioFeatures, block_s: float = 10.0) -> None:
        self.audio, self.block = audio, int(block_s * audio.sample_rate)
        self.done, self.count, self.sum = 0, 0, torch.zeros(audio.n_mels)
        self.last: tuple[int, torch.Tensor] | None = None

    def __call__(self, wave: np.ndarray) -> torch.Tensor:
        n = len(wave)
        if self.last is not None and self.last[0] == n:
            return self.last[1]
        while n - self.done >= 2 * self.block:  # the tail keeps at least one block
            mel = self.audio.log_mel(wave[self.done : self.done + self.block])
            self.sum, self.count, self.done = self.sum + mel.sum(1), self.count + mel.shape[1], self.done + self.block
        tail = self.audio.log_mel(wave[self.done : n])
        self.last = (n, (self.sum + tail.sum(1)) / (self.count + tail.shape[1]))
        return self.last[1]


def _fit(visemes: np.ndarray, a: int, b: int) -> np.ndarray:
    """visemes[a:b], padded with silence (0) past the end."""
    out = np.zeros(b - a, np.int64)
    part = visemes[a:b]
    out[: len(part)] = part
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded ``[N,3,H,W]`` images in [-1,1] -> uint8 ``[N,H,W,3]`` frames."""
    return ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def num_output_frames(num_samples: int, sample_rate: int = 16000, fps: float = 25.0) -> int:
    return max(1, int(round(num_samples * fps / sample_rate)))
