"""tsd-train and the stage export never unpickle a file a user or a checkpoint names, say what is wrong with a bad
``ckpt_path`` in one line, and export only a validated, non-debug run's own best weights, keeping what they replace."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch

from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.training import train
from temposyncdiff.utils.checkpoints import own_checkpoint
from temposyncdiff.utils.weights import keep_previous, save_weights
from tests.helpers.configs import REPO, compose_config
from tests.helpers.configs import TINY_VAE as TINY

BIN = Path(sys.executable).parent


class Trap:
    """Unpickling this creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _armed(path: Path, marker: Path) -> None:
    """The trap in ``path`` is live: an unsafe load does create the marker (then it is removed again)."""
    assert not marker.exists()
    loaded = torch.load(path, weights_only=False) if path.read_bytes()[:2] == b"PK" else pickle.loads(path.read_bytes())
    assert marker.exists() and loaded
    marker.unlink()


# the keys tsd-train checks before anything is built (a real run's checkpoint has many more)
LIGHTNING = {"state_dict": {}, "global_step": 0, "epoch": 0, "pytorch-lightning_version": "2.6.0", "stage": "vae"}


def _lightning_ckpt(**extra) -> dict:
    return LIGHTNING | extra


def _bad_ckpt(kind: str, tmp_path: Path, marker: Path) -> tuple[Path, str]:
    """A ``ckpt_path`` that must be refused, and what the one-line error says about it."""
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path, "checkpoint not found"
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
        return path, "not a readable checkpoint"
    if kind == "truncated":
        torch.save(_lightning_ckpt(state_dict={"net.w": torch.ones(1000)}), path)
        path.write_bytes(path.read_bytes()[:3000])
        return path, "not a readable checkpoint"
    if kind == "export":
        path = save_weights(tmp_path / "vae_pretrained.pt", "vae", TinyVAE(channels=(8,), patch_size=2))
        return path, "a weights-only export (temposyncdiff.vae), not a Lightning checkpoint"
    if kind == "pickle":  # a plain pickle: unpickling it runs the trap
        path.write_bytes(pickle.dumps(_lightning_ckpt(callbacks=Trap(marker))))
        return path, "not a readable checkpoint (not a PyTorch zip archive"
    if kind == "trapped_zip":  # torch.save of a Lightning-looking dict with the trap inside
        torch.save(_lightning_ckpt(callbacks={"x": Trap(marker)}), path)
        return path, "refused by the weights-only loader (it names io.open"
    if kind == "named_outside":  # its ModelCheckpoint state names a file outside its own folder
        state = {"dirpath": str(tmp_path / "run" / "checkpoints"), "best_model_path": str(tmp_path / "trap.ckpt")}
        torch.save(_lightning_ckpt(callbacks={"ModelCheckpoint{}": state}), path)
        return path, f"its ModelCheckpoint state names '{tmp_path / 'trap.ckpt'}', outside its own folder"
    if kind == "other_stage":
        torch.save(_lightning_ckpt(stage="teacher"), path)
        return path, "a checkpoint of the 'teacher' stage, not of 'vae'"
    raise AssertionError(kind)


BAD = ["missing", "random_bytes", "truncated", "export", "pickle", "trapped_zip", "named_outside", "other_stage"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_ckpt_path_is_one_line_before_anything_is_built(kind, tmp_path, monkeypatch, caplog):
    marker = tmp_path / "pwned"
    path, says = _bad_ckpt(kind, tmp_path, marker)

    def nothing_built(*args, **kwargs):
        raise AssertionError("built something before ckpt_path was checked")

    monkeypatch.setattr(hydra.utils, "instantiate", nothing_built)
    cfg = compose_config("train", [*TINY, f"ckpt_path={path}"], tmp_path, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        train(cfg)
    assert exit_.value.code == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message.startswith(f"error: {path}: {says}")
    assert "\n" not in message and "weights_only" not in message and "False" not in message
    assert not marker.exists()
    if kind in ("pickle", "trapped_zip"):
        _armed(path, marker)


@pytest.mark.slow  # ~20 s: a tsd-train process (the in-process test above checks the message itself)
def test_tsd_train_prints_one_line_on_stderr(tmp_path):
    marker = tmp_path / "pwned"
    path, says = _bad_ckpt("trapped_zip", tmp_path, marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        str(BIN / "tsd-train"),
        *TINY,
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"ckpt_path={path}",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {path}: {says}")
    assert "Traceback" not in out.stderr + out.stdout and "weights_only" not in out.stderr
    assert not marker.exists()


@pytest.fixture(autouse=True)
def _info(caplog):
    caplog.set_level(logging.INFO, logger="temposyncdiff")


def _run(data_root: Path, tmp_path: Path, name: str, *extra: str) -> Path:
    """A tiny VAE run in ``tmp_path/name`` exporting to ``tmp_path/exports``; returns its run folder."""
    run = tmp_path / name
    train(compose_config("train", [*TINY, f"paths.checkpoint_dir={tmp_path / 'exports'}", *extra], data_root, run))
    return run


def test_a_best_model_path_named_by_a_checkpoint_is_never_loaded(data_root, tmp_path, caplog):
    steps = "model.scheduler.total_steps=10"  # one schedule for the first run and both resumed ones
    first = _run(
        data_root, tmp_path, "first", steps, "trainer.max_steps=2", "trainer.val_check_interval=2", "export=false"
    )
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    marker, elsewhere = tmp_path / "pwned", tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"state_dict": Trap(marker)}, elsewhere / "best.ckpt")
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint")]
    # consistent with itself (the trap is inside the folder it names), so it passes the ckpt_path check
    trap, state = str(elsewhere / "best.ckpt"), ckpt["callbacks"][key]
    state |= {
        "dirpath": str(elsewhere),
        "best_model_path": trap,
        "kth_best_model_path": trap,
        "last_model_path": "",
        "best_k_models": {trap: state["best_model_score"]},
    }
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)

    # resumed at its last step: training stops at once, no validation runs, so nothing is exported
    _run(data_root, tmp_path, "stops", steps, "trainer.max_steps=2", f"ckpt_path={crafted}")
    assert not marker.exists() and not (tmp_path / "exports").exists()
    assert "not exporting: no validation ran in this run" in caplog.text

    # resumed for one more step that validates: the export reads this run's own best checkpoint only
    caplog.clear()
    run = _run(
        data_root,
        tmp_path,
        "validates",
        steps,
        "trainer.max_steps=3",
        "trainer.val_check_interval=1",
        "model.scale_fit_batches=1",
        f"ckpt_path={crafted}",
    )
    meta = torch.load(tmp_path / "exports" / "vae_pretrained.pt", weights_only=True)["meta"]
    assert Path(meta["checkpoint"]).parent == (run / "checkpoints").resolve() and meta["source"] == "best"
    assert not marker.exists()
    _armed(elsewhere / "best.ckpt", marker)


def test_debug_and_unvalidated_runs_do_not_export(data_root, tmp_path, caplog):
    previous = save_weights(tmp_path / "exports" / "vae_pretrained.pt", "vae", TinyVAE(channels=(8,), patch_size=2))
    before = previous.read_bytes()
    _run(
        data_root,
        tmp_path,
        "unvalidated",
        "trainer.max_steps=2",
        "trainer.val_check_interval=50",
        "trainer.num_sanity_val_steps=1",
    )
    assert "not exporting: no validation ran in this run (val/psnr never logged)" in caplog.text
    _run(
        data_root,
        tmp_path,
        "debug",
        "debug=limit",
        "export=true",
        "trainer.max_epochs=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
    )
    assert "not exporting: debug=limit: a debug run never writes checkpoints/" in caplog.text
    assert previous.read_bytes() == before and os.listdir(tmp_path / "exports") == ["vae_pretrained.pt"]


def test_an_export_keeps_the_file_it_replaces(data_root, tmp_path, caplog):
    previous = save_weights(tmp_path / "exports" / "vae_pretrained.pt", "vae", TinyVAE(channels=(8,), patch_size=2))
    before = previous.read_bytes()
    when = time.mktime((2025, 1, 31, 14, 25, 1, 0, 0, -1))
    os.utime(previous, (when, when))
    _run(data_root, tmp_path, "run", "trainer.max_steps=1", "trainer.val_check_interval=1", "model.scale_fit_batches=1")
    kept = tmp_path / "exports" / "vae_pretrained.20250131-142501.pt"
    assert sorted(os.listdir(tmp_path / "exports")) == ["vae_pretrained.20250131-142501.pt", "vae_pretrained.pt"]
    assert kept.read_bytes() == before and previous.read_bytes() != before
    assert f"{previous} replaced; the previous export is kept as {kept.name}" in caplog.text


def test_keep_previous_never_replaces_a_file(tmp_path):
    path = tmp_path / "teacher_best.pt"
    assert keep_previous(path) is None
    path.write_bytes(b"first")
    one = keep_previous(path)
    (tmp_path / "new").write_bytes(b"second")
    os.replace(tmp_path / "new", path)  # as save_weights replaces a file
    os.utime(path, (one.stat().st_mtime,) * 2)  # the same second: the name gets a counter
    two = keep_previous(path)
    assert two.name == f"{one.stem}-1.pt" and one.read_bytes() == b"first" and two.read_bytes() == b"second"


def test_only_files_inside_the_run_folder_are_export_sources(tmp_path, caplog):
    folder, outside = tmp_path / "run" / "checkpoints", tmp_path / "outside.ckpt"
    folder.mkdir(parents=True)
    outside.write_bytes(b"x")
    (folder / "best.ckpt").write_bytes(b"x")
    (folder / "link.ckpt").symlink_to(outside)
    for name, expected in [
        (folder / "best.ckpt", folder / "best.ckpt"),
        (folder / "link.ckpt", None),
        (f"{folder}/../../outside.ckpt", None),
        (folder / "gone.ckpt", None),
        ("", None),
    ]:
        callback = SimpleNamespace(dirpath=str(folder), best_model_path=str(name), last_model_path="")
        assert own_checkpoint(callback, "best") == (expected and expected.resolve()), name
    assert caplog.text.count("not a file inside this run's checkpoint folder") == 3
