"""Inference precisions of the generation path's nets (audio encoder, denoiser, VAE decoder) and ``runtime=auto``.

Candidates (``CANDIDATES``), each a way to build the nets ``TalkingHeadPipeline`` calls:

- ``torch``: the float32 modules, eager (the reference every other candidate is checked against);
- ``bf16`` / ``fp16``: deep copies with bfloat16 / float16 weights and activations, convolutions channels-last;
  float inputs are cast on the way in (the timestep stays float32), outputs come back as float32 (fp16: CUDA only);
- ``onnx``: onnxruntime over tsd-export's float32 graphs (CPU);
- ``int8``: those graphs statically quantized by onnxruntime (QDQ, per-channel int8 weights, uint8 activations of
  Conv / MatMul / Gemm), calibrated on the inputs each graph sees while the float32 graphs generate the request's
  first window; kept under the cache folder (``int8/<export key>/``) for the next requests of the same export.

The VAE encoder (the reference and pose latents, once per request or window) stays the float32 one everywhere.

``runtime=auto`` generates the request's first window with every candidate (a warm-up call, then the median of
``repeats`` timed calls), rejects those whose frames fall below ``min_psnr`` dB PSNR against ``torch``'s, and picks
the fastest of the rest (``torch`` is always a candidate, so the pick is never slower than float32 eager as measured).
The choice is cached as JSON per machine (CPU model and flags or GPU, threads, torch and onnxruntime versions) and
model (sha256 of both weight files, sampling settings, candidates, bound) under ``$XDG_CACHE_HOME/temposyncdiff``
(``~/.cache/temposyncdiff``); an unreadable or foreign cache file is ignored and rewritten.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from temposyncdiff.errors import UserError
from temposyncdiff.inference.pipeline import MARGIN_FRAMES, TalkingHeadPipeline
from temposyncdiff.utils.io import atomic_path, file_sha256, write_json
from temposyncdiff.utils.timing import cpu_flags, device_name

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx", "bf16", "int8", "fp16")  # tsd-infer's runtime choices
DEFAULT_CANDIDATES = {"cpu": ("torch", "onnx", "bf16", "int8"), "cuda": ("torch", "bf16", "fp16")}
QUANTIZED = ("audio_encoder", "denoiser", "vae_decoder")  # the int8 graphs (the encoder stays float32)
Nets = tuple[nn.Module, nn.Module]  # (denoiser, vae) as TalkingHeadPipeline calls them


# ---- bf16 / fp16: the torch modules in a lower precision, channels-last -------------------------------------------
def _cast(x: Any, dtype: torch.dtype) -> Any:
    """A float tensor in ``dtype`` (4-D ones channels-last); anything else as it is."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x
    return x.to(dtype, memory_format=torch.channels_last) if x.ndim == 4 else x.to(dtype)


def _float(out: Any) -> Any:
    return tuple(_float(o) for o in out) if isinstance(out, tuple) else out.float().contiguous()


class LowPrecisionDenoiser(nn.Module):
    """A Denoiser copy in ``dtype``, channels-last: its call, ``embed_audio`` and ``standardize_lips`` in float32 out."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = copy.deepcopy(net).to(dtype, memory_format=torch.channels_last), dtype
        self.audio, self.window, self.pose_mask = self.net.audio, net.window, net.pose_mask

    def embed_audio(self, mel: Tensor, mel_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _float(self.net.embed_audio(_cast(mel, self.dtype), _cast(mel_mean, self.dtype)))

    def standardize_lips(self, lips: Tensor, person: Tensor | None = None) -> Tensor:
        return _float(self.net.standardize_lips(_cast(lips, self.dtype), _cast(person, self.dtype)))

    def forward(self, x_t: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # t stays float32
        args = tuple(_cast(a, self.dtype) for a in args)
        return _float(
            self.net(_cast(x_t, self.dtype), t, *args, **{k: _cast(v, self.dtype) for k, v in kwargs.items()})
        )


class LowPrecisionVAE(nn.Module):
    """``from_latent`` by a decoder copy in ``dtype``, channels-last; ``to_latent`` by the float32 VAE."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.vae, self.dtype = vae, dtype
        self.decoder = copy.deepcopy(vae.decoder).to(dtype, memory_format=torch.channels_last)
        self.downsample, self.latent_channels = vae.downsample, vae.latent_channels

    def to_latent(self, x: Tensor) -> Tensor:
        return self.vae.to_latent(x)

    def from_latent(self, z: Tensor) -> Tensor:  # FrameVAE.from_latent, the scale and clamp in float32
        return _float(self.decoder(_cast(z / self.vae.scale_factor, self.dtype))).clamp(-1, 1)


# ---- the request's first window, on which candidates are built (int8), checked and timed --------------------------
@dataclass
class Probe:
    """The float32 pipeline and the request's inputs: ``window(nets)`` generates the first window with ``nets``."""

    pipe: TalkingHeadPipeline
    ref: Tensor
    wave: np.ndarray
    visemes: np.ndarray | None = None
    onnx_dir: Path | None = None
    threads: int | None = None
    cache: Path | None = None  # where int8 graphs are kept (None: a temporary folder per request)
    keep: list = field(default_factory=list)  # temporary folders that live as long as the probe

    def window(self, nets: Nets) -> np.ndarray:
        """uint8 frames ``[window, H, W, 3]`` of the first window (fewer for shorter audio), as ``frames`` yields them."""
        pipe = copy.copy(self.pipe)
        pipe.net, pipe.vae = nets
        samples = self.wave[: (pipe.window + MARGIN_FRAMES) * pipe.hop]
        return np.stack(list(itertools.islice(pipe.frames(self.ref, samples, self.visemes), pipe.window)))


def _torch(probe: Probe) -> Nets:
    return probe.pipe.net, probe.pipe.vae


def _low_precision(dtype: torch.dtype) -> Callable[[Probe], Nets]:
    def build(probe: Probe) -> Nets:
        return LowPrecisionDenoiser(probe.pipe.net, dtype), LowPrecisionVAE(probe.pipe.vae, dtype)

    return build


def onnx_dir(probe: Probe) -> Path:
    """Where tsd-export's graphs of the pipeline's files are (``probe.onnx_dir``, else ``onnx/<kind>`` beside them)."""
    if probe.pipe.source is None:
        raise UserError("the ONNX runtimes need the pipeline's checkpoint files (TalkingHeadPipeline.from_checkpoints)")
    from temposyncdiff.export.onnx import default_onnx_dir

    checkpoint, _, kind = probe.pipe.source
    return Path(probe.onnx_dir) if probe.onnx_dir else default_onnx_dir(checkpoint, kind)


def _onnx(probe: Probe) -> Nets:
    from temposyncdiff.export.onnx import load_onnx

    graphs = onnx_dir(probe)
    checkpoint, vae, kind = probe.pipe.source
    return load_onnx(graphs, checkpoint, vae, kind, probe.threads)


# ---- int8: onnxruntime static quantization of the float32 graphs --------------------------------------------------
class _Recording:
    """An onnxruntime session that keeps every feed it runs (the calibration set)."""

    def __init__(self, session) -> None:
        self.session, self.feeds = session, []

    def run(self, names, feeds):
        self.feeds.append(feeds)
        return self.session.run(names, feeds)


def quantize_graphs(fp32_dir: Path, feeds: dict[str, list[dict]], out: Path) -> None:
    """``QUANTIZED`` graphs of ``fp32_dir`` -> int8 graphs in ``out``, calibrated on ``feeds`` (graph -> input dicts)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, items: list[dict]) -> None:
            self.items = iter(items)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory(prefix="tsd-int8-") as tmp:
        for name in QUANTIZED:
            pre = Path(tmp) / f"{name}.onnx"
            quant_pre_process(str(fp32_dir / f"{name}.onnx"), str(pre), skip_symbolic_shape=True)
            with atomic_path(out / f"{name}.onnx") as dst:
                quantize_static(
                    str(pre),
                    str(dst),
                    Reader(feeds[name]),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],  # elementwise ops with broadcast weights stay
                )


SESSIONS = {"audio_encoder": ("audio", "session"), "denoiser": (None, "session"), "vae_decoder": (None, "decoder")}


def _holder(nets: Nets, graph: str) -> tuple[Any, str]:
    """The stand-in (``export.onnx``'s OnnxDenoiser / OnnxVAE) holding ``graph``'s session, and its attribute name."""
    part, attr = SESSIONS[graph]
    holder = nets[1] if graph == "vae_decoder" else nets[0]
    return (getattr(holder, part) if part else holder), attr


def quantize_nets(nets: Nets, run: Callable[[Nets], Any], fp32_dir: Path, out: Path) -> dict[str, int]:
    """Calibrate on the feeds every ``QUANTIZED`` graph of the float32 stand-ins ``nets`` gets during ``run(nets)``
    and write their int8 graphs to ``out``; returns the calls seen per graph."""
    for graph in QUANTIZED:
        holder, attr = _holder(nets, graph)
        setattr(holder, attr, _Recording(getattr(holder, attr)))
    try:
        run(nets)
        feeds = {graph: getattr(*_holder(nets, graph)).feeds for graph in QUANTIZED}
    finally:
        for graph in QUANTIZED:
            holder, attr = _holder(nets, graph)
            setattr(holder, attr, getattr(holder, attr).session)
    quantize_graphs(fp32_dir, feeds, out)
    return {graph: len(f) for graph, f in feeds.items()}


def use_int8(nets: Nets, int8_dir: Path, threads: int | None) -> Nets:
    """The float32 stand-ins ``nets`` running ``int8_dir``'s graphs for ``QUANTIZED``."""
    from temposyncdiff.export.onnx import ort_session

    for graph in QUANTIZED:
        holder, attr = _holder(nets, graph)
        setattr(holder, attr, ort_session(int8_dir / f"{graph}.onnx", threads))
    return nets


def _int8(probe: Probe) -> Nets:
    """The float32 export's stand-ins with int8 graphs for ``QUANTIZED``, quantized on first use per export."""
    from temposyncdiff.export.onnx import SIDECAR

    nets, fp32_dir = _onnx(probe), onnx_dir(probe)
    sidecar = json.loads((fp32_dir / SIDECAR).read_text(encoding="utf-8"))
    key = _digest({k: sidecar[k]["sha256"] for k in ("checkpoint", "vae")} | {"opset": sidecar.get("opset")})
    if probe.cache is None:
        probe.keep.append(tempfile.TemporaryDirectory(prefix="tsd-int8-"))
        out = Path(probe.keep[-1].name)
    else:
        out = probe.cache / "int8" / key
    if not (out / "int8.json").is_file():  # calibrated on the float32 graphs' feeds for the request's first window
        calls = quantize_nets(nets, probe.window, fp32_dir, out)
        write_json(out / "int8.json", {"export": str(fp32_dir), "calibration_calls": calls})
    return use_int8(nets, out, probe.threads)


@dataclass(frozen=True)
class Candidate:
    devices: tuple[str, ...]  # device types it runs on
    build: Callable[[Probe], Nets]


CANDIDATES: dict[str, Candidate] = {
    "torch": Candidate(("cpu", "cuda"), _torch),
    "bf16": Candidate(("cpu", "cuda"), _low_precision(torch.bfloat16)),
    "fp16": Candidate(("cuda",), _low_precision(torch.float16)),
    "onnx": Candidate(("cpu",), _onnx),
    "int8": Candidate(("cpu",), _int8),
}


def check_runtime(runtime: str, device: str, candidates: list[str] | None) -> None:
    """A runtime (or auto's candidates) that cannot run on ``device``: one-line ``UserError``."""
    kind = torch.device(device).type
    if runtime != "auto" and kind not in CANDIDATES[runtime].devices:
        where = "device=cuda (a CUDA GPU)" if "cuda" in CANDIDATES[runtime].devices else "device=cpu"
        raise UserError(f"runtime={runtime} runs on {' or '.join(CANDIDATES[runtime].devices)}: use {where}")
    if runtime == "auto" and candidates is not None:
        if unknown := [c for c in candidates if c not in CANDIDATES]:
            raise UserError(f"runtime_candidates: unknown {unknown} (choose from {', '.join(CANDIDATES)})")
        if "torch" not in candidates:
            raise UserError("runtime_candidates: must include torch (the float32 reference auto checks against)")
        if other := [c for c in candidates if kind not in CANDIDATES[c].devices]:
            raise UserError(f"runtime_candidates: {', '.join(other)} cannot run on device={device}")


# ---- auto ---------------------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of uint8 frames ``a`` against ``b``; inf when equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def measure(name: str, run: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of ``repeats`` calls of ``run`` after a warm-up call, and the frames of the last."""
    frames = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        frames = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), frames


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "temposyncdiff"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_key(pipe: TalkingHeadPipeline, candidates: list[str], min_psnr: float) -> dict[str, Any]:
    """What a measured choice depends on: the machine, the model files, the sampling work and the rules."""
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    checkpoint, vae, _ = pipe.source
    return {
        "device": device_name(pipe.device),
        "cpu_flags": _digest(cpu_flags()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort,
        "checkpoint_sha256": file_sha256(checkpoint),
        "vae_sha256": file_sha256(vae),
        "work": [pipe.image_size, pipe.steps, pipe.sampler, pipe.guidance_scale],
        "candidates": list(candidates),
        "min_psnr": min_psnr,
    }


def read_cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached choice for ``key`` in ``path``, or None (missing; unreadable, foreign or corrupt: logged)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["key"] == key and entry["chosen"] in key["candidates"] and isinstance(entry["candidates"], dict):
            return entry
        reason = "made for another machine or model"
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
    log.warning("runtime cache %s ignored (%s); measuring again", path, " ".join(reason.split())[:200])
    return None


def choose(probe: Probe, candidates: list[str], min_psnr: float, repeats: int) -> tuple[dict[str, Any], Nets]:
    """Time every candidate on the first window; the fastest within ``min_psnr`` dB of ``torch``'s frames wins.

    Returns the choice (with every candidate's ms per frame and PSNR, or why it was out) and the chosen nets."""
    results: dict[str, dict[str, Any]] = {}
    built: dict[str, Nets] = {}
    reference = None
    for name in ["torch", *(c for c in candidates if c != "torch")]:
        try:
            built[name] = CANDIDATES[name].build(probe)
            seconds, frames = measure(name, lambda nets=built[name]: probe.window(nets), repeats)
        except (UserError, ImportError, RuntimeError, ValueError, OSError) as err:
            if name == "torch":
                raise
            results[name] = {"accepted": False, "reason": " ".join(f"{type(err).__name__}: {err}".split())[:300]}
            continue
        reference = frames if reference is None else reference
        db = psnr(frames, reference)
        ok = db >= min_psnr
        results[name] = {
            "ms_per_frame": round(1e3 * seconds / len(frames), 3),
            "psnr_db": None if db == float("inf") else round(db, 2),  # None: identical frames
            "accepted": ok,
        } | ({} if ok else {"reason": f"PSNR {db:.1f} dB < {min_psnr:g} dB against torch"})
    accepted = {n: r["ms_per_frame"] for n, r in results.items() if r["accepted"]}
    chosen = min(accepted, key=accepted.get)
    times = ", ".join(f"{n} {r.get('ms_per_frame', '-')} ms" for n, r in results.items())
    log.info("runtime=auto chose %s (ms per frame on the first window: %s)", chosen, times)
    reason = f"fastest of the {len(accepted)} candidates within {min_psnr:g} dB PSNR of torch on the first window"
    return {"chosen": chosen, "reason": reason, "candidates": results}, built[chosen]


def use_runtime(
    probe: Probe, runtime: str, candidates: list[str] | None = None, min_psnr: float = 40.0, repeats: int = 3
) -> dict[str, Any]:
    """Put ``runtime``'s nets into ``probe.pipe`` (auto: the cached or measured choice); returns what was done.

    The choice is cached in ``probe.cache`` (None: neither read nor written) when the pipeline knows its files."""
    pipe = probe.pipe
    if runtime != "auto":
        pipe.net, pipe.vae = CANDIDATES[runtime].build(probe)
        return {"requested": runtime, "chosen": runtime}
    candidates = list(candidates or DEFAULT_CANDIDATES[pipe.device.type])
    check_runtime("auto", str(pipe.device), candidates)
    path = key = None
    if probe.cache is not None and pipe.source is not None:
        key = cache_key(pipe, candidates, min_psnr)
        path = probe.cache / f"runtime-{_digest(key)}.json"
    entry = read_cached(path, key) if path else None
    if entry is not None:
        try:
            pipe.net, pipe.vae = CANDIDATES[entry["chosen"]].build(probe)
        except (UserError, ImportError, RuntimeError, OSError) as err:
            log.warning("runtime cache %s: %s no longer builds (%s); measuring again", path, entry["chosen"], err)
        else:
            kept = {k: entry[k] for k in ("chosen", "reason", "candidates", "date")}
            return {"requested": "auto", **kept, "cached": True, "cache_file": str(path)}
    choice, (pipe.net, pipe.vae) = choose(probe, candidates, min_psnr, repeats)
    choice["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if path is not None:
        write_json(path, {"key": key, **choice})
    return {"requested": "auto", **choice, "cached": False, "cache_file": None if path is None else str(path)}
