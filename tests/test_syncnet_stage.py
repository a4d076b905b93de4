"""SyncNetStage: pair sampling and audio alignment, one training step, the Hydra config end to end, export."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.clips import clip_mel_windows
from temposyncdiff.nets.syncnet import SyncNet, load_expert
from temposyncdiff.stages.syncnet import audio_at, augment_clips, augment_mel, pair_masks
from temposyncdiff.training import train
from tests.helpers.configs import TINY_SYNCNET as TINY
from tests.helpers.configs import compose_config


def instantiate_stage(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The data module (set up for fit) and the stage a ``tsd-train`` run with ``cfg`` would build."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm, hydra.utils.instantiate(model_cfg)


def test_pair_masks_negatives():
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[2, 9:] = False  # a clip past its utterance's end
    ids = ["a/1", "a/1", "b/2", "a/3"]
    p = pair_masks(mask, ids, frames=5, centres=(1, 10), min_shift=3, max_shift=6)
    item, centre = p["item"], p["centre"]
    assert item.bincount().tolist() == [8, 8, 5, 8]  # windows t with t + 5 <= valid frames
    assert torch.equal(centre, p["window"] + 2)
    i, j = p["shift"].nonzero(as_tuple=True)
    assert (item[i] == item[j]).all() and ((centre[i] - centre[j]).abs() >= 3).all()
    assert ((centre[i] - centre[j]).abs() <= 6).all() and p["shift"][item != 2].any(1).all()
    i, j = p["other"].nonzero(as_tuple=True)
    assert all(ids[a] != ids[b] for a, b in zip(item[i].tolist(), item[j].tolist()))  # another utterance
    talk_of = {0: "a", 1: "a", 2: "b", 3: "a"}
    assert {(talk_of[a], talk_of[b]) for a, b in zip(item[i].tolist(), item[j].tolist())} == {("a", "a"), ("b", "a")}
    assert not (p["shift"] & p["other"]).any() and not p["shift"].diagonal().any()
    assert not pair_masks(mask[:2], ids[:2], 5, (1, 10), 3, 6)["other"].any()  # one utterance: no other audio


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


def test_augmentations_are_per_clip_and_identity_at_zero():
    frames, mel = torch.rand(3, 6, 3, 16, 16) * 2 - 1, torch.randn(3, 6, 80, 16)
    assert torch.equal(augment_clips(frames, flip=0.0), frames) and torch.equal(augment_mel(mel), mel)
    g = torch.Generator().manual_seed(0)
    x = augment_clips(frames, flip=1.0, color=0.3, shuffle=True, translate=0.1, scale=0.1, generator=g)
    assert x.shape == frames.shape and x.abs().max() <= 1
    y = augment_mel(mel, shift=2, gain=1.0, generator=g)
    steady = mel[:, :1].expand_as(mel)  # a clip whose frames are all the same stays so: one draw per clip
    assert torch.allclose(
        augment_mel(steady, 2, 1.0, torch.Generator().manual_seed(1)).diff(dim=1), torch.zeros(3, 5, 80, 16)
    )
    assert y.shape == mel.shape and not torch.equal(y, mel)


def test_training_step_changes_weights(data_root: Path, tmp_path: Path):
    dm, stage = instantiate_stage(compose_config("train", TINY, data_root, tmp_path / "run"))
    batch = next(iter(dm.train_dataloader()))
    logits = stage.pair_logits(batch)
    assert len(logits["pos"]) == 4 * 8 and len(logits["shift"]) > 0
    before = {k: v.clone() for k, v in stage.net.state_dict().items()}
    opt = stage.configure_optimizers()["optimizer"]
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        stage.training_step(batch, 0).backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in stage.net.state_dict().items())


def test_fast_dev_run_and_export(data_root: Path, tmp_path: Path):
    cfg = compose_config(
        "train",
        [
            *(o for o in TINY if o != "debug=fdr"),
            "data.num_workers=0",
            "trainer.max_steps=1",  # debug runs never export
            "trainer.val_check_interval=1",
            "+trainer.limit_val_batches=1",
            f"paths.checkpoint_dir={tmp_path / 'ck'}",
            "model.augment={flip:0.5,color:0.4,shuffle:true,translate:0.12,scale:0.12}",
        ],
        data_root,
        tmp_path / "run",
    )
    train(cfg)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["syncnet.pt"]
    payload = torch.load(tmp_path / "ck" / "syncnet.pt", weights_only=True)
    assert payload["meta"]["stage"] == "syncnet" and payload["config"]["width"] == 8
    ckpts = list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for ckpt in ckpts:  # plain hparams: resumable with weights_only
        assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["augment"]["flip"] == 0.5
    net = load_expert(tmp_path / "ck" / "syncnet.pt")
    assert not net.training and all(torch.equal(v, payload["state_dict"][k]) for k, v in net.state_dict().items())
