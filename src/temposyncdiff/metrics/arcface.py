"""CSIM: cosine similarity of ArcFace embeddings (insightface's recognition models), reference face vs each frame.

Protocol as insightface's ``ArcFaceONNX`` and ``face_align.norm_crop`` (python-package/insightface): five landmarks
(eye centres, nose tip, mouth corners; the image-left one of each pair first) mapped onto the 112 x 112 ArcFace
template by a least-squares similarity transform (Umeyama, as skimage's ``SimilarityTransform.estimate``), a bilinear
warp with black borders (``cv2.warpAffine``'s defaults), RGB NCHW float input ``(x - 127.5) / 127.5``, or raw 0-255
for graphs converted from MXNet (recognised as insightface does: a Sub and a Mul node among the first 8). The
embedding is the graph's single output; CSIM is its cosine to the reference's.

Landmarks: dlib's 68 points (``metrics.mouth.LipLandmarks``, the frame upsampled as for the lip metric) in the
largest face dlib's HOG detector finds; where it finds none, in the face box a prepared crop has
(``metrics.identity.CROP_FACE_BOX``), counted as a fallback. Model files (not downloadable here):
``w600k_r50.onnx`` from insightface's buffalo_l pack or ``glintr100.onnx`` from antelopev2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from temposyncdiff.data.faces import FaceDetector
from temposyncdiff.metrics.identity import CROP_FACE_BOX, as_uint8_frames
from temposyncdiff.metrics.image import json_float, unavailable
from temposyncdiff.metrics.mouth import LipLandmarks
from temposyncdiff.utils.io import file_record
from temposyncdiff.utils.weights import WeightsError

ALIGNED_SIZE = 112
# insightface's arcface_src (utils/face_align.py): left eye, right eye, nose tip, left and right mouth corner (image x)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
MODEL_HINT = (
    "insightface's w600k_r50.onnx from https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
    " (or glintr100.onnx from antelopev2)"
)


def five_points(points: np.ndarray) -> np.ndarray:
    """``[5,2]`` ArcFace landmarks from dlib's ``[68,2]``: eye centres (36-41, 42-47), nose tip (30), mouth corners."""
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``[2,3]`` scale-rotation-translation mapping points ``src`` onto ``dst`` (``[K,2]``) in the least-squares
    sense (Umeyama 1991, with scale; no reflection)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.array([1.0, np.sign(np.linalg.det(u @ vt))])  # det(u vt) is +-1; -1: a reflection, undone
    rotation = u @ np.diag(sign) @ vt
    scale = (sv * sign).sum() / s.var(0).sum()
    return np.concatenate([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]], axis=1)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """``[size,size,3]`` uint8: output pixel p samples ``image`` (uint8 ``[H,W,3]``) at ``matrix^-1 p``, bilinear,
    zeros outside; pixel centres at integer coordinates (``cv2.warpAffine``'s convention)."""
    h, w = image.shape[:2]
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    src = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T  # [size,size,2] (x, y) in the image
    grid = torch.from_numpy(2 * src / [max(w - 1, 1), max(h - 1, 1)] - 1).float()[None]
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def align_face(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 112 x 112 ArcFace crop of ``image`` whose five landmarks ``points`` (``[5,2]``) land on the template."""
    return warp_affine(image, similarity_transform(points, ARCFACE_TEMPLATE))


def normalises_itself(node_names: Sequence[str]) -> bool:
    """Whether a recognition graph converted from MXNet scales its own input: insightface's test, a Sub and a Mul
    node among the first 8 (``node_names``); such graphs take raw 0-255 pixels."""
    first = node_names[:8]
    return any(n.startswith(("Sub", "_minus")) for n in first) and any(n.startswith(("Mul", "_mul")) for n in first)


def cosine_similarity(reference: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """``[N]`` cosines between one ``[D]`` embedding and ``[N,D]`` others."""
    return embeddings @ reference / (np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference))


class ArcFaceEmbedder:
    """ArcFace embeddings of faces in uint8 RGB frames: dlib landmarks, alignment, one onnxruntime session (CPU).

    Raises ImportError (onnx / onnxruntime / dlib missing), FileNotFoundError (model or dlib files missing) and
    ``WeightsError`` for a model file that is no readable ArcFace graph.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        weights_dir: str | os.PathLike | None = None,
        fallback_box: Sequence[float] = CROP_FACE_BOX,
        landmarks: LipLandmarks | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: ArcFace model not found ({MODEL_HINT})")
        try:
            import onnx
            import onnxruntime
        except ImportError as err:
            raise ImportError("ArcFace CSIM needs onnx and onnxruntime: pip install -e .[field]") from err
        try:
            nodes = [n.name for n in onnx.load(str(self.model_path), load_external_data=False).graph.node]
            self.session = onnxruntime.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        except Exception as err:  # protobuf's DecodeError; onnxruntime's errors derive from Exception only
            raise WeightsError(f"{self.model_path}: not a readable ONNX model ({str(err).splitlines()[0]})") from err
        self.mean, self.std = (0.0, 1.0) if normalises_itself(nodes) else (127.5, 127.5)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(outputs) != 1 or len(shape) != 4 or shape[1:] != [3, ALIGNED_SIZE, ALIGNED_SIZE]:
            raise WeightsError(
                f"{self.model_path}: not an ArcFace recognition graph (inputs {[i.shape for i in inputs]}, "
                f"{len(outputs)} outputs; expected one [N,3,112,112] input and one embedding output)"
            )
        self.input_name = inputs[0].name
        self.batch = shape[0] if isinstance(shape[0], int) else None  # a fixed batch size, or any
        self.detector = FaceDetector()
        self.landmarks = landmarks or LipLandmarks(weights_dir, detector=self.detector)
        self.fallback_box = np.array(fallback_box, dtype=np.float64)

    def five_points(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """``[5,2]`` landmarks (the image's pixels) of an ``[H,W,3]`` uint8 image; False: dlib found no face."""
        big = self.landmarks.upsampled(image)
        h, w = big.shape[:2]
        box = self.detector.detect(big)
        found = box is not None
        fracs = np.array(box, dtype=np.float64) / [w, h, w, h] if found else self.fallback_box
        points = self.landmarks.points(big, fracs)
        points = (points + 0.5) * [image.shape[1] / w, image.shape[0] / h] - 0.5  # back to the image's pixels
        return five_points(points), found

    def embed_aligned(self, faces: np.ndarray) -> np.ndarray:
        """``[N,D]`` float64 embeddings of aligned uint8 ``[N,112,112,3]`` RGB faces."""
        x = ((faces.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        step = self.batch or len(x)
        out = [self.session.run(None, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        return np.concatenate(out).reshape(len(x), -1).astype(np.float64)

    def embed(self, frames: np.ndarray) -> tuple[np.ndarray, int]:
        """Embeddings ``[N,D]`` of uint8 ``[N,H,W,3]`` frames and how many fell back to the crop's face box."""
        aligned, fallbacks = [], 0
        for frame in frames:
            points, found = self.five_points(np.ascontiguousarray(frame))
            aligned.append(align_face(frame, points))
            fallbacks += not found
        return self.embed_aligned(np.stack(aligned)), fallbacks


class ArcFaceSimilarity(Metric):
    """CSIM, the ArcFace cosine between a reference face and every generated frame: ``update(reference, frames)``.

    ``reference``: one image (``[H,W,3]`` uint8 or ``[3,H,W]`` in [-1,1]); ``frames``: a video (see
    ``metrics.image.to_unit``). ``compute()`` -> ``{"status": "ok", "mean", "min", "num_frames", "num_fallbacks"
    (images, references included, embedded in the crop's face box), "weights" (the model file's sha256)}``, or an
    unavailable entry when the model file, onnxruntime or dlib and its landmark model are missing.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        model_path: str | os.PathLike,
        weights_dir: str | os.PathLike | None = None,
        landmarks: LipLandmarks | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.add_state("similarities", default=[], dist_reduce_fx="cat")
        self.add_state("num_fallbacks", default=torch.tensor(0), dist_reduce_fx="sum")
        self.embedder: ArcFaceEmbedder | None = None
        self.reason, self.weights = "", file_record(model_path)
        try:
            self.embedder = ArcFaceEmbedder(model_path, weights_dir, landmarks=landmarks)
        except (ImportError, OSError, RuntimeError) as err:  # RuntimeError: dlib's, for a corrupt landmark model
            self.reason = str(err)

    def update(self, reference: Tensor | np.ndarray, frames: Tensor | np.ndarray) -> None:
        """Score one clip against its reference image (no-op when unavailable)."""
        if self.embedder is None:
            return
        ref, ref_fallbacks = self.embedder.embed(as_uint8_frames(reference)[:1])
        emb, fallbacks = self.embedder.embed(as_uint8_frames(frames))
        self.similarities.append(torch.from_numpy(cosine_similarity(ref[0], emb)).to(self.device))
        self.num_fallbacks += ref_fallbacks + fallbacks

    def compute(self) -> dict[str, Any]:
        """Plain floats / ints for the eval report (mean and min None before any frame)."""
        if self.embedder is None:
            return unavailable(self.reason)
        s = dim_zero_cat(self.similarities) if self.similarities else torch.zeros(0, dtype=torch.float64)
        return {
            "status": "ok",
            "mean": json_float(s.mean()),
            "min": json_float(s.min()) if len(s) else None,
            "num_frames": len(s),
            "num_fallbacks": int(self.num_fallbacks),
            "weights": self.weights,
        }
