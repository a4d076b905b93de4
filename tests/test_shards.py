"""LitData shards: written equal to the cache, the ordering contract, ranks, resume, a VAE fit, CLI errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from temposyncdiff.cli.data import run
from temposyncdiff.data.batch import Batch, collate
from temposyncdiff.data.cache import add_latents, open_cache
from temposyncdiff.data.datamodule import TalkingHeadDataModule
from temposyncdiff.data.dataset import ClipDataset
from temposyncdiff.errors import UserError
from temposyncdiff.training import train
from tests.helpers.configs import TINY_VAE as TINY
from tests.helpers.configs import compose_config

litdata = pytest.importorskip("litdata", reason="pip install -e .[scale]")
from temposyncdiff.data.shards import (  # noqa: E402
    SHARD_META,
    ClipStream,
    ShardError,
    ShardSource,
    check_formats,
    read_shard_meta,
    write_shards,
)

SETTINGS = dict(image_size=32, clip_len=8, stride=8, batch_size=4, seed=3, val_max_items=5)
FAST = dict(chunk_bytes=60_000, start_method="fork", log=lambda _: None)  # several chunks per split


def _module(data_root: Path, tmp: Path, **kw) -> TalkingHeadDataModule:
    args = dict(
        manifest_dir=str(data_root / "data" / "manifests"),
        name="synth",
        cache_dir=str(tmp / "cache"),
        shard_dir=str(tmp / "shards"),
        **SETTINGS,
    )
    return TalkingHeadDataModule(**{**args, **kw})


@pytest.fixture(scope="module")
def sharded(data_root: Path, tmp_path_factory) -> Path:
    """Caches (train with latents) and shard sets of the fixture corpus at 32 px, 8-frame clips."""
    tmp = tmp_path_factory.mktemp("sharded")
    dm = _module(data_root, tmp)
    dm.prepare_data()
    add_latents(dm.cache_path("train"), lambda x: torch.nn.functional.avg_pool2d(x, 8), log=lambda _: None)
    for split in ("train", "val"):
        write_shards(open_cache(dm.cache_path(split)), dm.shard_path(split), 8, 8, **FAST)
    return tmp


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


def _key(item: dict) -> tuple[str, int]:
    return item["id"], int(item["start"])


def _items(batches: list[Batch]) -> list[dict]:
    """Batches back to items (the Batch fields, ``id`` for ``ids``)."""
    out = []
    for b in batches:
        fields = {k: v for k, v in vars(b).items() if v is not None and k != "ids"}
        out += [{**{k: v[i] for k, v in fields.items()}, "id": b.ids[i]} for i in range(len(b))]
    return out


def test_shards_hold_the_cache_items(data_root: Path, sharded: Path) -> None:
    dm = _module(data_root, sharded)
    cache = ClipDataset(open_cache(dm.cache_path("train")), 8, 8, train=True, seed=3)
    meta = read_shard_meta(dm.shard_path("train"))
    assert meta["num_items"] == len(cache) and meta["utterances"]["ids"] == cache.src.ids
    assert meta["source"]["latents"] and meta["clip_len"] == meta["stride"] == 8 and meta["image_size"] == 32
    shards = ClipDataset(ShardSource(dm.shard_path("train"), meta), 8, 8, train=True, seed=3)
    assert shards.items == cache.items
    for i in range(0, len(cache), 3):
        _same(shards[(i, 1)], cache[(i, 1)])
    # shuffle off: the stream's batches are the cache's in ClipDataset order, epoch after epoch
    stream = ClipStream(dm.shard_path("train"), meta, shuffle=False, seed=3)
    streamed = litdata.StreamingDataLoader(stream, batch_size=4, collate_fn=collate)
    for epoch in (0, 1):
        local = DataLoader(cache, batch_size=4, sampler=[(i, epoch) for i in range(len(cache))], collate_fn=collate)
        pairs = list(zip(streamed, local, strict=True))
        assert len(pairs) == -(-len(cache) // 4) and pairs[0][0].latents is not None
        for a, b in pairs:
            _same(vars(a), vars(b))


def test_shuffled_epochs_hold_the_same_items(data_root: Path, sharded: Path) -> None:
    local, lit, again = (_module(data_root, sharded, format=f) for f in ("cache", "litdata", "litdata"))
    other = _module(data_root, sharded, format="litdata", seed=4)
    workers = _module(data_root, sharded, format="litdata", num_workers=2, persistent_workers=True)
    for dm in (local, lit, again, other, workers):
        dm.setup("fit")
    loaders = [dm.train_dataloader() for dm in (lit, again, other, workers)]
    local_loader = local.train_dataloader()
    orders = []
    for epoch in (0, 1):
        local_loader.sampler.set_epoch(epoch)
        want = {_key(x): x for x in _items(list(local_loader))}
        got = [_items(list(loader)) for loader in loaders]
        assert [len(g) for g in got] == [len(want)] * 4
        for item in got[0] + got[3]:
            _same(item, want[_key(item)])  # each item equals the cache's for this epoch (workers too)
        assert [_key(x) for x in got[0]] == [_key(x) for x in got[1]] != [_key(x) for x in got[2]]
        assert [_key(x) for x in got[0]] != [_key(x) for x in want.values()]  # LitData's order, not EpochSampler's
        orders.append([_key(x) for x in got[0]])
    assert orders[0] != orders[1]
    val = [b.ids for b in lit.val_dataloader()]
    assert val == [b.ids for b in local.val_dataloader()] and sum(len(i) for i in val) == 5


def test_ranks_get_disjoint_items(data_root: Path, sharded: Path, monkeypatch) -> None:
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dm = _module(data_root, sharded, format="litdata")
        dm.setup("fit")
        seen.append([_key(x) for x in _items(list(dm.train_dataloader()))])
    n = read_shard_meta(dm.shard_path("train"))["num_items"]
    assert len(seen[0]) == len(seen[1]) > 0 and not set(seen[0]) & set(seen[1])
    assert len(set(seen[0] + seen[1])) == len(seen[0]) * 2 > n - 2 * SETTINGS["batch_size"]  # at most a batch a rank


def test_resume_mid_epoch(data_root: Path, sharded: Path) -> None:
    def loader() -> litdata.StreamingDataLoader:
        dm = _module(data_root, sharded, format="litdata")
        dm.setup("fit")
        return dm.train_dataloader()

    full = [b.ids for b in loader()]
    first = loader()
    it = iter(first)
    assert [next(it).ids for _ in range(3)] == full[:3]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.ids for b in resumed] == full[3:]


def test_vae_fits_on_streamed_shards(data_root: Path, tmp_path: Path) -> None:
    data = ["data.clip_len=1", f"data.shard_dir={tmp_path / 'shards'}"]  # TINY's data settings, and where shards go
    cfg = compose_config(
        "data", ["data_command=shards", *data, "start_method=fork", "workers=1"], data_root, tmp_path / "shards_run"
    )
    run(compose_config("data", ["data_command=cache", "data.cache_workers=1", *data], data_root, tmp_path / "cache"))
    assert set(run(cfg)["splits"]) == {"train", "val"}
    cfg = compose_config(
        "train",
        [
            *TINY,
            *data,
            "data.format=litdata",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            f"paths.checkpoint_dir={tmp_path / 'ckpt'}",
        ],
        data_root,
        tmp_path / "run",
    )
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)  # our own file
    position = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["num_samples_yielded"] == 3 * 4  # the stream's place is saved for ckpt_path=last
    assert (tmp_path / "ckpt" / "vae_pretrained.pt").is_file()


def test_errors(data_root: Path, sharded: Path, tmp_path: Path, caplog) -> None:
    def cli(*overrides: str) -> str:
        """The one error line ``tsd-data shards`` prints before exiting with status 2."""
        caplog.clear()
        cfg = compose_config("data", ["data_command=shards", *overrides], data_root, tmp_path / "r")
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
            run(cfg)
        assert exit_.value.code == 2 and len(caplog.records) == 1
        return caplog.records[0].getMessage()

    assert "no complete cache" in cli(f"data.cache_dir={tmp_path / 'none'}")
    line = cli(
        f"data.cache_dir={sharded / 'cache'}",
        f"out={sharded / 'shards'}",
        "data.image_size=32",
        "data.clip_len=4",
        "data.stride=4",
    )
    assert "holds a different shard set" in line and "force=true" in line and "\n" not in line
    dm = _module(data_root, sharded)
    reader, out = open_cache(dm.cache_path("val")), str(tmp_path / "s")
    write_shards(reader, out, 8, 8, **FAST)
    stamp = (tmp_path / "s" / SHARD_META).stat().st_mtime_ns
    assert write_shards(reader, out, 8, 8, **FAST)["clip_len"] == 8  # the same set: reused
    assert (tmp_path / "s" / SHARD_META).stat().st_mtime_ns == stamp
    with pytest.raises(ShardError, match=r"different shard set .*force=true"):
        write_shards(reader, out, 4, 4, **FAST)
    assert write_shards(reader, out, 4, 4, force=True, **FAST)["clip_len"] == 4
    assert read_shard_meta(out)["clip_len"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["r", "s"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("")
    with pytest.raises(ShardError, match="not a complete shard set"):
        write_shards(reader, str(tmp_path / "t"), 8, 8, **FAST)
    with pytest.raises(ShardError, match=r"clip_len=8 \(data asks 4\)"):
        _module(data_root, sharded, format="litdata", clip_len=4, stride=4).setup("fit")
    with pytest.raises(ShardError, match="no complete shard set"):
        _module(data_root, sharded, format="litdata", name="other").setup("validate")


def test_a_shard_set_naming_an_unsafe_serializer_is_refused(data_root: Path, sharded: Path, tmp_path: Path) -> None:
    """A crafted index.json that names LitData's pickle serializer is refused before anything is read."""
    import json
    import shutil

    shutil.copytree(sharded / "shards", tmp_path / "shards")
    for sub in ("clips", "utterances"):
        for index in (tmp_path / "shards").glob(f"*/{sub}/index.json"):
            data = json.loads(index.read_text())
            data["config"]["data_format"] = ["pickle", *data["config"]["data_format"][1:]]
            index.write_text(json.dumps(data))
    with pytest.raises(UserError, match="refusing serializer"):
        _module(data_root, tmp_path, format="litdata").setup("fit")
    check_formats(str(sharded / "shards" / "synth_train" / "clips"))  # ours: arrays only
