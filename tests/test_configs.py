"""Every entry config and experiment composes, and the pieces a run builds instantiate."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

from temposyncdiff.cli.common import compose_run
from tests.helpers.configs import REPO

CONF = REPO / "conf"
EXPERIMENTS = sorted(
    p.relative_to(CONF / "experiment").with_suffix("").as_posix() for p in (CONF / "experiment").rglob("*.yaml")
)


def test_there_are_experiments():
    assert "quickstart/vae" in EXPERIMENTS


# what an experiment needs from the user to instantiate: a pretrained first stage's weights (random init here)
NEEDS = {"own/vae_pretrained": ["model.net.config={}"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_run(
        "train",
        [
            f"experiment={experiment}",
            f"paths.root_dir={tmp_path}",
            "paths.output_dir=" + str(tmp_path),
            *NEEDS.get(experiment, []),
        ],
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


@pytest.mark.parametrize(
    "option",
    [
        "trainer=cpu",
        "trainer=gpu",
        "trainer=ddp",
        "trainer=ddp_sim",
        "logger=csv",
        "logger=tensorboard",
        "logger=wandb",
        "logger=none",
        "logger=many",
        "debug=fdr",
        "debug=overfit",
        "debug=limit",
        "callbacks=none",
    ],
)
def test_groups_compose(option, tmp_path):
    cfg = compose_run(
        "train", ["experiment=quickstart/vae", option, f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    )
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_hparams_search_composes(search, tmp_path):
    # each search belongs to the stage its name starts with
    cfg = compose_run(
        "train", [f"experiment=quickstart/{search.split('_')[0]}", f"hparams_search={search}"], hydra=True
    )
    assert cfg.hydra.sweeper.params and cfg.optimized_metric.startswith("val/")


@pytest.mark.parametrize("command", ["synth", "manifest", "prepare", "visemes", "cache", "shards"])
def test_data_commands_compose(command, tmp_path):
    cfg = compose_run("data", [f"data_command={command}", f"paths.root_dir={tmp_path}"])
    assert cfg.command == command


def test_hydra_run_dir_layout():
    cfg = compose_run("train", [])
    assert cfg.task_name == "train"
    raw = OmegaConf.load(CONF / "hydra" / "default.yaml")
    assert OmegaConf.to_container(raw)["run"]["dir"].startswith("${paths.log_dir}/${task_name}/runs/")
