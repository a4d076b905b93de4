"""SyncNetStage: pair sampling and audio alignment, one training step, the Hydra config end to end, export."""

from __future__ import annotations

import shutil
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.cli.train import train
from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.dataset import clip_mel_windows
from temposyncdiff.data.manifest import build_manifest
from temposyncdiff.nets.syncnet import SyncNet, load_expert
from temposyncdiff.stages.syncnet import audio_at, sample_pairs
from temposyncdiff.utils.weights import load_payload

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stage_root(synth_corpus: Path, tmp_path_factory) -> Path:
    """A project root whose data/manifests split the test corpus by utterance (2 val), with ground-truth visemes."""
    root = tmp_path_factory.mktemp("stage_root")
    for f in synth_corpus.glob("*/*.visemes.npy"):
        (root / "visemes" / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / "visemes" / f.parent.name / f.name.replace(".visemes", ""))
    build_manifest(synth_corpus, root / "data" / "manifests", name="synth", viseme_root=root / "visemes",
                   split_by="utterance", val_ratio=0.25, test_ratio=0.1, log=lambda _: None)  # fmt: skip
    return root


def stage_cfg(root: Path, experiment: str, *overrides: str) -> DictConfig:
    """``tsd-train experiment=<experiment> debug=fdr`` at 32 px on ``root``, composed without a Hydra run."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            f"experiment={experiment}", "debug=fdr", f"paths.root_dir={root}", f"paths.output_dir={root}/run",
            "data.image_size=32", "data.cache_workers=1", "data.batch_size=4", *overrides,
        ])  # fmt: skip


def instantiate_stage(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    return hydra.utils.instantiate(cfg.data), hydra.utils.instantiate(model_cfg)


def test_sample_pairs_negatives():
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 9:] = False  # a clip past its utterance's end
    ids = ["a/1", "a/1", "b/2"]
    p = sample_pairs(mask, ids, frames=5, centres=(1, 10), min_shift=3, max_shift=6, generator=torch.Generator().manual_seed(0))
    assert p["item"].bincount().tolist() == [8, 8, 5]  # windows t with t + 5 <= valid frames
    assert torch.equal(p["centre"], p["window"] + 2)
    shifted = p["centre"] + p["shift"]
    has = p["shift"] != 0
    assert has.all() and (p["shift"].abs() >= 3).all() and (p["shift"].abs() <= 6).all()
    assert (shifted >= 1).all() and (shifted <= torch.tensor([10, 10, 8])[p["item"]]).all()
    other = p["other"]
    assert all(ids[o] != ids[i] for i, o in zip(p["item"].tolist(), other.tolist()))  # another utterance
    assert (p["centre"][p["item"] == 2] <= 10).all() and set(other[p["item"] == 2].tolist()) <= {0, 1}
    assert (sample_pairs(mask[:2], ids[:2], 5, (1, 10), 3, 6)["other"] == -1).all()  # no other utterance in the batch


def test_audio_at_matches_full_utterance_windows():
    """Windows cut from a clip's per-frame mel windows equal SyncNet's windows of the whole utterance."""
    feats, net = AudioFeatures(), SyncNet(image_size=32, dim=8, width=4)
    mel = torch.randn(80, 4 * 40)
    start, t = 7, 16
    clip = clip_mel_windows(feats, mel.T.numpy(), start, t).unsqueeze(0)
    full = net.audio_windows(mel)  # window j is centred on frame j + 2
    centres = torch.tensor([1, 5, 14])
    got = audio_at(clip, torch.zeros(3, dtype=torch.long), centres, net.mel_window, 4)
    assert torch.equal(got, full[start + centres - 2])


def test_training_step_changes_weights(stage_root: Path):
    cfg = stage_cfg(stage_root, "quickstart/syncnet", "model.net.width=8", "model.net.dim=16", "data.clip_len=12")
    dm, stage = instantiate_stage(cfg)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    logits = stage.pair_logits(batch)
    assert len(logits["pos"]) == 4 * 8 and len(logits["shift"]) > 0 and len(logits["other"]) > 0
    before = {k: v.clone() for k, v in stage.net.state_dict().items()}
    opt = stage.configure_optimizers()["optimizer"]
    stage.training_step(batch, 0).backward() if False else stage._loss(logits)[0].backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in stage.net.state_dict().items())


def test_fast_dev_run_and_export(stage_root: Path, tmp_path: Path):
    cfg = stage_cfg(stage_root, "quickstart/syncnet", "model.net.width=8", "model.net.dim=16", "data.clip_len=12",
                    "model.lse_vshift=3", "export=true", f"paths.checkpoint_dir={tmp_path}")  # fmt: skip
    train(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["syncnet.pt"]
    payload = torch.load(tmp_path / "syncnet.pt", weights_only=True)
    assert payload["meta"]["stage"] == "syncnet" and payload["config"]["width"] == 8
    net = load_expert(tmp_path / "syncnet.pt")
    assert not net.training and load_payload(tmp_path / "syncnet.pt", "syncnet")["meta"]["source"] == "live"
