"""``RunIf``: one skip marker for a test's requirements (a CUDA device, optional packages, dlib's model files)."""

from __future__ import annotations

import importlib.util

import pytest


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return True


def RunIf(*, cuda: bool = False, modules: tuple[str, ...] = (), face_models: bool = False) -> pytest.MarkDecorator:  # noqa: N802 (used as a marker)
    """Skip unless every requirement holds: ``cuda`` a CUDA device, ``modules`` importable, ``face_models`` dlib
    with face_recognition_models' landmark files. The reason names what is missing."""
    reasons = [f"needs {m}" for m in modules if _missing(m)]
    if cuda:
        import torch

        if not torch.cuda.is_available():
            reasons.append("needs a CUDA device")
    if face_models and (_missing("dlib") or _missing("face_recognition_models")):
        reasons.append("needs dlib and face_recognition_models")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))
