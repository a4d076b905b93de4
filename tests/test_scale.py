"""Scale: two-process DDP on CPU, trainer options (bf16, accumulation, compile, FSDP), the SLURM sweep launcher."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from temposyncdiff.training import train
from tests.helpers.configs import REPO, compose_config
from tests.helpers.configs import TINY_VAE as TINY

BIN = Path(sys.executable).parent
TRAINERS = sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))


class ValProbe(L.Callback):
    """Writes, per rank and validation, the clips it validated on and the logged val/ metrics."""

    def __init__(self, out: str):
        self.out, self.ids = Path(out), []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.ids += [f"{i}@{int(s)}" for i, s in zip(batch.ids, batch.start)]

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.json"
        path.write_text(json.dumps({"ids": self.ids, "metrics": metrics}))
        self.ids = []


def test_ddp_sim_syncs_metrics_and_exports_once(data_root, tmp_path):
    probe, exports, run = tmp_path / "probe", tmp_path / "checkpoints", tmp_path / "run"
    cmd = [
        str(BIN / "tsd-train"),
        *TINY,
        "trainer=ddp_sim",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        f"paths.root_dir={data_root}",
        f"paths.checkpoint_dir={exports}",
        f"hydra.run.dir={run}",
        "model.scale_fit_batches=2",
        "extras.print_config=false",
        "+callbacks.probe._target_=tests.test_scale.ValProbe",
        f"+callbacks.probe.out={probe}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=data_root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((probe / f"rank{r}_step4.json").read_text()) for r in (0, 1))
    assert r0["ids"] and r1["ids"] and not set(r0["ids"]) & set(r1["ids"])  # each rank validated its own shard
    assert r0["metrics"].keys() >= {"val/loss", "val/psnr", "val/ssim"}
    assert r0["metrics"] == r1["metrics"]  # ... and both report the same, averaged numbers
    assert sorted(p.name for p in exports.iterdir()) == ["vae_pretrained.pt"]  # one export, no stray temp files
    assert torch.load(exports / "vae_pretrained.pt", weights_only=True)["format"] == "temposyncdiff.vae"
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert (out.stdout + out.stderr).count("exported ") == 1


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_takes_bf16_accumulation_and_compile(data_root, tmp_path, name):
    extra = ["trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=4", "compile=true"]
    cfg = compose_config("train", [*TINY, f"trainer={name}", *extra], data_root, tmp_path / "run")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accumulate_grad_batches == 4 and cfg.compile
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        pytest.skip(f"trainer={name} needs a GPU to instantiate")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.accumulate_grad_batches == 4 and "bf16" in str(trainer.precision)


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_with_accumulation_trains_and_exports(data_root, tmp_path, compile_):
    cfg = compose_config(
        "train",
        [
            *TINY,
            "trainer.precision=bf16-mixed",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=2",
            "trainer.val_check_interval=4",
            f"compile={compile_}",
            "model.scale_fit_batches=2",
            f"paths.checkpoint_dir={tmp_path / 'exports'}",
        ],
        data_root,
        tmp_path / "run",
    )
    assert train(cfg) is not None
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and (tmp_path / "exports" / "vae_pretrained.pt").is_file()


def test_fsdp_config_builds_its_strategy(data_root, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_config("train", [*TINY, "trainer=fsdp"], data_root, tmp_path / "run")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and cfg.trainer.precision == "bf16-mixed"
    assert strategy.kwargs["auto_wrap_policy"].keywords == {"min_num_params": 1_000_000}


def _stage(data_root, tmp_path, *extra):
    cfg = compose_config("train", [*TINY, *extra], data_root, tmp_path / "run")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    model = hydra.utils.instantiate(model_cfg)
    model.compile_net = cfg.compile
    return model


def test_compile_flag_compiles_the_net_in_place(data_root, tmp_path):
    plain = _stage(data_root, tmp_path)
    plain.configure_model()
    assert plain.net._compiled_call_impl is None
    model = _stage(data_root, tmp_path, "compile=true")
    names = list(model.state_dict())
    model.configure_model()  # wraps the forward; compiling happens at the first call
    assert model.net._compiled_call_impl is not None and list(model.state_dict()) == names


@pytest.mark.slow
def test_compiled_net_matches_eager(data_root, tmp_path):
    model, x = _stage(data_root, tmp_path, "compile=true"), torch.rand(2, 3, 64, 64) * 2 - 1
    eager = model.net(x, sample=False)[0]
    model.configure_model()
    assert torch.allclose(model.net(x, sample=False)[0], eager, atol=1e-4)  # 10-50 s of compiling on 2 cores


def test_submitit_slurm_launcher_config(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[scale] for SLURM sweeps")
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Hydra notes it checks the file against the plugin's schema
        cfg = compose_config(
            "train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], tmp_path, tmp_path / "run"
        )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.params["partition"] == "gpu" and launcher.params["submitit_folder"].endswith(".submitit/%j")


def _setup_stage(stage: str, data_root: Path, tmp_path: Path) -> list[str]:
    """Tiny overrides for ``stage`` with its inputs (VAE, latents, teacher, expert) made under tmp_path."""
    if stage == "syncnet":
        from tests.helpers.configs import TINY_SYNCNET as tiny

        return [o for o in tiny if not o.startswith("debug=")] + ["data.num_workers=0", "model.lse_vshift=2"]
    if stage == "teacher":
        from tests.helpers.configs import TINY_TEACHER as tiny
        from tests.helpers.nets import teacher_run as _setup
    else:
        from tests.helpers.configs import TINY_STUDENT as tiny
        from tests.helpers.nets import student_run as _setup
    _, ckpt = _setup(data_root, tmp_path, **({"latents": True} if stage == "teacher" else {}))
    return [*tiny, f"paths.checkpoint_dir={ckpt}", f"data.cache_dir={tmp_path / 'cache'}", "model.val_utterances=0"]


def _train_losses(run: Path) -> list[float]:
    rows = [r for r in csv.DictReader(next(run.rglob("metrics.csv")).open()) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in rows]


@pytest.mark.slow  # ~20 s per stage: two-process DDP runs beside one-process runs
@pytest.mark.parametrize("stage", ["syncnet", "teacher", "student"])
def test_ddp_sim_trains_each_stage_as_one_process_does(stage, data_root, tmp_path):
    """Two processes with half the batch each see, per step, the same clips as one process with the whole batch
    (one permutation, split by rank), and DDP averages their gradients: the loss curves must agree in shape."""
    steps = 8
    common = [
        *_setup_stage(stage, data_root, tmp_path),
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        f"paths.root_dir={data_root}",
        "extras.print_config=false",
        "export=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    curves = {}
    for name, extra in (("one", ["data.batch_size=4"]), ("ddp", ["trainer=ddp_sim", "data.batch_size=2"])):
        run = tmp_path / name
        cmd = [str(BIN / "tsd-train"), *common, *extra, f"hydra.run.dir={run}"]
        out = subprocess.run(cmd, cwd=data_root, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        curves[name] = np.array(_train_losses(run))
    one, ddp = curves["one"], curves["ddp"]
    assert len(one) == len(ddp) == steps and np.isfinite(one).all() and np.isfinite(ddp).all()
    # rank 0 logs the loss of its own half batch, and the diffusion stages draw noise and timesteps per rank, so
    # single steps differ by sampling noise; the level of the curve and its trend must not
    assert 0.75 < ddp.mean() / one.mean() < 1.33, (one, ddp)
    assert abs(np.polyfit(np.arange(steps), ddp, 1)[0] - np.polyfit(np.arange(steps), one, 1)[0]) < 0.05 * one.mean(), (
        one,
        ddp,
    )
