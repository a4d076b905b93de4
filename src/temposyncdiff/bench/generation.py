"""The generation path (audio features -> audio encoder -> sampler -> VAE decoder) timed per component and end
to end on one steady-state window, under each runtime in ``RUNTIMES``, with the decoded frames' PSNR against
eager float32's."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.diffusion.sampling import make_sampler, sample
from temposyncdiff.inference.pipeline import MARGIN_FRAMES
from temposyncdiff.inference.precision import psnr
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.vae import FrameVAE
from temposyncdiff.utils.timing import (
    autocast,
    count_flops,
    device_name,
    matmul_peak,
    num_threads,
    param_count,
    time_call,
)

COMPONENTS = ("audio_features", "audio_encoder", "denoiser", "decoder", "end_to_end")


# ---- runtimes ---------------------------------------------------------------------------------------------------
class Nets(NamedTuple):
    """The generation path's nets as callables: a runtime's stand-ins for the torch modules."""

    audio_encoder: Callable[[Tensor], tuple[Tensor, Tensor]]  # mel windows -> (embeddings, viseme logits)
    denoiser: Callable[..., Tensor]  # Denoiser.forward
    decoder: Callable[[Tensor], Tensor]  # FrameVAE.from_latent


def eager(path: GenerationPath) -> Nets:
    return Nets(path.net.embed_audio, path.net, path.vae.from_latent)


def compiled(path: GenerationPath) -> Nets:
    # fresh graphs for each setting: past dynamo's recompile limit a reused function falls back to eager silently
    torch._dynamo.reset()
    return Nets(*(torch.compile(fn) for fn in eager(path)))


def onnx(path: GenerationPath) -> Nets:
    """onnxruntime sessions (torch's current thread count) over graphs exported once per path (fp32 only)."""
    from temposyncdiff.export.onnx import TOLERANCE, export_nets, sessions

    if path.onnx_dir is None:
        path.onnx_dir = tempfile.TemporaryDirectory(prefix="tsd-bench-onnx-")
        path.onnx_meta = export_nets(path.net, path.vae, path.image_size, Path(path.onnx_dir.name), None, TOLERANCE, 0)
    net, vae = sessions(Path(path.onnx_dir.name), path.onnx_meta, torch.get_num_threads())
    return Nets(net.embed_audio, net, vae.from_latent)


def bf16(path: GenerationPath) -> Nets:
    """tsd-infer's runtime=bf16: bfloat16 weights and activations, channels-last (not autocast)."""
    from temposyncdiff.inference.precision import LowPrecisionDenoiser, LowPrecisionVAE

    net, vae = LowPrecisionDenoiser(path.net, torch.bfloat16), LowPrecisionVAE(path.vae, torch.bfloat16)
    return Nets(net.embed_audio, net, vae.from_latent)


def int8(path: GenerationPath) -> Nets:
    """tsd-infer's runtime=int8: onnx's graphs statically quantized, calibrated on one window of the path's inputs."""
    from temposyncdiff.export.onnx import sessions
    from temposyncdiff.inference.precision import quantize_nets, use_int8

    onnx(path)  # the float32 export
    graphs = Path(path.onnx_dir.name)
    threads = torch.get_num_threads()
    if not (graphs / "int8").is_dir():
        nets = sessions(graphs, path.onnx_meta, threads)
        calibration = path.inputs(1, torch.device("cpu"))
        run = lambda pair: path.end_to_end(Nets(pair[0].embed_audio, pair[0], pair[1].from_latent), calibration, 2)  # noqa: E731
        quantize_nets(nets, run, graphs, graphs / "int8")
    net, vae = use_int8(sessions(graphs, path.onnx_meta, threads), graphs / "int8", threads)
    return Nets(net.embed_audio, net, vae.from_latent)


# runtime name -> factory of the nets' callables, built once per setting (batch, dtype, threads)
RUNTIMES: dict[str, Callable[[GenerationPath], Nets]] = {
    "eager": eager,
    "compile": compiled,
    "onnx": onnx,
    "bf16": bf16,
    "int8": int8,
}
OWN_PRECISION = {
    "onnx": ("fp32", "float32 graphs"),
    "bf16": ("bf16", "a bfloat16 model"),
    "int8": ("int8", "int8 graphs"),
}
PSNR_COMPONENTS = ("decoder", "end_to_end")  # calls whose output is frames


# ---- the generation path ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    runtime: str
    dtype: str
    threads: int | None  # None: leave torch's threads as they are (CUDA)
    batch: int


class GenerationPath:
    """TalkingHeadPipeline's work for one steady-state window of ``batch`` streams, per component and end to end.

    A window covers the net's ``window`` frames, the first ``overlap`` known (the previous window's motion frames),
    so it yields ``window - overlap`` new frames per stream: per-frame numbers divide by those. Audio features
    span the window plus the pipeline's ``MARGIN_FRAMES`` on both sides, as ``TalkingHeadPipeline.conditions``;
    only the new frames are decoded. ``guidance_scale != 1`` makes two net calls per sampler step.
    """

    def __init__(
        self,
        net: Denoiser,
        vae: FrameVAE,
        schedule: dict,
        sampler: str = "ddim",
        sampler_kwargs: dict | None = None,
        guidance_scale: float = 1.0,
        overlap: int = 2,
        latent_size: int = 16,
    ) -> None:
        if net.audio is None:
            raise ValueError("the denoiser has no audio encoder")
        if not 0 <= overlap < net.window:
            raise ValueError(f"overlap {overlap} must be in [0, window={net.window})")
        self.net, self.vae, self.schedule, self.sampler = net.eval(), vae.eval(), dict(schedule), sampler
        self.sampler_kwargs, self.guidance_scale = dict(sampler_kwargs or {}), guidance_scale
        self.window, self.overlap, self.latent_size = net.window, overlap, latent_size
        self.image_size = latent_size * vae.downsample
        self.frames = self.window - overlap
        self.calls_per_step = 1 if guidance_scale == 1.0 else 2
        enc = net.audio.config
        self.features = AudioFeatures(n_mels=enc["n_mels"], window_frames=enc["window"])
        self.onnx_dir: tempfile.TemporaryDirectory | None = None  # the onnx (and int8) runtimes' export of these nets
        self.onnx_meta: dict[str, Any] = {}

    def params(self) -> dict[str, int]:
        audio = param_count(self.net.audio)
        out = {
            "audio_features": 0,
            "audio_encoder": audio,
            "denoiser": param_count(self.net) - audio,
            "decoder": param_count(self.vae.decoder),
        }
        return out | {"end_to_end": sum(out.values())}

    def mel_windows(self, wave: Tensor, device: torch.device) -> Tensor:
        """Waveforms ``[B, S]`` -> mel windows ``[B, window + 2 * margin, n_mels, W]`` on ``device``."""
        n = self.window + 2 * MARGIN_FRAMES
        return torch.stack([self.features.frame_windows(self.features.log_mel(w), n) for w in wave]).to(device)

    def conditions(self, nets: Nets, mel: Tensor) -> dict[str, Tensor]:
        emb, logits = nets.audio_encoder(mel)
        inner = slice(MARGIN_FRAMES, MARGIN_FRAMES + self.window)
        return {"audio_emb": emb[:, inner], "visemes": logits[:, inner].argmax(-1)}

    def decode(self, nets: Nets, latents: Tensor) -> Tensor:
        """Latents ``[N, C, h, w]`` -> uint8 frames ``[N, H, W, 3]`` on the CPU, as the pipeline hands them out."""
        images = nets.decoder(latents)
        return ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu()

    def inputs(self, batch: int, device: torch.device) -> dict[str, Any]:
        """Random waveform and latents of one window for ``batch`` streams (values do not change the timing)."""
        g = torch.Generator().manual_seed(0)
        c, s, t = self.vae.latent_channels, self.latent_size, self.window
        hop = int(round(self.features.sample_rate / self.features.fps))
        wave = 0.1 * torch.randn(batch, (t + 2 * MARGIN_FRAMES) * hop, generator=g)

        def latent(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device)

        mask = torch.zeros(batch, t, dtype=torch.bool, device=device)
        mask[:, : self.overlap] = True
        mel = self.mel_windows(wave, device)
        with torch.inference_mode():
            cond = self.conditions(eager(self), mel)
        cond = {"ref_latent": latent(batch, c, s, s), **cond, "motion": latent(batch, t, c, s, s), "motion_mask": mask}
        if getattr(self.net, "pose_mask", None) is not None:  # photo in: the pose latents are the reference's, given
            cond["pose"] = latent(batch, t, c, s, s)
        return {
            "wave": wave,
            "mel": mel,
            "x": latent(batch, t, c, s, s),
            "t": torch.full((batch,), 500, device=device),
            "cond": cond,
            "latents": latent(batch * self.frames, c, s, s),
            "generator": torch.Generator(device),
        }

    def end_to_end(self, nets: Nets, inp: dict[str, Any], steps: int) -> Tensor:
        """Features, audio encoder, ``steps`` sampler steps and the decoder for one window (new frames out)."""
        device = inp["x"].device
        cond = inp["cond"] | self.conditions(nets, self.mel_windows(inp["wave"], device))
        scheduler = make_sampler(self.sampler, self.schedule, **self.sampler_kwargs)
        x = sample(
            nets.denoiser,
            tuple(inp["x"].shape),
            cond,
            scheduler,
            steps,
            self.guidance_scale,
            inp["generator"].manual_seed(0),
            device,
        )
        return self.decode(nets, x[:, self.overlap :].flatten(0, 1))

    def calls(self, nets: Nets, inp: dict[str, Any], steps: list[int]) -> dict[tuple[str, int | None], Callable]:
        """Zero-argument calls keyed by (component, steps): one denoiser call, or one window end to end."""
        device = inp["x"].device
        return {
            ("audio_features", None): lambda: self.mel_windows(inp["wave"], device),
            ("audio_encoder", None): lambda: nets.audio_encoder(inp["mel"]),
            ("denoiser", None): lambda: nets.denoiser(inp["x"], inp["t"], **inp["cond"]),
            ("decoder", None): lambda: self.decode(nets, inp["latents"]),
            **{("end_to_end", n): functools.partial(self.end_to_end, nets, inp, n) for n in steps},
        }

    def flops_per_frame(self, steps: list[int], device: torch.device) -> dict[tuple[str, int | None], float]:
        """FLOPs per new frame of every call (batch 1, eager fp32); end to end is affine in the steps (counted at 1, 2)."""
        calls = self.calls(eager(self), self.inputs(1, device), [1, 2])
        counts = {k: count_flops(fn) for k, fn in calls.items()}
        one, two = counts.pop(("end_to_end", 1)), counts.pop(("end_to_end", 2))
        counts |= {("end_to_end", n): one + (n - 1) * (two - one) for n in steps}
        return {k: v / self.frames for k, v in counts.items()}


def bench_generation(
    model: str,
    path: GenerationPath,
    steps: list[int],
    plan: dict[Setting, list[str]],
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    peak_size: int = 1024,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time the components each setting of ``plan`` lists; returns (rows, skipped settings with their reasons).

    A runtime other than eager that fails on this machine (e.g. torch.compile without a working C++ compiler)
    is skipped for that setting with the error as reason; an eager failure is a bug and raises.
    """
    flops, params = path.flops_per_frame(steps, device), path.params()
    rows, skipped = [], []
    for setting, components in plan.items():
        with num_threads(setting.threads):
            threads = torch.get_num_threads()
            try:
                dtype, what = OWN_PRECISION.get(setting.runtime, (setting.dtype, ""))
                if setting.runtime in OWN_PRECISION and setting.dtype != "fp32":
                    raise ValueError(f"{setting.runtime} runs {what} only")
                inp = path.inputs(setting.batch, device)
                calls = path.calls(RUNTIMES[setting.runtime](path), inp, steps)
                with torch.inference_mode():
                    fp32 = {k: fn() for k, fn in path.calls(eager(path), inp, steps).items() if k[0] in PSNR_COMPONENTS}
                for (component, n), fn in calls.items():
                    if component not in components:
                        continue
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with torch.inference_mode(), autocast(device, setting.dtype):
                        stats = time_call(fn, device, warmup, repeats, budget_s)
                        db = (
                            psnr(fn().cpu().numpy(), fp32[component, n].cpu().numpy())
                            if component in PSNR_COMPONENTS
                            else None
                        )
                    ms = stats["median_ms"] / (setting.batch * path.frames)
                    peak = matmul_peak(str(device), dtype, setting.threads, peak_size)
                    gflops = flops[component, n] / ms / 1e6
                    calls_made = {"denoiser": 1, "end_to_end": (n or 0) * path.calls_per_step}.get(component)
                    rows.append(
                        {
                            "model": model,
                            "component": component,
                            "image_size": path.image_size,
                            "steps": n,
                            "net_calls": calls_made,
                            "runtime": setting.runtime,
                            "device": device_name(device),
                            "dtype": dtype,
                            "threads": threads,
                            "batch": setting.batch,
                            "frames": setting.batch * path.frames,
                            **stats,
                            "ms_per_frame": ms,
                            "fps": 1e3 / ms,
                            "rtf": ms * path.features.fps / 1e3,
                            "flops_per_frame": flops[component, n],
                            "gflops": gflops,
                            "peak_gflops": peak,
                            "peak_pct": 100 * gflops / peak,
                            "psnr_db": None if db in (None, float("inf")) else db,  # vs eager fp32; None: identical
                            "params": params[component],
                            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20
                            if device.type == "cuda"
                            else None,
                        }
                    )
                    log(f"{model} {component}{f'@{n}' if n else ''} {setting} {path.image_size} px: {ms:.3f} ms/frame")
            except Exception as err:
                if setting.runtime == "eager":
                    raise
                reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
                log(f"{model} {setting}: skipped ({reason})")
                skipped.append({"model": model, **dataclasses.asdict(setting), "reason": reason})
    return rows, skipped
