"""logger=wandb offline, without an account: config, scalars and the sample videos (with audio) in the offline run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import av
import pytest

from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.training import train
from temposyncdiff.utils.weights import save_weights
from tests.helpers.configs import TINY_TEACHER as TINY
from tests.helpers.configs import compose_config

wandb = pytest.importorskip("wandb")

pytestmark = pytest.mark.slow  # a teacher fit with offline W&B


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file (LevelDB log: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, records = path.read_bytes(), 7, b"", []  # the file opens with a 7-byte ":W&B" header
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # block tail padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record or the last fragment of one
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def test_teacher_fit_logs_to_offline_wandb(data_root, tmp_path, monkeypatch, one_thread):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    save_weights(
        ckpt / "vae_pretrained.pt",
        "vae",
        TinyVAE(channels=(8,), latent_channels=4, patch_size=4),
        {"scale_factor": 1.0},
    )
    cfg = compose_config(
        "train",
        [*TINY, "logger=wandb", "export=false", f"paths.checkpoint_dir={ckpt}", f"data.cache_dir={tmp_path / 'cache'}"],
        data_root,
        run,
    )
    train(cfg)
    wandb.teardown()  # finish() may return before the service has written the offline run's last records

    index = json.loads((run / "samples" / "index.json").read_text())  # written for every logger
    assert [e["step"] for e in index] == [2] and all((run / v).is_file() for v in index[0]["videos"])
    (offline,) = (run / "wandb").glob("offline-run-*")
    (video,) = (offline / "files" / "media" / "videos" / "val" / "samples").glob("*.mp4")
    with av.open(str(video)) as f:
        assert f.streams.video and f.streams.audio  # the sample keeps its speech track
    (log,) = offline.glob("run-*.wandb")
    records = [(r.WhichOneof("record_type"), r) for r in wandb_records(log)]
    (meta,) = [r.run for kind, r in records if kind == "run"]
    assert (meta.run_group, meta.job_type, list(meta.tags)) == ("quickstart", "teacher", ["quickstart", "teacher"])
    config = {u.key for kind, r in records if kind == "config" for u in r.config.update}
    assert {"model", "data", "trainer", "experiment_name"} <= config
    history = {
        i.key or "/".join(i.nested_key): i.value_json
        for kind, r in records
        if kind == "history"
        for i in r.history.item
    }
    assert {"train/loss", "val/psnr", "val/psnr_mouth_gap"} <= set(history)
    stem = Path(index[0]["videos"][0]).stem
    assert json.loads(history[f"val/samples/{stem}/videos"])[0]["_type"] == "video-file"
