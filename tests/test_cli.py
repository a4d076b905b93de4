"""The console scripts start, report user errors in one line with status 2, and write runs under logs/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:], "extras.print_config=false"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_tsd_data_usage(tmp_path):
    out = subprocess.run([str(BIN / "tsd-data")], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "usage: tsd-data" in out.stderr


def test_user_error_is_one_line(tmp_path):
    out = run(["tsd-data", "manifest", "root=does/not/exist"], tmp_path)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "does/not/exist" in text and "Traceback" not in text
    assert list((tmp_path / "logs" / "data_manifest" / "runs").glob("*/config_tree.log")) == []  # printing was off
    assert list((tmp_path / "logs" / "data_manifest" / "runs").glob("*/.hydra/config.yaml"))


def test_train_without_stage_is_a_clear_error(tmp_path):
    out = run(["tsd-train"], tmp_path)
    assert out.returncode == 2 and "experiment=" in out.stdout + out.stderr


def test_synth_then_manifest(tmp_path):
    out = run(
        ["tsd-data", "synth", "out=data/s", "identities=2", "utterances=2", "image_size=32", "workers=1"], tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "data" / "s").glob("*/*.mp4"))) == 4
    out = run(["tsd-data", "manifest", "root=data/s", "name=s", "val_ratio=0.5", "test_ratio=0"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "manifests" / "s_train.jsonl").read_text().count("\n") == 2


def test_hydra_rerun_pickle_is_refused(tmp_path):
    """Hydra's --experimental-rerun unpickles the file it names: refused before Hydra sees it."""
    out = subprocess.run(
        [str(BIN / "tsd-eval"), "--experimental-rerun", str(tmp_path / "config.pickle")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "experimental-rerun" in out.stderr and "Traceback" not in out.stderr
