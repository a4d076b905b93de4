"""tsd-pipeline: runs steps in order, skips current ones, reruns on changed inputs/force, reports failures."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf, open_dict

from temposyncdiff.cli.pipeline import pipeline
from tests.conftest import compose_config


def _cfg(root, tmp_path, *overrides):
    cfg = compose_config("pipeline", list(overrides), root, tmp_path / "run")
    corpus = root / "data" / "s"
    steps = [
        {"name": "synth", "cmd": ["tsd-data", "synth", f"out={corpus}", "identities=1", "utterances=2", "image_size=32", "workers=1"],
         "outputs": [str(corpus / "synth_meta.json")]},
        {"name": "manifest", "cmd": ["tsd-data", "manifest", f"root={corpus}", "name=s", "val_ratio=0.5", "test_ratio=0", "split_by=utterance"],
         "inputs": [str(corpus / "synth_meta.json")], "outputs": [str(root / "data" / "manifests" / "s_train.jsonl")]},
    ]  # fmt: skip
    with open_dict(cfg):
        cfg.steps = OmegaConf.create(steps)
    return cfg


def test_runs_then_skips_then_reruns(tmp_path):
    root = tmp_path / "project"
    first = pipeline(_cfg(root, tmp_path))
    assert [s["status"].split()[0] for s in first["steps"]] == ["ran", "ran"]
    assert (root / "data" / "manifests" / "s_train.jsonl").exists()
    second = pipeline(_cfg(root, tmp_path))
    assert [s["status"] for s in second["steps"]] == ["skipped (current)"] * 2
    forced = pipeline(_cfg(root, tmp_path, "force=[manifest]"))
    assert [s["status"].split()[0] for s in forced["steps"]] == ["skipped", "ran"]
    (root / "data" / "s" / "synth_meta.json").touch()  # an input changed: the dependent step reruns
    changed = pipeline(_cfg(root, tmp_path, "only=[manifest]"))
    assert [s["step"] for s in changed["steps"]] == ["manifest"] and changed["steps"][0]["status"].startswith("ran")
    summary = json.loads((root / "outputs" / "pipeline" / "quickstart" / "summary.json").read_text())
    assert summary["steps"][0]["step"] == "manifest"


def test_failing_step_names_its_log(tmp_path):
    cfg = _cfg(tmp_path / "p", tmp_path)
    with open_dict(cfg):
        cfg.steps = OmegaConf.create(
            [{"name": "bad", "cmd": ["tsd-data", "manifest", "root=missing"], "outputs": ["x"]}]
        )
    with pytest.raises(SystemExit) as err:
        pipeline(cfg)
    assert err.value.code == 2
    assert (tmp_path / "p" / "logs" / "pipeline" / "bad.log").read_text().count("missing") >= 1


def test_unknown_step_name(tmp_path):
    with pytest.raises(SystemExit):
        pipeline(_cfg(tmp_path / "p", tmp_path, "force=[nope]"))


ENTRY = {"tsd-train": "train", "tsd-eval": "eval", "tsd-infer": "infer", "tsd-bench": "bench", "tsd-export": "export"}


@pytest.mark.parametrize("recipe", ["quickstart"])
def test_every_recipe_step_composes(recipe, tmp_path):
    """Each step's overrides exist in the config it runs (a typo would fail minutes into `make demo`)."""
    steps = compose_config("pipeline", [f"pipeline={recipe}"], tmp_path, tmp_path / "run").steps
    for step in steps:
        cmd, args = list(step.cmd[:1]), [str(a) for a in step.cmd[1:]]
        if cmd == ["tsd-data"]:
            name, args = "data", [f"data_command={args[0]}", *args[1:]]
        else:
            name = ENTRY[cmd[0]]
        cfg = compose_config(name, args, tmp_path, tmp_path / "run")
        assert cfg is not None, step.name
