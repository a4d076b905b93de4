"""Every entry config and experiment composes, and the pieces a run builds instantiate."""

from __future__ import annotations

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import REPO

CONF = REPO / "conf"
EXPERIMENTS = sorted(
    p.relative_to(CONF / "experiment").with_suffix("").as_posix() for p in (CONF / "experiment").rglob("*.yaml")
)


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_there_are_experiments():
    assert "quickstart/vae" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = _compose(
        "train", [f"experiment={experiment}", f"paths.root_dir={tmp_path}", "paths.output_dir=" + str(tmp_path)]
    )
    assert cfg.stage == cfg.model.stage and cfg.monitor.metric.startswith("val/")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    model = hydra.utils.instantiate(model_cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    hydra.utils.instantiate(cfg.data)
    for group in ("callbacks", "logger"):
        for entry in cfg[group].values():
            hydra.utils.instantiate(entry)


@pytest.mark.parametrize("option", ["trainer=cpu", "trainer=gpu", "trainer=ddp", "trainer=ddp_sim", "logger=csv",
                                    "logger=tensorboard", "logger=wandb", "logger=none", "logger=many", "debug=fdr",
                                    "debug=overfit", "debug=limit", "callbacks=none"])  # fmt: skip
def test_groups_compose(option, tmp_path):
    cfg = _compose(
        "train", ["experiment=quickstart/vae", option, f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    )
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_hparams_search_composes(search, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"experiment=quickstart/{search.split('_')[0]}", f"hparams_search={search}"],
            return_hydra_config=True,
        )  # each search belongs to the stage its name starts with
    assert cfg.hydra.sweeper.params and cfg.optimized_metric.startswith("val/")


@pytest.mark.parametrize("command", ["synth", "manifest", "prepare", "visemes", "cache", "shards"])
def test_data_commands_compose(command, tmp_path):
    cfg = _compose("data", [f"data_command={command}", f"paths.root_dir={tmp_path}"])
    assert cfg.command == command


def test_hydra_run_dir_layout():
    cfg = _compose("train", [])
    assert cfg.task_name == "train"
    raw = OmegaConf.load(CONF / "hydra" / "default.yaml")
    assert OmegaConf.to_container(raw)["run"]["dir"].startswith("${paths.log_dir}/${task_name}/runs/")
