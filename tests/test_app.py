"""tsd-app without a browser: model discovery, the page's options as tsd-infer settings, generation through
tsd-infer's make_sample, errors as the CLI's one line, the page's wiring."""

from __future__ import annotations

import json
import sys

import pytest

from temposyncdiff.app.jobs import (
    Request,
    error_line,
    generate,
    infer_settings,
    pick_model,
    summary_lines,
    whole,
)
from temposyncdiff.app.models import find_models
from temposyncdiff.data.video import probe
from temposyncdiff.errors import UserError
from temposyncdiff.utils.task import EXIT_USER_ERROR, USER_ERRORS
from tests.helpers.app_inputs import make_inputs
from tests.helpers.configs import compose_config
from tests.helpers.nets import save_tiny_exports
from tests.helpers.run_if import RunIf


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A project root with tiny exports in checkpoints/ (teacher + student) and checkpoints/own/alice/ (student)."""
    root = tmp_path_factory.mktemp("approot")
    save_tiny_exports(root / "checkpoints", kinds=("teacher", "student"))
    save_tiny_exports(root / "checkpoints" / "own" / "alice", kinds=("student",))
    return root


@pytest.fixture
def app(root, tmp_path):
    return compose_config("app", ["+infer.detector=center"], root, tmp_path / "run")


def test_find_models(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save_tiny_exports(ckpt, kinds=("teacher", "student"))
    save_tiny_exports(ckpt / "own" / "alice", kinds=("student",))
    save_tiny_exports(ckpt / "own" / "bob" / "deeper", kinds=("student",))  # three levels down: not searched
    save_tiny_exports(ckpt / ".hidden", kinds=("student",))
    (ckpt / "own" / "carol").mkdir()
    (ckpt / "own" / "carol" / "student_best.pt").write_bytes(b"")  # no vae beside it
    models = find_models([ckpt, ckpt / "own" / "alice", tmp_path / "missing"])
    assert [m.label for m in models] == [
        "student (checkpoints)",
        "student (checkpoints/own/alice)",
        "teacher (checkpoints)",
    ]
    alice = models[1]
    assert (alice.checkpoint, alice.vae) == (ckpt / "own/alice/student_best.pt", ckpt / "own/alice/vae_pretrained.pt")
    assert alice.onnx_dir == ckpt / "own" / "alice" / "onnx" / "student"


def test_options_as_infer_settings(app, tmp_path):
    assert [whole(v) for v in (None, "", 0, 2.0, 3, 2.5)] == [None, None, None, 2, 3, 2.5]
    model = pick_model(app, "teacher (checkpoints)")
    request = Request(model.label, "/up/face.png", "/up/speech.wav", "", steps=4.0, paste_back=False, threads=0)
    cfg = infer_settings(app, model, request, request.audio)
    assert (cfg.ref_image, cfg.video, cfg.audio) == ("/up/face.png", None, "/up/speech.wav")
    assert (cfg.stage, cfg.checkpoint, cfg.vae) == ("teacher", str(model.checkpoint), str(model.vae))
    assert (cfg.steps, cfg.threads, cfg.paste_back, cfg.runtime, cfg.onnx_dir) == (
        4,
        None,
        False,
        "torch",
        str(model.onnx_dir),
    )
    assert cfg.detector == "center" and cfg.save_frames is False  # the app's infer settings
    assert cfg.run_name.startswith("app-") and cfg.out_dir == f"{app.paths.outputs_dir}/samples/{cfg.run_name}"
    video = infer_settings(app, model, Request(model.label, "/up/Talk.MP4"), "/up/speech.wav")
    assert (video.ref_image, video.video) == (None, "/up/Talk.MP4")  # a video is re-voiced


def test_bad_app_settings_are_one_line(app, root, tmp_path):
    model = pick_model(app, "teacher (checkpoints)")
    with pytest.raises(UserError, match="model 'nope' is not there any more; choose one of: student"):
        pick_model(app, "nope")
    bad = compose_config("app", ["+infer.nope=1"], root, tmp_path / "run2")
    with pytest.raises(UserError, match="infer: Key 'nope' is not in struct"):
        infer_settings(bad, model, Request(model.label, "x.png"), "a.wav")
    app.model_dirs = [str(tmp_path / "empty")]
    with pytest.raises(UserError, match="no trained model in .*empty: train one"):
        pick_model(app, None)


def test_generate_writes_the_sample_tsd_infer_writes(app, tmp_path):
    face, speech, _ = make_inputs(tmp_path / "up")
    seen = []

    def progress(frames, total):
        for frame in frames:
            seen.append(total)
            yield frame

    request = Request("student (checkpoints/own/alice)", str(face), str(speech), threads=1)
    mp4, report = generate(app, request, progress)
    info = probe(mp4)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.num_frames == 25 == len(seen) == seen[0]
    assert (info.width, info.height) == (80, 96)  # pasted back (the form's default)
    summary = json.loads((mp4.parent / "summary.json").read_text())
    assert summary["checkpoint"].endswith("own/alice/student_best.pt") and summary["threads"] == 1
    assert not (mp4.parent / "frames").exists()  # save_frames=false
    lines = summary_lines(report)
    assert "**video**: 25 frames at 25 fps, 1 s of speech" in lines and "real-time factor" in lines
    assert f"x0, y0, x1, y1 = {', '.join(map(str, report['face']['box']))} (centre crop)" in lines
    assert lines.endswith("student, 2 steps (ddim), torch on cpu, 1 thread")


def test_a_typed_sentence_is_spoken(app, tmp_path):
    face, _, _ = make_inputs(tmp_path / "up")
    request = Request("teacher (checkpoints)", str(face), None, "Hello there.", paste_back=False)
    mp4, report = generate(app, request, lambda frames, total: frames)
    assert probe(mp4).audio_codec == "aac" and report["audio_seconds"] > 0.3
    assert (probe(mp4).width, probe(mp4).height) == (32, 32)  # the face crop


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"face": None}, "error: no photo or video: upload the face"),
        ({"audio": None}, "error: no speech: upload or record audio, or type a sentence"),
        ({"audio": None, "text": "x" * 1001}, "error: the sentence has 1001 characters; at most max_text_chars=1000"),
        ({"face": "broken.png"}, "error: broken.png: not an image, or a format PIL cannot read"),
        ({"audio": "broken.png"}, "error: broken.png: "),
        ({"steps": 2.5}, "error: steps=2.5: must be a whole number >= 1 or null"),
        ({"runtime": "onnx"}, "run `tsd-export stage=teacher"),
    ],
)
def test_bad_inputs_are_the_clis_one_line(app, root, tmp_path, changes, said):
    face, speech, broken = make_inputs(tmp_path / "up")
    files = {"face.png": face, "speech.wav": speech, "broken.png": broken}
    fields = {"face": "face.png", "audio": "speech.wav"} | changes
    fields = {k: str(files[v]) if v in files else v for k, v in fields.items()}
    request = Request("teacher (checkpoints)", **fields)
    samples = set((root / "outputs").glob("samples/*"))
    with pytest.raises(USER_ERRORS) as err:
        generate(app, request, lambda frames, total: frames)
    line = error_line(err.value, request.uploads())
    assert line.startswith("error: ") and said in line and "\n" not in line and str(tmp_path) not in line
    assert set((root / "outputs").glob("samples/*")) == samples  # nothing written


def test_tsd_app_refuses_a_bad_setting_in_one_line(monkeypatch, capfd, tmp_path):
    from temposyncdiff.cli.app import main

    monkeypatch.chdir(tmp_path)
    for argv, said in [
        (["nope.key=1"], "error: bad command-line setting: Could not override 'nope.key'"),
        (["+infer.nope=1", "extras.print_config=false"], "error: infer: Key 'nope' is not in struct"),
    ]:
        monkeypatch.setattr(sys, "argv", ["tsd-app", *argv])
        with pytest.raises(SystemExit) as stop:
            main()
        err = capfd.readouterr().err
        assert stop.value.code == EXIT_USER_ERROR and said in err and "Traceback" not in err


@RunIf(modules=("gradio",))
def test_page_queues_generation(app):
    from temposyncdiff.app.page import build_page

    page = build_page(app)
    generation = next(fn for fn in page.fns.values() if fn.name == "run")
    assert generation.concurrency_limit == app.concurrency == 1 and page._queue.max_size == app.queue_size
    assert not page.analytics_enabled
