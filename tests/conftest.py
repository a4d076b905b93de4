"""Shared fixtures: a tiny synthetic corpus made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from temposyncdiff.data.synthetic.corpus import SynthConfig, synthesize_corpus

REPO = Path(__file__).resolve().parents[1]


def face_regions():
    """The project's regions as the configs give them (conf/regions/face.yaml, the one place they are written)."""
    from omegaconf import OmegaConf

    from temposyncdiff.regions import RegionBoxes

    return RegionBoxes(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "regions" / "face.yaml")))


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
    build_manifest(synth_corpus, root / "data" / "manifests", name="synth", viseme_root=visemes,
                   val_ratio=0.34, test_ratio=0.0, seed=0, log=lambda *_: None)  # fmt: skip
    return root


def compose_config(config_name: str, overrides: list[str], root: Path, run_dir: Path):
    """Compose an entry config as Hydra would for a run in ``run_dir`` (so ${hydra:...} resolves), under ``root``."""
    from temposyncdiff.cli.common import compose_run

    return compose_run(config_name, [f"paths.root_dir={root}", "extras.print_config=false", *overrides], run_dir)


def save_tiny_exports(
    out: Path,
    kinds: tuple[str, ...] = ("teacher",),
    pose_mask: tuple[float, float, float, float] | None = None,
    lip_dim: int = 0,
    guidance_scale: float = 1.0,
) -> None:
    """A tiny random VAE and denoiser exported as the stages export them (32 px): ``vae_pretrained.pt`` and
    ``<kind>_best.pt`` for each of ``kinds``; ``pose_mask`` builds a re-voicing denoiser, ``lip_dim`` one that draws
    lip shapes, ``guidance_scale`` the sampling default stored with it."""
    import torch

    from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
    from temposyncdiff.nets.denoiser import Denoiser
    from temposyncdiff.nets.vae import TinyVAE
    from temposyncdiff.utils.weights import save_weights

    torch.manual_seed(0)
    vae = TinyVAE(channels=(8,), patch_size=4)
    net = Denoiser(
        channels=(16, 16),
        attention_levels=(),
        cross_attention_levels=(1,),
        temporal_levels=(1,),
        heads=2,
        cond_dim=32,
        audio_dim=16,
        window=4,
        audio_encoder={"dim": 16, "width": 16},
        pose_mask=pose_mask,
        lip_dim=lip_dim,
    )
    schedule = dict(NoiseSchedule().scheduler.config)
    meta = {
        "schedule": {k: schedule[k] for k in SCHEDULE_KEYS},
        "sampler": "ddim",
        "steps": 2,
        "guidance_scale": guidance_scale,
        "overlap": 1,
        "image_size": 32,
    }
    save_weights(out / "vae_pretrained.pt", "vae", vae, {"image_size": 32})
    for kind in kinds:
        save_weights(out / f"{kind}_best.pt", kind, net, meta)


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
