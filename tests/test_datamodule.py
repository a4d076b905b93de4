"""Clips, batches and the data module: cache vs mp4 equality, references, padding, loaders, Lightning transfer."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.batch import Batch, collate
from temposyncdiff.data.cache import CacheError, add_latents, build_cache, open_cache
from temposyncdiff.data.clips import clip_mel_windows
from temposyncdiff.data.datamodule import DataConfigError, TalkingHeadDataModule
from temposyncdiff.data.dataset import ClipDataset, EpochSampler, benchmark_loading
from temposyncdiff.data.manifest import build_manifest
from temposyncdiff.data.visemes import SILENCE
from temposyncdiff.errors import UserError
from temposyncdiff.stages.base import embed_batch_audio
from tests.helpers.nets import tiny_denoiser
from tests.test_cache import AUDIO, corpus_rows


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def cached(synth_corpus: Path, tmp_path_factory) -> tuple[list[dict], Path]:
    rows = corpus_rows(synth_corpus)
    out = tmp_path_factory.mktemp("cache") / "all"
    build_cache(rows, out, 64, AUDIO, log=_quiet)
    return rows, out


@pytest.fixture(scope="module")
def manifests(synth_corpus: Path, tmp_path_factory) -> Path:
    """Manifests split by utterance (7 train, 1 val, 1 test) with the ground-truth visemes as viseme_root."""
    tmp = tmp_path_factory.mktemp("manifests")
    for f in synth_corpus.glob("*/*.visemes.npy"):
        (tmp / "visemes" / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp / "visemes" / f.parent.name / f.name.replace(".visemes", ""))
    build_manifest(synth_corpus, tmp / "m", viseme_root=tmp / "visemes", split_by="utterance", log=_quiet)
    return tmp / "m"


def _module(manifests: Path, tmp: Path, **kw) -> TalkingHeadDataModule:
    args = dict(
        manifest_dir=str(manifests),
        name="lrs3",
        cache_dir=str(tmp / "cache"),
        image_size=32,
        clip_len=8,
        stride=8,
        batch_size=4,
        seed=3,
        val_max_items=5,
    )
    return TalkingHeadDataModule(**{**args, **kw})


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def test_cache_and_mp4_give_the_same_clips(cached) -> None:
    rows, out = cached
    rows = rows[:3]  # one talk keeps mp4 decoding short
    build_cache(rows, out.with_name("one"), 48, AUDIO, log=_quiet)
    a = ClipDataset(open_cache(out.with_name("one")), clip_len=32, stride=24, train=True, seed=5)
    b = ClipDataset(rows, clip_len=32, stride=24, audio=AUDIO, train=True, seed=5, image_size=48)
    assert a.items == b.items and len(a) >= 6
    for i in range(len(a)):
        _same(a[(i, 2)], b[(i, 2)])


def test_clip_mel_windows_match_full_windows(cached) -> None:
    mel = np.array(open_cache(cached[1]).mel[:300], dtype=np.float32)
    for audio in (AUDIO, AudioFeatures(fps=30.0), AudioFeatures(fps=29.97, window_frames=5)):
        full = audio.frame_windows(torch.from_numpy(mel).T, 90)
        for start in (0, 1, 2, 5, 13, 40):
            assert torch.equal(clip_mel_windows(audio, mel, start, 30), full[start : start + 30]), (audio, start)


def test_batch_shapes_and_transfer(cached) -> None:
    ds = ClipDataset(open_cache(cached[1]), clip_len=8, stride=8)
    batch = collate([ds[i] for i in (0, 5, len(ds) - 1)])
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.frames.shape == (3, 8, 3, 64, 64) and batch.frames.dtype == torch.float32
    assert batch.reference.shape == (3, 3, 64, 64) and batch.mel.shape == (3, 8, 80, 16)
    assert batch.visemes.dtype == torch.int64 and batch.visemes.shape == (3, 8)
    assert batch.mask.dtype == torch.bool and batch.mask.all()
    assert batch.start.dtype == torch.int64 and batch.start.tolist() == [ds.items[i][1] for i in (0, 5, len(ds) - 1)]
    assert batch.ids[0] == "spk000/00001" and batch.latents is None and batch.ref_latent is None
    for t in (batch.frames, batch.reference):
        assert -1 <= t.min() < 0 < t.max() <= 1
    moved = move_data_to_device(batch, torch.device("cpu"))  # what Lightning's transfer_batch_to_device does
    assert isinstance(moved, Batch) and moved.ids == batch.ids and torch.equal(moved.frames, batch.frames)
    assert moved.latents is None


def test_reference_frames(cached) -> None:
    rows, out = cached
    reader = open_cache(out)
    ds = ClipDataset(reader, clip_len=16, stride=16, train=True, seed=1)
    for i in range(len(ds)):
        (u, _), (v, j) = ds.items[i], ds.reference_frame(i)
        assert v != u and reader.talk_ids[v] == reader.talk_ids[u] and 0 <= j < reader.num_frames[v]
    item = ds[3]
    v, j = ds.reference_frame(3)
    assert torch.equal(
        item["reference"], torch.from_numpy(np.array(reader.frames[reader.offsets[v] + j])).float() / 127.5 - 1
    )
    assert any(ds.reference_frame(i, 0) != ds.reference_frame(i, 1) for i in range(len(ds)))  # varies per epoch
    val = ClipDataset(reader, clip_len=16, stride=16, train=False, seed=1)
    assert all(val.reference_frame(i, 0) == val.reference_frame(i, 7) for i in range(len(val)))
    # one utterance per talk: a frame of the same utterance outside the window, else the first frame
    singles = ClipDataset(rows[::3], clip_len=16, stride=16, train=True, image_size=64)
    for i, (u, start) in enumerate(singles.items):
        v, j = singles.reference_frame(i)
        assert v == u and not start <= j < start + 16
    whole = ClipDataset(rows[::3], clip_len=100, image_size=64)
    assert [whole.reference_frame(i) for i in range(len(whole))] == [(0, 0), (1, 0), (2, 0)]
    first = ClipDataset(reader, clip_len=16, stride=16, reference="first_frame")
    assert first.reference_frame(2) == first.items[2]


def test_short_utterance_is_padded(cached) -> None:
    reader = open_cache(cached[1])
    ds = ClipDataset(reader, clip_len=100, stride=10)
    assert ds.items == [(u, 0) for u in range(9)]
    item, n = ds[2], int(reader.num_frames[2])
    assert item["frames"].shape[0] == 100 and item["mask"].sum() == n and item["mask"][:n].all()
    assert torch.equal(item["frames"][n:], item["frames"][n - 1 : n].expand(100 - n, -1, -1, -1))
    assert (item["visemes"][n:] == SILENCE).all() and item["mel"].shape == (100, 80, 16)
    shorter = ClipDataset(reader, clip_len=n - 2)
    assert torch.equal(item["mel"][: n - 2], shorter[shorter.items.index((2, 0))]["mel"])


def test_items_carry_their_utterances_mean_log_mel(cached) -> None:
    """Every clip of an utterance holds the whole utterance's mean log-mel (mel_norm=utterance encoders read it); a
    batch without it (LitData shards written before the field) is refused by such an encoder's stage."""
    rows, root = cached
    reader = open_cache(root)
    ds, by_rows = ClipDataset(reader, clip_len=8, stride=8), ClipDataset(rows, clip_len=8, stride=8, image_size=64)
    u = 1
    whole = np.asarray(reader.mel[reader.mel_offsets[u] : reader.mel_offsets[u] + reader.mel_lens[u]], np.float32)
    clips = [i for i, (v, _) in enumerate(ds.items) if v == u]
    assert len(clips) > 2
    for i in clips:
        assert torch.allclose(ds[i]["mel_mean"], torch.from_numpy(whole.mean(0)), atol=1e-4)
        assert torch.allclose(by_rows[i]["mel_mean"], ds[i]["mel_mean"], atol=1e-2)  # float16 cache vs decoded
    batch = collate([ds[clips[0]], ds[clips[1]]])
    assert batch.mel_mean.shape == (2, 80)
    net = tiny_denoiser(mel_norm="utterance")
    assert embed_batch_audio(net, batch)[0].shape == (2, 8, 16)
    with pytest.raises(UserError, match="rewrite them"):
        embed_batch_audio(net, collate([{**ds[i], "mel_mean": None} for i in clips[:2]]))


def test_latents_in_items(synth_corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(synth_corpus)[:3]
    build_cache(rows, tmp_path / "c", 32, AUDIO, log=_quiet)
    add_latents(tmp_path / "c", lambda x: torch.nn.functional.avg_pool2d(x, 4), log=_quiet)
    ds = ClipDataset(open_cache(tmp_path / "c"), clip_len=100)
    batch = collate([ds[0], ds[1]])
    assert batch.latents.shape == (2, 100, 3, 8, 8) and batch.ref_latent.shape == (2, 3, 8, 8)
    assert torch.allclose(
        batch.latents, torch.nn.functional.avg_pool2d(batch.frames.flatten(0, 1), 4).view(2, 100, 3, 8, 8), atol=2e-3
    )


def test_mirror_augmentation_flips_frames_reference_and_latents(synth_corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(synth_corpus)[:3]
    build_cache(rows, tmp_path / "c", 32, AUDIO, log=_quiet)
    encode = lambda x: torch.nn.functional.avg_pool2d(x, 4)[:, :, :, :4]  # noqa: E731  (left half: not mirror-safe)
    add_latents(tmp_path / "c", encode, log=_quiet)
    plain = ClipDataset(open_cache(tmp_path / "c"), clip_len=8, train=True, seed=3)
    with pytest.raises(CacheError, match="no mirrored latents"):
        ClipDataset(open_cache(tmp_path / "c"), clip_len=8, train=True, mirror=1.0)[0]
    add_latents(tmp_path / "c", encode, log=_quiet, mirror=True)  # same encoder, now with the mirrored latents
    half = ClipDataset(open_cache(tmp_path / "c"), clip_len=8, train=True, seed=3, mirror=0.5)
    flips = [half.mirrored(i) for i in range(len(half))]
    assert 0 < sum(flips) < len(flips) and flips == [half.mirrored(i) for i in range(len(half))]
    for i in (flips.index(True), flips.index(False)):
        a, b = plain[i, 2], half[i, 2]  # same item, same epoch: the same reference frame
        flip = (lambda x: x.flip(-1)) if flips[i] else (lambda x: x)
        assert torch.equal(b["frames"], flip(a["frames"])) and torch.equal(b["reference"], flip(a["reference"]))
        assert torch.allclose(b["latents"], encode(flip(a["frames"])), atol=2e-3)
        assert torch.allclose(b["ref_latent"], encode(flip(a["reference"])[None])[0], atol=2e-3)
        assert torch.equal(b["visemes"], a["visemes"]) and torch.equal(b["mel"], a["mel"])
    val = ClipDataset(open_cache(tmp_path / "c"), clip_len=8, mirror=1.0)  # not training: never mirrored
    assert not any(val.mirrored(i) for i in range(len(val)))
    with pytest.raises(ValueError, match="probability"):
        ClipDataset(open_cache(tmp_path / "c"), clip_len=8, train=True, mirror=1.5)


def test_epoch_sampler() -> None:
    s = EpochSampler(10, seed=4)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0} and list(s) == first
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in first] and {e for _, e in s} == {1}


def test_talk_balanced_sampler(synth_corpus: Path, tmp_path: Path) -> None:
    rows = corpus_rows(synth_corpus)
    build_cache(rows, tmp_path / "c", 32, AUDIO, log=_quiet)
    ds = ClipDataset(open_cache(tmp_path / "c"), clip_len=8, stride=2, train=True)
    talks = np.array([ds.src.talk_ids[u] for u, _ in ds.items])
    names, counts = np.unique(talks, return_counts=True)
    assert len(names) > 1 and counts.max() > counts.min()  # talks of unequal size
    assert np.allclose(ds.talk_weights(0.0), 1.0)
    w = ds.talk_weights(1.0)
    assert np.allclose([w[talks == t].sum() for t in names], 1.0)  # every talk carries the same total weight
    s = EpochSampler(len(ds), seed=2, weights=w)
    first = list(s)
    assert len(first) == len(ds) and list(s) == first  # len(ds) draws, the same for the same epoch
    assert all(np.any(talks[[i for i, _ in first]] == t) for t in names)  # every talk drawn in one epoch
    drawn = []
    for epoch in range(40):
        s.set_epoch(epoch)
        drawn += [i for i, _ in s]
        assert epoch == 0 or drawn[-len(ds) :] != [i for i, _ in first]  # a new draw each epoch
    assert np.allclose([np.mean(talks[drawn] == t) for t in names], 1 / len(names), atol=0.03)
    assert list(EpochSampler(len(ds), seed=2, weights=np.full(len(ds), 0.5))) == list(EpochSampler(len(ds), seed=2))
    halves = [list(EpochSampler(len(ds), seed=2, num_replicas=2, rank=r, weights=w)) for r in (0, 1)]
    assert [len(h) for h in halves] == [-(-len(ds) // 2)] * 2 and halves[0] != halves[1]  # each rank its share
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ds.talk_weights(1.5)
    with pytest.raises(ValueError, match="sampling weights"):
        EpochSampler(len(ds) + 1, weights=w)


def test_datamodule_talk_balance(manifests: Path, tmp_path: Path) -> None:
    dm = _module(manifests, tmp_path, talk_balance=0.5)
    dm.prepare_data()
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert torch.allclose(sampler.weights, torch.as_tensor(dm.datasets["train"].talk_weights(0.5)))
    plain = _module(manifests, tmp_path)
    plain.setup("fit")
    assert plain.train_dataloader().sampler.weights is None  # the default: every clip alike, no replacement
    one = _module(manifests, tmp_path, talk_balance=1.0)
    one.setup("fit")
    for u in range(len(one.datasets["train"].src.talk_ids)):  # a single person: weights alike, epochs as without
        one.datasets["train"].src.talk_ids[u] = "alice"
    assert one.train_dataloader().sampler.weights is None
    with pytest.raises(DataConfigError, match="talk_balance"):
        _module(manifests, tmp_path, talk_balance=0.5, format="litdata", shard_dir=str(tmp_path))


def test_datamodule_loaders(manifests: Path, tmp_path: Path) -> None:
    dm = _module(manifests, tmp_path)
    dm.prepare_data()
    stamp = (tmp_path / "cache" / "lrs3_train" / "cache_meta.json").stat().st_mtime_ns
    dm.prepare_data()  # reused, not rebuilt
    assert (tmp_path / "cache" / "lrs3_train" / "cache_meta.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["lrs3_test", "lrs3_train", "lrs3_val"]
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert sum(len(b) for b in train) == len(dm.datasets["train"]) and all(isinstance(b, Batch) for b in train)
    assert train[0].frames.shape[1:] == (8, 3, 32, 32) and (torch.cat([b.visemes for b in train]) != SILENCE).any()
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 5 and [b.ids for b in val] == [b.ids for b in dm.val_dataloader()]
    direct = _module(manifests, tmp_path, use_cache=False, cache_dir=None)
    direct.setup("validate")
    _same(vars(next(iter(direct.val_dataloader()))), vars(val[0]))
    workers = _module(manifests, tmp_path, num_workers=2, persistent_workers=True)
    workers.setup("fit")
    loader = workers.train_dataloader()
    for epoch in (0, 1):  # the epoch reaches persistent workers through the sampler
        loader.sampler.set_epoch(epoch)
        dm_loader = dm.train_dataloader()
        dm_loader.sampler.set_epoch(epoch)
        for a, b in zip(loader, dm_loader, strict=True):
            _same(vars(a), vars(b))
    assert [b.ids for b in loader] != [b.ids for b in train]


def test_datamodule_errors(manifests: Path, tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match="cache_dir"):
        _module(manifests, tmp_path, cache_dir=None)
    with pytest.raises(DataConfigError, match="not found"):
        _module(manifests, tmp_path, name="hdtf").setup("fit")
    empty = tmp_path / "empty"
    shutil.copytree(manifests, empty)
    (empty / "lrs3_val.jsonl").write_text("")
    dm = _module(empty, tmp_path)
    dm.prepare_data()  # skips the empty split
    with pytest.raises(DataConfigError, match="lrs3_val.jsonl.*empty"):
        dm.setup("fit")
    with pytest.raises(CacheError, match="stale"):
        _module(manifests, tmp_path, image_size=48).setup("test")  # prepare_data not run for this size


class _Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[Batch] = []

    def training_step(self, batch, _):
        assert isinstance(batch, Batch) and batch.frames.device == self.device
        self.seen.append(batch)
        return (self.w * batch.frames.mean()).sum()

    def validation_step(self, batch, _):
        assert isinstance(batch, Batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_receives_batches(manifests: Path, tmp_path: Path) -> None:
    model = _Probe()
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=_module(manifests, tmp_path))
    assert len(model.seen) == 2 and model.seen[0].mel.shape[1:] == (8, 80, 16)


def test_benchmark_loading(cached, tmp_path: Path) -> None:
    rows, _ = cached
    result = benchmark_loading(rows[:3], tmp_path / "b", image_size=32, clip_len=8, max_items=3, log=_quiet)
    assert result["items"] == 3 and result["cache_clips_per_s"] > result["mp4_clips_per_s"] > 0
