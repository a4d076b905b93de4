"""Hydra sweeps through tsd-train: a basic multirun (one dir per job), the joblib launcher, the student's Optuna search."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from temposyncdiff.cli.common import compose_run
from tests.helpers.configs import TINY_STUDENT as STUDENT
from tests.helpers.configs import TINY_VAE as VAE
from tests.helpers.nets import student_run as _setup
from tests.test_cli import BIN

pytestmark = pytest.mark.slow  # Hydra multiruns: a training process per job


def tsd_train(args: list[str], root: Path, cwd: Path) -> Path:
    """Run ``tsd-train`` (one thread per job) and return its multirun dir under ``root/logs``."""
    out = subprocess.run(
        [
            str(BIN / "tsd-train"),
            *args,
            f"paths.root_dir={root}",
            f"paths.log_dir={cwd / 'logs'}",
            "extras.print_config=false",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sweep,) = (cwd / "logs" / "train" / "multiruns").iterdir()
    return sweep


def test_multirun_gives_each_job_its_own_run_dir(data_root, tmp_path):
    lrs = ["0.001", "0.002", "0.003"]
    sweep = tsd_train(
        [
            "-m",
            *VAE,
            "trainer.max_steps=1",
            "export=false",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"model.optimizer.lr={','.join(lrs)}",
        ],
        data_root,
        tmp_path,
    )
    assert (sweep / "multirun.yaml").is_file()
    for num, lr in enumerate(lrs):
        job = sweep / str(num)
        assert f"model.optimizer.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert list((job / "csv").rglob("metrics.csv")) and (job / "checkpoints" / "last.ckpt").is_file()


def test_joblib_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_run("train", ["experiment=quickstart/vae", "hydra/launcher=joblib_cpu"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_student_optuna_search_runs_trials(data_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_run(
        "train", ["experiment=quickstart/student", "hparams_search=student_optuna", "model.steps=4"], hydra=True
    )
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert set(params) == {
        "model.identity_weight",
        "model.temporal_weight",
        "model.mouth_weight",
        "model.data_weight",
        "model.steps",
    }
    assert cfg.optimized_metric == "val/student4/psnr_mouth" and cfg.export is False

    _, ckpt = _setup(data_root, tmp_path)  # tiny VAE, teacher and lip-sync expert under tmp_path/ckpt
    sweep = tsd_train(
        [
            *STUDENT,
            "hparams_search=student_optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=3",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "model.val_steps=[1,2,4]",
            f"paths.checkpoint_dir={ckpt}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        data_root,
        tmp_path,
    )
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == set(params) and best.best_value > 0
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert not (ckpt / "student_best.pt").exists()
