"""ONNX export of the inference nets (``tsd-export``) and onnxruntime stand-ins for them (``tsd-infer runtime=onnx``).

From the weights-only exports (``<stage>_best.pt`` + ``vae_pretrained.pt``) four graphs go to ``out_dir``:

- ``denoiser.onnx``: one sampler step's net call for a window of ``window`` frames, dynamic batch. Inputs
  x_t, t (float), ref_latent, audio_emb, visemes, motion, motion_mask and drop_cond, the Denoiser's flag that
  swaps audio and visemes for the null tokens: the unconditional branch of classifier-free guidance;
- ``audio_encoder.onnx``: mel windows ``[B, frames, n_mels, W]`` -> (embeddings, viseme logits), dynamic B and frames
  (windows as the encoder reads them: ``OnnxAudioEncoder`` first applies its ``mel_norm``);
- ``vae_encoder.onnx`` / ``vae_decoder.onnx``: ``to_latent`` / ``from_latent`` at the export's image size, dynamic batch.

``export.json`` (written last) records the sha256 of both source files, the graphs' input shapes, the opset
and each graph's max abs difference from PyTorch on random inputs of several batch (and frame) sizes; the
export fails above ``tolerance``. The runtime refuses graphs whose recorded sha256 differ from the .pt files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from temposyncdiff.errors import UserError
from temposyncdiff.nets.audio_encoder import normalize_mel
from temposyncdiff.utils.io import atomic_path, file_sha256, write_json
from temposyncdiff.utils.weights import load_net

TOLERANCE = 1e-4  # max abs difference from PyTorch (float32) an exported graph may show
GRAPHS = ("vae_encoder", "vae_decoder", "audio_encoder", "denoiser")
SIDECAR = "export.json"
EXPORT_AGAIN = "run tsd-export again"


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("the ONNX runtime needs onnxruntime: pip install 'temposyncdiff[export]'") from None
    return onnxruntime


class _Method(nn.Module):
    """``module.<name>(*args)`` as a forward, which is what torch.onnx.export traces."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args: Tensor) -> Any:
        return getattr(self.module, self.name)(*args)


def _graphs(net: nn.Module, vae: nn.Module, image_size: int, seed: int) -> dict[str, tuple]:
    """Per graph: (traced module, input sets (the first is the export example), dynamic axes, output names).

    Input names follow the traced method's positional arguments. Examples have batch 2 (a size-1 example
    would be specialised by torch.export); the other sets check other batch and frame counts.
    """
    g = torch.Generator().manual_seed(seed)
    c, s, t = vae.latent_channels, image_size // vae.downsample, net.window
    enc = net.audio.config

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g)

    def step(b: int) -> dict[str, Tensor]:
        inputs = {
            "x_t": randn(b, t, c, s, s),
            "t": torch.rand(b, generator=g) * 1000,
            "ref_latent": randn(b, c, s, s),
            "audio_emb": randn(b, t, enc["dim"]),
            "visemes": torch.randint(0, net.num_visemes, (b, t), generator=g),
            "motion": randn(b, t, c, s, s),
            "motion_mask": torch.rand(b, t, generator=g) < 0.5,
            "drop_cond": torch.arange(b) % 2 == 1,
        }
        if net.pose_mask is not None:  # the forward's next positional argument
            inputs["pose"] = randn(b, t, c, s, s)
        return inputs

    batch, steps = {0: "batch"}, [step(b) for b in (2, 1, 3)]
    return {
        "vae_encoder": (
            _Method(vae, "to_latent"),
            [{"frames": randn(b, 3, image_size, image_size).tanh()} for b in (2, 1, 3)],
            {"frames": batch},
            ["latents"],
        ),
        "vae_decoder": (
            _Method(vae, "from_latent"),
            [{"latents": randn(b, c, s, s)} for b in (2, 1, 3)],
            {"latents": batch},
            ["frames"],
        ),
        "audio_encoder": (
            _Method(net.audio, "encode"),  # on normalised windows: OnnxAudioEncoder applies the encoder's mel_norm
            [{"mel": randn(b, n, enc["n_mels"], enc["window"])} for b, n in ((2, 20), (1, 1), (1, 37))],
            {"mel": {0: "batch", 1: "frames"}},
            ["audio_emb", "viseme_logits"],
        ),
        "denoiser": (_Method(net, "forward"), steps, {k: batch for k in steps[0]}, ["prediction"]),
    }


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session of the graph at ``path`` on ``threads`` intra-op threads (None: its default)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads or 0, 1  # 0: onnxruntime's default
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, inputs: dict[str, Tensor]) -> list[Tensor]:
    return [torch.from_numpy(o) for o in session.run(None, {k: v.detach().cpu().numpy() for k, v in inputs.items()})]


def export_onnx(
    checkpoint: str | os.PathLike,
    vae: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "student",
    opset: int | None = None,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Export, verify against PyTorch and write the four graphs + ``export.json`` to ``out_dir``; returns the sidecar."""
    _ort()
    sources = {
        "checkpoint": {"path": str(checkpoint), "sha256": file_sha256(checkpoint)},
        "vae": {"path": str(vae), "sha256": file_sha256(vae)},
    }
    net, meta = load_net(checkpoint, kind)
    vae_net, vae_meta = load_net(vae, "vae")
    if net.audio is None:
        raise UserError(f"{checkpoint}: the denoiser has no audio encoder to export")
    image_size = meta.get("image_size") or vae_meta.get("image_size", 64)
    out = Path(out_dir)
    (out / SIDECAR).unlink(missing_ok=True)  # a partial export must not pass for a complete one
    sidecar = {"stage": kind, **sources, **export_nets(net, vae_net, image_size, out, opset, tolerance, seed)}
    write_json(out / SIDECAR, sidecar)
    return sidecar


def export_nets(
    net: nn.Module, vae: nn.Module, image_size: int, out: Path, opset: int | None, tolerance: float, seed: int
) -> dict[str, Any]:
    """Write the four verified graphs of ``net`` + ``vae`` to ``out``; returns what the sidecar records of them."""
    graphs: dict[str, Any] = {}
    for name, (module, examples, axes, outputs) in _graphs(net, vae, image_size, seed).items():
        dims: dict[str, Dim] = {}
        shapes = tuple({i: dims.setdefault(d, Dim(d)) for i, d in axes[k].items()} for k in examples[0])
        program = torch.onnx.export(
            module.eval(),
            tuple(examples[0].values()),
            input_names=list(examples[0]),
            output_names=outputs,
            dynamic_shapes=(shapes,),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        with atomic_path(out / f"{name}.onnx") as tmp:
            program.save(tmp, external_data=False)
            session = ort_session(tmp, torch.get_num_threads())
            diff = 0.0
            with torch.inference_mode():
                for inputs in examples:
                    expected = module(*inputs.values())
                    expected = expected if isinstance(expected, tuple) else (expected,)
                    diff = max([diff] + [(a - b).abs().max().item() for a, b in zip(_run(session, inputs), expected)])
            if diff > tolerance:
                raise UserError(
                    f"{name}.onnx differs from PyTorch by {diff:.3g} > tolerance={tolerance:g}; export incomplete"
                )
        graphs[name] = {
            "file": f"{name}.onnx",
            "max_abs_diff": diff,
            "outputs": outputs,
            "inputs": {i.name: i.shape for i in session.get_inputs()},
        }
    return {
        "opset": next(o.version for o in program.model_proto.opset_import if o.domain == ""),
        "tolerance": tolerance,
        "torch": torch.__version__,
        "onnxruntime": _ort().__version__,
        "image_size": image_size,
        "window": net.window,
        "audio_encoder": net.audio.config,
        "downsample": vae.downsample,
        "latent_channels": vae.latent_channels,
        "graphs": graphs,
        "pose_mask": None if net.pose_mask is None else list(net.pose_mask),
    }


# ---- runtime: onnxruntime sessions that look like the torch modules TalkingHeadPipeline calls ------------------


class OnnxAudioEncoder(nn.Module):
    def __init__(self, session, config: dict) -> None:
        super().__init__()
        self.session, self.config = session, config

    def forward(self, mel: Tensor, mel_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mel = normalize_mel(mel.float(), self.config.get("mel_norm", "none"), mel_mean)
        emb, logits = _run(self.session, {"mel": mel})
        return emb, logits


class OnnxDenoiser(nn.Module):
    """The Denoiser's call signature (and ``embed_audio``) over the exported graphs; CPU torch tensors in and out."""

    def __init__(self, session, audio: OnnxAudioEncoder, window: int, pose_mask: list[float] | None) -> None:
        super().__init__()
        self.session, self.audio, self.window = session, audio, window
        self.pose_mask = None if pose_mask is None else tuple(pose_mask)  # as Denoiser.pose_mask (from the sidecar)

    def embed_audio(self, mel: Tensor, mel_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.audio(mel, mel_mean)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        ref_latent: Tensor,
        audio_emb: Tensor | None = None,
        visemes: Tensor | None = None,
        motion: Tensor | None = None,
        motion_mask: Tensor | None = None,
        pose: Tensor | None = None,
        lips: Tensor | None = None,
    ) -> Tensor:
        b, n = x_t.shape[:2]
        if lips is not None:
            raise ValueError("the ONNX denoiser predicts lip shapes itself (graphs take no lips input)")
        if (audio_emb is None) != (visemes is None):
            raise ValueError("the ONNX denoiser drops audio and visemes together (both None or neither)")
        drop = audio_emb is None  # the null tokens: classifier-free guidance's unconditional branch
        inputs = {
            "x_t": x_t.float(),
            "t": t.float().expand(b),
            "ref_latent": ref_latent.float(),
            "audio_emb": x_t.new_zeros(b, n, self.audio.config["dim"]) if drop else audio_emb.float(),
            "visemes": torch.zeros(b, n, dtype=torch.long) if drop else visemes.long(),
            "motion": torch.zeros_like(x_t) if motion is None else motion.float(),
            "motion_mask": torch.zeros(b, n, dtype=torch.bool) if motion_mask is None else motion_mask.bool(),
            "drop_cond": torch.full((b,), drop),
        }
        if self.pose_mask is not None:
            inputs["pose"] = pose.float()
        return _run(self.session, inputs)[0]


class OnnxVAE(nn.Module):
    def __init__(self, encoder, decoder, downsample: int, latent_channels: int) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.downsample, self.latent_channels = downsample, latent_channels

    def to_latent(self, x: Tensor) -> Tensor:
        return _run(self.encoder, {"frames": x.float()})[0]

    def from_latent(self, z: Tensor) -> Tensor:
        return _run(self.decoder, {"latents": z.float()})[0]


def default_onnx_dir(checkpoint: str | os.PathLike, stage: str) -> Path:
    """Where tsd-export puts a stage's graphs unless told: ``onnx/<stage>`` beside its checkpoint."""
    return Path(checkpoint).with_name("onnx") / stage


def load_onnx(
    onnx_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    vae: str | os.PathLike,
    kind: str = "student",
    threads: int | None = None,
) -> tuple[OnnxDenoiser, OnnxVAE]:
    """Sessions for an export of ``checkpoint`` + ``vae``; UserError if it is missing or made from other weights."""
    _ort()
    onnx_dir = Path(onnx_dir)
    redo = f"run `tsd-export stage={kind} checkpoint={checkpoint} vae={vae} out_dir={onnx_dir}`"
    missing = [n for n in (SIDECAR, *(f"{g}.onnx" for g in GRAPHS)) if not (onnx_dir / n).is_file()]
    if missing:
        raise UserError(f"{onnx_dir}: no complete ONNX export (missing {', '.join(missing)}); {redo}")
    try:
        meta = json.loads((onnx_dir / SIDECAR).read_text(encoding="utf-8"))
        recorded = {key: meta[key]["sha256"] for key in ("checkpoint", "vae")}
    except (ValueError, KeyError, TypeError) as err:  # ValueError: not JSON or not UTF-8
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UserError(f"{onnx_dir / SIDECAR}: not a readable export sidecar ({reason}); {redo}") from err
    for key, path in (("checkpoint", checkpoint), ("vae", vae)):
        if recorded[key] != file_sha256(path):
            raise UserError(f"{onnx_dir}: stale ONNX export (made from another {Path(path).name}); {redo}")
    return sessions(onnx_dir, meta, threads)


def sessions(onnx_dir: Path, meta: dict[str, Any], threads: int | None = None) -> tuple[OnnxDenoiser, OnnxVAE]:
    """The torch-module stand-ins over the graphs in ``onnx_dir`` (``meta``: what ``export_nets`` returned)."""
    s = {}
    for g in GRAPHS:
        try:
            s[g] = ort_session(onnx_dir / f"{g}.onnx", threads)
        except UserError:
            raise
        except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
            reason = " ".join(str(err).split())[:300]
            raise UserError(f"{onnx_dir / g}.onnx: not a loadable ONNX graph ({reason}); {EXPORT_AGAIN}") from err
    if missing := [
        k for k in ("audio_encoder", "window", "downsample", "latent_channels", "pose_mask") if k not in meta
    ]:
        raise UserError(f"{onnx_dir / SIDECAR}: incomplete export sidecar (no {', '.join(missing)}); {EXPORT_AGAIN}")
    audio = OnnxAudioEncoder(s["audio_encoder"], meta["audio_encoder"])
    return (
        OnnxDenoiser(s["denoiser"], audio, meta["window"], meta["pose_mask"]),
        OnnxVAE(s["vae_encoder"], s["vae_decoder"], meta["downsample"], meta["latent_channels"]),
    )
