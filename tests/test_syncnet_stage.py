"""SyncNetStage: pair sampling and audio alignment, one training step, the Hydra config end to end, export."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.cli.train import train
from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.dataset import clip_mel_windows
from temposyncdiff.nets.syncnet import SyncNet, load_expert
from temposyncdiff.stages.syncnet import audio_at, sample_pairs
from tests.conftest import compose_config

TINY = ["experiment=quickstart/syncnet", "debug=fdr", "data.batch_size=4", "data.clip_len=12", "data.cache_workers=1",
        "model.net.width=8", "model.net.dim=16", "model.lse_vshift=3", "~callbacks.rich_progress_bar"]  # fmt: skip


def instantiate_stage(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The data module (set up for fit) and the stage a ``tsd-train`` run with ``cfg`` would build."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm, hydra.utils.instantiate(model_cfg)


def test_sample_pairs_negatives():
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 9:] = False  # a clip past its utterance's end
    ids = ["a/1", "a/1", "b/2"]
    p = sample_pairs(
        mask, ids, frames=5, centres=(1, 10), min_shift=3, max_shift=6, generator=torch.Generator().manual_seed(0)
    )
    assert p["item"].bincount().tolist() == [8, 8, 5]  # windows t with t + 5 <= valid frames
    assert torch.equal(p["centre"], p["window"] + 2)
    shifted = p["centre"] + p["shift"]
    has = p["shift"] != 0
    assert has.all() and (p["shift"].abs() >= 3).all() and (p["shift"].abs() <= 6).all()
    assert (shifted >= 1).all() and (shifted <= torch.tensor([10, 10, 8])[p["item"]]).all()
    item, other = p["item"].tolist(), p["other"].tolist()
    assert all(o in (0, 1) for i, o in zip(item, other) if i == 2)  # another utterance's audio
    assert [o for i, o in zip(item, other) if i < 2] == [2] * 7 + [-1] + [2] * 7 + [-1]  # centre 9 > item 2's last
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


def test_training_step_changes_weights(data_root: Path, tmp_path: Path):
    dm, stage = instantiate_stage(compose_config("train", TINY, data_root, tmp_path / "run"))
    batch = next(iter(dm.train_dataloader()))
    logits = stage.pair_logits(batch)
    assert len(logits["pos"]) == 4 * 8 and len(logits["shift"]) > 0 and len(logits["other"]) > 0
    before = {k: v.clone() for k, v in stage.net.state_dict().items()}
    opt = stage.configure_optimizers()["optimizer"]
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        stage.training_step(batch, 0).backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in stage.net.state_dict().items())


def test_fast_dev_run_and_export(data_root: Path, tmp_path: Path):
    cfg = compose_config(
        "train", [*TINY, "export=true", f"paths.checkpoint_dir={tmp_path / 'ck'}"], data_root, tmp_path / "run"
    )
    train(cfg)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["syncnet.pt"]
    payload = torch.load(tmp_path / "ck" / "syncnet.pt", weights_only=True)
    assert payload["meta"]["stage"] == "syncnet" and payload["config"]["width"] == 8
    net = load_expert(tmp_path / "ck" / "syncnet.pt")
    assert not net.training and all(torch.equal(v, payload["state_dict"][k]) for k, v in net.state_dict().items())
