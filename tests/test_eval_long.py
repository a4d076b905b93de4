"""tsd-eval eval=long: a long generation scored block by block (identity, colour, seams, memory), and its arithmetic."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest
from PIL import Image

from temposyncdiff.cli.eval import evaluate
from temposyncdiff.errors import UserError
from temposyncdiff.evaluation.clips import Clip
from temposyncdiff.evaluation.long import DriftBlocks, drift_summary, joined_audio
from temposyncdiff.nets.syncnet import SyncNet, export_expert
from tests.helpers.configs import compose_config, tiny_eval
from tests.helpers.nets import save_tiny_exports

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    save_tiny_exports(out)
    export_expert(SyncNet(image_size=32, dim=16, width=8), out / "syncnet.pt")
    return out


def long_config(exports, data_root, tmp_path, *extra: str):
    return compose_config(
        "eval",
        [
            *tiny_eval("long", exports, tmp_path / "out"),
            "eval.long.run=teacher@1",
            "eval.long.duration_s=3",
            "eval.long.block_s=1",
            "eval.long.identity.stride=12",
            *extra,
        ],
        data_root,
        tmp_path / "run",
    )


def test_long_generation_is_scored_per_block(exports, data_root, tmp_path):
    evaluate(long_config(exports, data_root, tmp_path))
    out = tmp_path / "out"
    report = json.loads((out / "metrics" / "eval_report.json").read_text())
    long = report["long"]
    assert long["status"] == "ok" and long["num_frames"] == 75 and long["seconds"] == 3.0
    assert [(b["t0_s"], b["t1_s"]) for b in long["blocks"]] == [(0, 1), (1, 2), (2, 3)]
    assert long["blocks"][0]["colour_shift"] == 0 and all(b["rss_mb"] > 0 for b in long["blocks"])
    assert any(b["seam_ratio"] is not None for b in long["blocks"])  # the tiny net's windows end inside blocks
    if long["identity"]["status"] == "ok":  # dlib installed (pip install -e .[faces])
        assert all(-1 <= b["identity_min"] <= b["identity"] <= 1 for b in long["blocks"])
        assert long["summary"]["identity_first"] == long["blocks"][0]["identity"]
    assert len(long["audio_from"]) >= 2  # the two utterances, joined (and repeated) to 3 s
    rows = list(csv.DictReader((out / "tables" / "eval_long.csv").open()))
    assert len(rows) == 3 and float(rows[2]["t1_s"]) == 3
    with Image.open(out / "plots" / "long_drift.png") as im:
        assert im.format == "PNG" and im.width > 300
    with av.open(long["video"]) as f:
        assert f.streams.video[0].frames == 75 and len(f.streams.audio) == 1
    assert report["generation"]["status"] == "unavailable"  # only what was selected ran


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.long.run=student@9", "eval.long.run=student@9: not one of the runs ['teacher@1']"),
        ("eval.long.block_s=0", "eval.long: duration_s and block_s must be positive"),
    ],
)
def test_long_refuses_an_unknown_run_and_bad_lengths(exports, data_root, tmp_path, caplog, override, message):
    with pytest.raises(SystemExit) as exit_info:  # the task wrapper: one line, exit 2
        evaluate(long_config(exports, data_root, tmp_path, override))
    assert exit_info.value.code == 2 and message in caplog.text


def test_long_without_the_checkpoint_is_unavailable(exports, data_root, tmp_path):
    evaluate(long_config(exports, data_root, tmp_path, f"models.0.checkpoint={tmp_path / 'none.pt'}"))
    long = json.loads((tmp_path / "out" / "metrics" / "eval_report.json").read_text())["long"]
    assert long["status"] == "unavailable" and "none.pt" in long["reason"]
    assert not (tmp_path / "out" / "plots" / "long_drift.png").exists()


def test_joined_audio_repeats_the_utterances_in_order():
    clips = [
        Clip(name, np.zeros((1, 4, 4, 3), np.uint8), np.full(n, v, np.float32), np.zeros(1), None, "", "")
        for name, n, v in (("a", 3, 1.0), ("b", 2, 2.0))
    ]
    wave, ids = joined_audio(clips, seconds=8, sample_rate=1)
    assert wave.tolist() == [1, 1, 1, 2, 2, 1, 1, 1] and ids == ["a", "b", "a"]
    with pytest.raises(UserError):
        joined_audio([], 1)


def test_blocks_colour_seams_and_trends_by_hand():
    grey = np.full((8, 8, 3), 100, np.uint8)
    blocks = DriftBlocks(block_frames=4, fps=4.0, borders=[2, 6], embedder=None, reference=grey)
    for k in range(10):  # frames 0-7 grey, a jump of 10 in red between frames 1 and 2; frames 8-9 brighter
        frame = grey.copy()
        frame[..., 0] += 10 * (k >= 2)
        frame[..., 1:] += 30 * (k >= 8)
        blocks.add(frame)
    blocks.close_block()
    rows = blocks.rows
    assert [(r["t0_s"], r["t1_s"]) for r in rows] == [(0, 1), (1, 2), (2, 2.5)]
    assert rows[0]["red"] == pytest.approx(105) and rows[1]["red"] == 110 and rows[2]["green"] == 130
    assert rows[1]["colour_shift"] == pytest.approx(5) and rows[2]["colour_shift"] == pytest.approx(np.sqrt(25 + 1800))
    assert rows[0]["seam_ratio"] == "inf"  # only the border pair (1 -> 2) changes in block 0
    assert rows[1]["seam_ratio"] is None and rows[2]["seam_ratio"] is None  # still inside, and no border inside
    s = drift_summary(rows)
    t, shift = [0.5 / 60, 1.5 / 60, 2.25 / 60], [r["colour_shift"] for r in rows]
    assert s["colour_shift_per_min"] == pytest.approx(np.polyfit(t, shift, 1)[0])
    assert s["colour_shift_max"] == max(shift) and "identity_first" not in s
