"""Identity preservation: cosine similarity of dlib's 128-D face descriptors, reference vs each frame.

The model files come from the ``face_recognition_models`` package (``pip install -e .[faces]``), located
without importing it, or from a configured ``weights_dir``. Without dlib or the files the metric reports
``{"status": "unavailable", "reason": ...}`` instead of numbers.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from temposyncdiff.data.faces import FaceDetector
from temposyncdiff.metrics.image import json_float, to_unit, unavailable

RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"
# Face box that data.faces.square_crop_box (margin 0.5, lift 0.1) leaves in a face-centred crop.
CROP_FACE_BOX = (0.25, 0.3, 0.75, 0.8)


def default_weights_dir() -> Path | None:
    """``models/`` of the installed ``face_recognition_models`` package (not imported), or None."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def dlib_models(weights_dir: str | os.PathLike | None, *names: str) -> tuple[Any, Path]:
    """The ``dlib`` module and the folder holding model files ``names`` (``weights_dir``, else ``default_weights_dir``).

    Raises ImportError / FileNotFoundError with the fix in the message; callers report it as "unavailable".
    """
    try:
        import dlib
    except ImportError as err:
        raise ImportError("dlib face models need dlib: pip install -e .[faces]") from err
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    if folder is None:
        raise FileNotFoundError("face_recognition_models is not installed (pip install -e .[faces]); set weights_dir")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing face model file(s) {', '.join(missing)}")
    return dlib, folder


def as_uint8_frames(frames: Tensor | np.ndarray) -> np.ndarray:
    """``[T,H,W,3]`` uint8 RGB from anything ``to_unit`` accepts (a single image gets T = 1)."""
    x = frames if isinstance(frames, Tensor) else torch.tensor(np.ascontiguousarray(frames))
    if x.ndim == 3:
        x = x[None]
    return to_unit(x).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class FaceEmbedder:
    """dlib's 128-D face descriptor of the largest face in an image (HOG detector + 5-point landmarks).

    When the detector finds no face (common below ~80 px), the image is taken as a face-centred crop and
    ``fallback_box`` (fractions; default: where ``square_crop_box`` puts the face) is used instead;
    ``fallbacks`` counts those images. On a 160 px grace_hopper crop that box gives cosine 0.999 to the
    detected-box embedding, the whole frame only 0.87.
    """

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        fallback_box: Sequence[float] = CROP_FACE_BOX,
        detector: FaceDetector | None = None,
    ) -> None:
        dlib, folder = dlib_models(weights_dir, SHAPE_MODEL, RECOGNITION_MODEL)
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(folder / SHAPE_MODEL))
        self._net = dlib.face_recognition_model_v1(str(folder / RECOGNITION_MODEL))
        self._detector = detector or FaceDetector()
        self.fallback_box = tuple(float(v) for v in fallback_box)
        self.fallbacks = 0

    def embed(self, image: np.ndarray) -> np.ndarray:
        """Descriptor ``[128]`` (float64) of an ``[H,W,3]`` uint8 RGB image."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an [H,W,3] uint8 RGB image, got {image.dtype} {image.shape}")
        image = np.ascontiguousarray(image)
        box = self._detector.detect(image)
        if box is None:
            self.fallbacks += 1
            h, w = image.shape[:2]
            box = tuple(round(f * s) for f, s in zip(self.fallback_box, (w, h, w, h)))
        shape = self._shape(image, self._dlib.rectangle(box[0], box[1], box[2] - 1, box[3] - 1))
        return np.asarray(self._net.compute_face_descriptor(image, shape), dtype=np.float64)


class IdentitySimilarity(Metric):
    """Cosine similarity between a reference face and every generated frame: ``update(reference, frames)``.

    ``reference`` is one image (``[3,H,W]`` in [-1,1] or ``[H,W,3]`` uint8), ``frames`` a video (see
    ``metrics.image.to_unit``). ``compute()`` -> ``{"status": "ok", "mean", "min", "mean_distance",
    "same_face_frac", "num_frames", "num_fallbacks"}`` (None before any frame), or an unavailable entry when dlib
    or the model files are missing. dlib descriptors of different people still have cosine ~0.85, so also
    reported: the Euclidean distance and the fraction of frames below dlib's same-person threshold (0.6).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        embedder: FaceEmbedder | None = None,
        same_threshold: float = 0.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.add_state("similarities", default=[], dist_reduce_fx="cat")
        self.add_state("distances", default=[], dist_reduce_fx="cat")
        self.add_state("num_fallbacks", default=torch.tensor(0), dist_reduce_fx="sum")
        self.same_threshold = same_threshold
        self.embedder, self.reason = embedder, ""
        if embedder is None:
            try:
                self.embedder = FaceEmbedder(weights_dir)
            except (ImportError, OSError, RuntimeError) as err:
                self.reason = str(err)

    def update(self, reference: Tensor | np.ndarray, frames: Tensor | np.ndarray) -> None:
        """Score one clip against its reference image (no-op when unavailable)."""
        if self.embedder is None:
            return
        before = self.embedder.fallbacks
        ref = self.embedder.embed(as_uint8_frames(reference)[0])
        emb = np.stack([self.embedder.embed(f) for f in as_uint8_frames(frames)])
        cos = emb @ ref / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref))
        self.similarities.append(torch.from_numpy(cos).to(self.device))
        self.distances.append(torch.from_numpy(np.linalg.norm(emb - ref, axis=1)).to(self.device))
        self.num_fallbacks += self.embedder.fallbacks - before

    def compute(self) -> dict[str, Any]:
        """Plain floats / ints for the eval report."""
        if self.embedder is None:
            return unavailable(self.reason)
        s = dim_zero_cat(self.similarities) if self.similarities else torch.zeros(0, dtype=torch.float64)
        d = dim_zero_cat(self.distances) if self.distances else s
        return {
            "status": "ok",
            "mean": json_float(s.mean()),  # NaN -> None when empty
            "min": json_float(s.min()) if len(s) else None,
            "mean_distance": json_float(d.mean()),
            "same_face_frac": json_float((d < self.same_threshold).double().mean()),
            "num_frames": len(s),
            "num_fallbacks": int(self.num_fallbacks),
        }
