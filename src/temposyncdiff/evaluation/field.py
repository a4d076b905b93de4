"""The field's metrics in tsd-eval (``eval.generation.field``), each from a weights file the user supplies (never
downloaded): LSE-C / LSE-D in syncnet_python's units (its published ``syncnet_v2.model``), CSIM (an insightface
ArcFace ONNX), FID (the FID Inception weights) and FVD (the TorchScript I3D). A missing file makes its metric
unavailable with the reason; a present one is recorded with its sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from temposyncdiff.evaluation.scorer import embed_frames, sync_report
from temposyncdiff.metrics.arcface import MODEL_HINT, ArcFaceSimilarity
from temposyncdiff.metrics.distribution import (
    FID_WEIGHTS_HINT,
    I3D_HINT,
    FrechetInceptionDistance,
    FrechetVideoDistance,
)
from temposyncdiff.metrics.image import unavailable
from temposyncdiff.metrics.sync import LipSyncError
from temposyncdiff.metrics.syncnet_python import SyncNetV2, load_syncnet_python
from temposyncdiff.utils.io import file_record

SYNCNET_HINT = "syncnet_v2.model from syncnet_python's download_model.sh (github.com/joonson/syncnet_python)"
FILES = {  # metric -> (its eval.generation.field key, the file users get and where)
    "syncnet_python": ("syncnet_python", SYNCNET_HINT),
    "csim": ("arcface", MODEL_HINT),
    "fid": ("inception", FID_WEIGHTS_HINT),
    "fvd": ("i3d", I3D_HINT),
}


def field_files(c: DictConfig) -> dict[str, dict[str, Any]]:
    """Per metric: its file's path and sha256, or why it is unavailable (not configured, not found)."""
    out = {}
    for metric, (key, hint) in FILES.items():
        path = c.get(key)
        if not path:
            out[metric] = unavailable(f"disabled (eval.generation.field.{key}=null)")
        elif not Path(path).is_file():
            out[metric] = unavailable(f"{path} not found: {hint}")
        else:
            out[metric] = {"status": "ok"} | file_record(path)
    return out


def load_field_syncnet(c: DictConfig) -> SyncNetV2 | None:
    """syncnet_python's SyncNet when its file is there (a wrong file: ``WeightsError``, one line)."""
    path = c.get("syncnet_python")
    return load_syncnet_python(path) if path and Path(path).is_file() else None


class FieldScores:
    """One run's field metrics, clip by clip: ``update(gt, own, reference, wave, swapped)``, then ``compute()``;
    ``files``: ``field_files(c)``, read once per tsd-eval."""

    def __init__(
        self, c: DictConfig, files: dict[str, dict[str, Any]], syncnet: SyncNetV2 | None, vshift: int = 15
    ) -> None:
        self.files, self.syncnet = files, syncnet
        self.lse = {k: LipSyncError(vshift=vshift, protocol="syncnet_python") for k in ("own", "swapped")}
        ok = {m for m, f in self.files.items() if f["status"] == "ok"}
        self.csim = ArcFaceSimilarity(c.arcface) if "csim" in ok else None
        self.fid = FrechetInceptionDistance(c.inception) if "fid" in ok else None
        self.fvd = FrechetVideoDistance(c.i3d) if "fvd" in ok else None

    def update(
        self,
        gt: np.ndarray,
        own: np.ndarray,
        reference: np.ndarray | None,
        wave: np.ndarray | None,
        swapped: np.ndarray | None = None,
    ) -> None:
        """One clip (uint8 ``[N,H,W,3]`` videos); ``wave``: its own 16 kHz audio, which both videos are scored
        against for LSE; ``reference``: the face CSIM compares every generated frame with."""
        if self.syncnet is not None and wave is not None:
            features = self.syncnet.audio_features(wave)
            for key, video in (("own", own), ("swapped", swapped)):
                if video is not None:
                    self.lse[key].update(*embed_frames(self.syncnet, video, features))
        if self.csim is not None and reference is not None:
            self.csim.update(reference, own)
        for metric in (self.fid, self.fvd):
            if metric is not None:
                metric.update(gt, own)

    def compute(self) -> dict[str, Any]:
        out = {}
        for name, metric in (("csim", self.csim), ("fid", self.fid), ("fvd", self.fvd)):
            out[name] = metric.compute() if metric is not None else self.files[name]
        if self.syncnet is None:
            out["syncnet_python"] = self.files["syncnet_python"]
        else:
            sync = sync_report(self.lse["own"], self.lse["swapped"])
            out["syncnet_python"] = {"status": "ok", **sync, "weights": self.files["syncnet_python"]}
        return {k: out[k] for k in FILES}
