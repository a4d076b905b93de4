"""tsd-pipeline: runs steps in order, skips current ones, reruns on changed inputs/force, reports failures."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf, open_dict

from temposyncdiff.cli.pipeline import pipeline
from temposyncdiff.utils.weights import load_net
from tests.helpers.configs import compose_config
from tests.helpers.run_if import RunIf


def _cfg(root, tmp_path, *overrides):
    cfg = compose_config("pipeline", list(overrides), root, tmp_path / "run")
    corpus = root / "data" / "s"
    steps = [
        {
            "name": "synth",
            "cmd": ["tsd-data", "synth", f"out={corpus}", "identities=1", "utterances=2", "image_size=32", "workers=1"],
            "outputs": [str(corpus / "synth_meta.json")],
        },
        {
            "name": "manifest",
            "cmd": [
                "tsd-data",
                "manifest",
                f"root={corpus}",
                "name=s",
                "val_ratio=0.5",
                "test_ratio=0",
                "split_by=utterance",
            ],
            "inputs": [str(corpus / "synth_meta.json")],
            "outputs": [str(root / "data" / "manifests" / "s_train.jsonl")],
        },
    ]
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


OWN = ["pipeline=own_video", "inputs=me.mp4", "name=me"]


@pytest.mark.parametrize(
    "recipe",
    [
        ["pipeline=quickstart"],
        OWN,
        [*OWN, "device=cuda", "image_size=256"],
        [*OWN, "first_stage=sd", "first_stage_path=x"],
    ],
    ids=["quickstart", "own", "gpu", "pretrained"],
)
def test_every_recipe_step_composes(recipe, tmp_path):
    """Each step's overrides exist in the config it runs (a typo would fail minutes into `make demo`)."""
    steps = compose_config("pipeline", recipe, tmp_path, tmp_path / "run").steps
    for step in steps:
        cmd, args = list(step.cmd[:1]), [str(a) for a in step.cmd[1:]]
        if cmd == ["tsd-data"]:
            name, args = "data", [f"data_command={args[0]}", *args[1:]]
        else:
            name = ENTRY[cmd[0]]
        cfg = compose_config(name, args, tmp_path, tmp_path / "run")
        assert cfg is not None, step.name


def _own_footage(synth_corpus, path):
    """One identity's synthetic utterances joined into one plain talking video (no transcript, no sidecars), at
    96 px with the face off-centre, so it goes through tsd-data prepare like a user's own footage."""
    import numpy as np

    from temposyncdiff.data.audio import load_audio
    from temposyncdiff.data.video import read_frames, write_video

    frames, waves = [], []
    for mp4 in sorted((synth_corpus / "spk000").glob("*.mp4")):
        video, _ = read_frames(mp4)
        frames.append(video)
        waves.append(load_audio(mp4, 16000, round(len(video) * 16000 / 25)))
    canvas = np.full((sum(len(f) for f in frames), 96, 96, 3), 40, np.uint8)
    canvas[:, 8:72, 20:84] = np.concatenate(frames)
    write_video(path, iter(canvas), 25.0, np.concatenate(waves), 16000)
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, RunIf(cuda=True)])])
def test_own_video_recipe_end_to_end(synth_corpus, tmp_path, device):
    """experiment=own_video on self-made footage: every step runs, outputs are namespaced by name, the summary lists
    the eval report; a name that is not a plain name is refused. ``device=cuda``: the recipe's GPU variant."""
    import subprocess
    import sys
    from pathlib import Path

    video = _own_footage(synth_corpus, tmp_path / "me.mp4")
    tsd = str(Path(sys.executable).parent / "tsd-pipeline")
    cmd = [
        tsd,
        "experiment=own_video",
        f"inputs={video}",
        "name=me",
        "image_size=32",
        "max_utterance_s=1.5",
        "train_steps={vae: 30, syncnet: 30, teacher: 30, student: 30}",
        "teacher_eval_steps=2",
        f"device={device}",
        f"paths.root_dir={tmp_path}",
        "extras.print_config=false",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "outputs" / "pipeline" / "own_video" / "me" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]][:3] == ["prepare", "visemes", "manifest"]
    assert all(s["status"].startswith("ran") for s in summary["steps"])
    for path in (
        "checkpoints/own/me/teacher_best.pt",
        "checkpoints/own/me/student_best.pt",
        "outputs/own/me/metrics/eval_report.json",
        "data/manifests/own_me_test.jsonl",
    ):
        assert (tmp_path / path).is_file(), path
    report = json.loads((tmp_path / "outputs" / "own" / "me" / "metrics" / "eval_report.json").read_text())
    student = report["generation"]["results"]["student@1"]
    assert student["status"] == "ok" and "lip_landmarks" in student
    cache = json.loads((tmp_path / "data" / "cache" / "own_me_train" / "cache_meta.json").read_text())
    assert cache["latents"]["mirror"]  # the recipe mirrors half the training clips: their latents are cached
    _, meta = load_net(tmp_path / "checkpoints" / "own" / "me" / "student_best.pt", "student")
    calibration = meta["lip_calibration"]  # the rendered lip gain: a row per multiplier tried, or why not
    assert len(calibration.get("rows", [])) == 5 or calibration["reason"].startswith("unavailable")
    bad = subprocess.run([*cmd[:3], "name=../x", *cmd[4:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "name=" in bad.stderr.strip().splitlines()[-1]


def test_own_video_recipe_on_a_gpu_at_256_px(tmp_path):
    """device=cuda: every training step runs with trainer=gpu, tsd-eval on cuda, tsd-bench's gpu preset; image_size
    reaches prepare, the cache and the stages. On the CPU (default) the stages keep trainer=cpu."""

    def commands(*overrides: str) -> dict[str, list[str]]:
        cfg = compose_config("pipeline", [*OWN, *overrides], tmp_path, tmp_path / "run")
        return {s["name"]: s["cmd"] for s in OmegaConf.to_container(cfg.steps, resolve=True)}

    gpu = commands("device=cuda", "image_size=256")
    trained = ("vae", "syncnet", "teacher", "student")
    assert all("trainer=gpu" in gpu[step] and "data.image_size=256" in gpu[step] for step in trained)
    assert "image_size=256" in gpu["prepare"] and "data.image_size=256" in gpu["cache"]
    assert "device=cuda" in gpu["eval"] and "bench=gpu" in gpu["bench"]
    cpu = commands()
    assert all("trainer=cpu" in cpu[step] for step in trained) and "bench=latency_cpu" in cpu["bench"]
