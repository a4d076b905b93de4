"""FID and FVD: the Fréchet distance between Gaussians fitted to network features of real and generated samples.

- ``frechet_distance``: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))``, the quantity pytorch-fid's
  ``calculate_frechet_distance`` and StyleGAN-V's ``compute_fvd`` compute, through symmetric eigensolvers (see the
  function). Covariances are unbiased (``np.cov``, as pytorch-fid and tfgan; StyleGAN-V divides by n, not n - 1).
- FID: Inception-v3 pool3 features (2048-D) of single frames, by torch-fidelity's ``FeatureExtractorInceptionV3``
  (the network torchmetrics' FID runs: uint8 input, TF1-style bilinear resize to 299, ``(x - 128) / 128``), from the
  FID weights ported from TensorFlow's 2015-12-05 Inception: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  or torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (same key names).
- FVD: I3D features (400-D, before the softmax) of non-overlapping 16-frame clips, by the TorchScript
  ``i3d_torchscript.pt`` of StyleGAN-V / fvd-comparison, called as StyleGAN-V calls it: uint8 ``[B,3,T,H,W]``,
  ``rescale=True`` (to [-1,1]), ``resize=True`` (to 224 x 224), ``return_features=True``. A TorchScript file carries
  code that runs in TorchScript's interpreter: load only files from a source you trust.

With fewer samples than feature dimensions the covariances are singular and the distance is biased upwards (not
comparable with published values): it is reported with a ``warning``; with fewer than 2 it is unavailable.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from temposyncdiff.metrics.identity import as_uint8_frames
from temposyncdiff.metrics.image import json_float, unavailable
from temposyncdiff.utils.io import file_record
from temposyncdiff.utils.weights import WeightsError, read_weights_only

FID_WEIGHTS_HINT = (
    "pt_inception-2015-12-05-6726825d.pth from "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
I3D_HINT = "i3d_torchscript.pt from https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt (StyleGAN-V's FVD)"
CLIP_FRAMES = 16


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D,D]`` of ``[N,D]`` features."""
    return features.mean(0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr sqrtm(S1 S2) is taken as the sum of the square roots of the eigenvalues of the symmetric S1^1/2 S2 S1^1/2
    (the same spectrum), so only symmetric eigensolvers run: on 2048-D covariances it matched pytorch-fid's
    ``scipy.linalg.sqrtm`` to 3e-8 relative in 2.0 s against 15.5 s (AMD EPYC, 2 cores). Eigenvalues that rounding
    leaves below zero count as zero, where sqrtm would give imaginary parts that pytorch-fid drops.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    spectrum = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(spectrum, 0, None)).sum())


def error_line(err: BaseException) -> str:
    """An error's message on one line: its first sentence, whitespace collapsed, at most 200 characters."""
    text = " ".join(str(err).split()).split(". ")[0]
    return (text[:197] + "...") if len(text) > 200 else text or type(err).__name__


def video_clips(frames: np.ndarray, length: int = CLIP_FRAMES) -> np.ndarray:
    """Non-overlapping ``length``-frame clips ``[K,length,H,W,3]`` from the start of ``[T,H,W,3]`` frames."""
    k = len(frames) // length
    return frames[: k * length].reshape(k, length, *frames.shape[1:])


def load_fid_inception(path: Path) -> nn.Module:
    """torch-fidelity's FID Inception-v3 holding the state dict at ``path``, read here weights-only.

    torch-fidelity's constructor ``torch.load``s what it is given with ``weights_only=False``: it gets an in-memory
    copy of the tensors read here, never the user's file.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError("FID needs torch-fidelity: pip install -e .[field]") from err
    state = read_weights_only(path, "FID Inception weights file")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (expected {FID_WEIGHTS_HINT})")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen keys
        raise WeightsError(f"{path}: weights do not fit the FID Inception-v3 ({error_line(err)})") from err


def load_i3d(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript I3D at ``path`` on the CPU, in eval mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable TorchScript file ({error_line(err)})") from err


class FrechetDistance(Metric):
    """Features of real and generated samples, ``update(real, fake)``, and their Fréchet distance, ``compute()``.

    ``compute()`` -> ``{"status": "ok", <key>: float, "num_real", "num_fake", "weights"}`` (+ ``"warning"`` when
    a side has fewer samples than feature dimensions), or an unavailable entry when the network file or its library
    is missing or a side has fewer than 2 samples. Subclasses set ``key``, ``samples``, ``what``, ``hint`` and
    define ``load`` and ``features``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    key = samples = what = hint = ""

    def __init__(self, path: str | os.PathLike, batch_size: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")
        self.path, self.batch_size = Path(path), int(batch_size)
        self.weights, self.reason, self.net = file_record(self.path), "", None
        if not self.path.is_file():
            self.reason = f"{self.path}: {self.what} not found ({self.hint})"
            return
        try:
            self.net = self.load(self.path)
        except ImportError as err:
            self.reason = str(err)

    def load(self, path: Path) -> nn.Module:
        """The feature network in eval mode; ``WeightsError`` when the file holds no such network."""
        raise NotImplementedError

    def features(self, frames: Tensor | np.ndarray) -> Tensor:
        """``[N,D]`` float64 features of one video's samples (N may be 0)."""
        raise NotImplementedError

    def update(self, real: Tensor | np.ndarray, fake: Tensor | np.ndarray) -> None:
        """Add one real and one generated video (frames as ``metrics.image.to_unit`` accepts; no-op when
        unavailable)."""
        if self.net is None:
            return
        with torch.no_grad():
            for state, video in ((self.real, real), (self.fake, fake)):
                feats = self.features(video)
                if len(feats):
                    state.append(feats)

    def compute(self) -> dict[str, Any]:
        """Plain floats / ints for the eval report."""
        if self.net is None:
            return unavailable(self.reason)
        real, fake = (dim_zero_cat(s).cpu().numpy() if s else np.zeros((0, 0)) for s in (self.real, self.fake))
        n, dim = min(len(real), len(fake)), real.shape[1]
        if n < 2:
            return unavailable(
                f"{self.key.upper()} needs at least 2 real and 2 generated {self.samples}: "
                f"got {len(real)} and {len(fake)}"
            )
        out = {
            "status": "ok",
            self.key: json_float(frechet_distance(*gaussian(real), *gaussian(fake))),
            "num_real": len(real),
            "num_fake": len(fake),
            "weights": self.weights,
        }
        if n < dim:
            out["warning"] = (
                f"{n} {self.samples} < {dim} feature dimensions: singular covariances, {self.key.upper()} biased "
                "upwards and not comparable with published values"
            )
        return out


class FrechetInceptionDistance(FrechetDistance):
    """FID between real and generated frames (every frame a sample); ``weights_path``: the FID Inception file."""

    key, samples, what, hint = "fid", "frames", "FID Inception weights", FID_WEIGHTS_HINT

    def __init__(self, weights_path: str | os.PathLike, batch_size: int = 16, **kwargs: Any) -> None:
        super().__init__(weights_path, batch_size, **kwargs)

    def load(self, path: Path) -> nn.Module:
        """torch-fidelity's Inception with the file's weights."""
        return load_fid_inception(path)

    def features(self, frames: Tensor | np.ndarray) -> Tensor:
        """``[N,2048]`` pool3 features of ``N`` frames (uint8 in, resized to 299 inside the network)."""
        x = torch.from_numpy(as_uint8_frames(frames)).permute(0, 3, 1, 2).to(self.device)
        return torch.cat([self.net(x[i : i + self.batch_size])[0] for i in range(0, len(x), self.batch_size)]).double()


class FrechetVideoDistance(FrechetDistance):
    """FVD between real and generated videos: every non-overlapping 16-frame clip a sample (videos, real or generated,
    shorter than 16 frames give none; ``compute()`` counts them as ``short_videos``); ``torchscript_path``:
    ``i3d_torchscript.pt``."""

    key, samples, what, hint = "fvd", "clips", "I3D TorchScript file", I3D_HINT

    def __init__(self, torchscript_path: str | os.PathLike, batch_size: int = 4, **kwargs: Any) -> None:
        super().__init__(torchscript_path, batch_size, **kwargs)
        self.add_state("short_videos", default=torch.tensor(0), dist_reduce_fx="sum")

    def load(self, path: Path) -> nn.Module:
        """The TorchScript I3D."""
        return load_i3d(path)

    def features(self, frames: Tensor | np.ndarray) -> Tensor:
        """``[K,D]`` I3D features of a video's ``K`` clips."""
        clips = torch.from_numpy(video_clips(as_uint8_frames(frames))).permute(0, 4, 1, 2, 3).to(self.device)
        self.short_videos += len(clips) == 0  # [K,3,16,H,W]; K = 0: shorter than a clip
        out = [
            self.net(clips[i : i + self.batch_size], rescale=True, resize=True, return_features=True)
            for i in range(0, len(clips), self.batch_size)
        ]
        if not out:
            return torch.zeros(0, 0, dtype=torch.float64)
        feats = torch.cat(out)
        if feats.ndim != 2 or len(feats) != len(clips):
            raise WeightsError(f"{self.path}: returned {tuple(feats.shape)} for {len(clips)} clips, not [clips, D]")
        return feats.double()

    def compute(self) -> dict[str, Any]:
        """The base result plus ``short_videos`` when available."""
        out = super().compute()
        return out if self.net is None else out | {"short_videos": int(self.short_videos)}
