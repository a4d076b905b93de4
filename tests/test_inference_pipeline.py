"""Inference: offline and streaming generation agree, frame counts follow the audio, tsd-infer writes a valid sample."""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from temposyncdiff.cli.infer import check_settings, infer, main
from temposyncdiff.data.audio import AudioFeatures, load_audio
from temposyncdiff.data.video import probe, read_frames
from temposyncdiff.diffusion.schedule import NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, UtteranceMelMean
from temposyncdiff.inference.writer import MARKER, write_sample
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.utils.task import EXIT_INTERRUPTED, EXIT_USER_ERROR
from temposyncdiff.utils.weights import load_net
from tests.helpers.configs import compose_config
from tests.helpers.nets import save_tiny_exports, tiny_denoiser


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny random VAE and denoiser exported as the stages export them."""
    out = tmp_path_factory.mktemp("ckpt")
    save_tiny_exports(out)
    return out


def test_streaming_equals_offline_and_counts(exports, synth_corpus):
    pipe = TalkingHeadPipeline.from_checkpoints(exports / "teacher_best.pt", kind="teacher")
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[0]
    frames, _ = read_frames(mp4)
    wave = load_audio(mp4)[: 16000 * 1 + 2345]  # not a whole number of frames or windows
    offline, report = pipe.generate(frames[0], wave)
    assert len(offline) == round(len(wave) / 640) and offline[0].shape == (32, 32, 3) and offline[0].dtype == np.uint8
    assert report["frames"] == len(offline) and report["ms_per_frame"]["total"] > 0
    _, ref = pipe.reference(frames[0])
    chunks = [wave[i : i + 3200] for i in range(0, len(wave), 3200)]  # 200 ms chunks
    streamed = list(pipe.frames(ref, iter(chunks)))
    assert len(streamed) == len(offline)
    assert all(np.array_equal(a, b) for a, b in zip(offline, streamed))


@pytest.mark.parametrize("seconds", [0.12, 0.5, 2.03])
def test_any_length(exports, synth_corpus, seconds):
    pipe = TalkingHeadPipeline.from_checkpoints(exports / "teacher_best.pt", kind="teacher", detector="center")
    frames, _ = read_frames(sorted(synth_corpus.glob("*/*.mp4"))[0])
    wave = np.random.default_rng(0).normal(0, 0.1, int(seconds * 16000)).astype(np.float32)
    out, _ = pipe.generate(frames[0], wave)
    assert len(out) == max(1, round(seconds * 25))


def _tsd_infer(monkeypatch, capfd, cwd, args: dict) -> tuple[int, str, str]:
    """Run tsd-infer in this process as the console script does, in ``cwd``: (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    argv = [f"{k}={v}" for k, v in args.items() if v is not None]
    monkeypatch.setattr(sys, "argv", ["tsd-infer", *argv, "extras.print_config=false"])
    capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_args(exports, synth_corpus, tmp_path_factory) -> dict:
    """tsd-infer settings for the tiny teacher export, a corpus utterance's audio and a reference frame."""
    folder = tmp_path_factory.mktemp("inputs")
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[1]
    Image.fromarray(read_frames(mp4)[0][0]).save(folder / "ref.png")
    Image.new("RGB", (20, 40)).save(folder / "tiny.png")
    return {
        "ref_image": folder / "ref.png",
        "audio": mp4,
        "stage": "teacher",
        "detector": "center",
        "checkpoint": exports / "teacher_best.pt",
        "vae": exports / "vae_pretrained.pt",
    }


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"audio": None}, "audio required"),
        ({"fps": 0}, "fps=0"),
        ({"steps": 0}, "steps=0"),
        ({"run_name": "../../x"}, "run_name="),
        ({"out_dir": "."}, "out_dir=."),
        ({"ref_image": "tiny.png"}, "min_face_px=32"),
        ({"audio": "missing.wav"}, "missing.wav: file not found"),
        ({"viseme_file": "missing.npy"}, "missing.npy: file not found"),
    ],
)
def test_tsd_infer_bad_settings_are_one_line_before_models_load(cli_args, tmp_path, monkeypatch, capfd, changes, named):
    monkeypatch.setattr(TalkingHeadPipeline, "from_checkpoints", lambda *a, **k: pytest.fail("models loaded"))
    files = cli_args["ref_image"].parent
    args = cli_args | {
        k: files / v if k in ("ref_image", "audio", "viseme_file") and v else v for k, v in changes.items()
    }
    code, out, err = _tsd_infer(monkeypatch, capfd, tmp_path, args)
    assert code == EXIT_USER_ERROR and "Traceback" not in out + err
    assert err.strip().count("\n") == 0 and named in err
    assert sorted(os.listdir(tmp_path)) == ["logs"]  # nothing written but the run's log


@pytest.fixture(scope="module")
def infer_cfg(cli_args, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    return compose_config("infer", [f"{k}={v}" for k, v in cli_args.items()], root, root / "run")


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("fps=30", "fps=30: the models generate 25 fps"),
        ("fps=abc", "fps=abc: must be a number > 0"),
        ("steps=1.5", "steps=1.5: must be a whole number >= 1 or null"),
        ("threads=0", "threads=0: must be a whole number >= 1"),
        ("min_face_px=-1", "min_face_px=-1"),
        ("guidance_scale=nan", "guidance_scale=nan"),
        ("seed=abc", "seed=abc: must be a whole number >= 0"),
        ("run_name=''", "run_name=''"),
        ("out_dir=..", "out_dir=.."),
        ("stage=../x", "stage=../x: choose student | teacher"),
        ("detector=mtcnn", "detector=mtcnn"),
        ("runtime=tensorrt", "runtime=tensorrt"),
        ("runtime=fp16", "runtime=fp16 runs on cuda: use device=cuda"),
        ("runtime_candidates=[int8]", "runtime_candidates: must include torch"),
        ("runtime_candidates=[torch,fp8]", "runtime_candidates: unknown ['fp8']"),
        ("runtime_min_psnr=-1", "runtime_min_psnr=-1"),
        ("runtime_repeats=0", "runtime_repeats=0"),
        ("sampler=euler", "sampler=euler"),
        ("device=gpu9", "device=gpu9"),
        ("ref_image=missing.png", "missing.png: file not found"),
    ],
)
def test_check_settings(infer_cfg, setting, named):
    cfg = copy.deepcopy(infer_cfg)
    cfg.merge_with_dotlist([setting])
    with pytest.raises(UserError, match=re.escape(named)) as err:
        check_settings(cfg)
    assert "\n" not in str(err.value)


def test_tsd_infer_never_replaces_a_users_folder(cli_args, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(TalkingHeadPipeline, "from_checkpoints", lambda *a, **k: pytest.fail("models loaded"))
    mine = tmp_path / "outputs" / "samples" / "holiday"
    mine.mkdir(parents=True)
    (mine / "sample.mp4").write_bytes(b"the user's video")
    (mine / "notes.txt").write_text("mine\n")
    for args, said in [
        ({"run_name": "holiday"}, f"{mine}: not a sample folder written by tsd-infer"),
        ({"out_dir": mine.parent}, f"{mine.parent}: not a sample folder written by tsd-infer"),
        ({"out_dir": "."}, f"out_dir=.: {tmp_path} is or holds {tmp_path}"),
    ]:
        code, _, err = _tsd_infer(monkeypatch, capfd, tmp_path, cli_args | args)
        assert code == EXIT_USER_ERROR and said in err
        assert (mine / "sample.mp4").read_bytes() == b"the user's video"
        assert (mine / "notes.txt").read_text() == "mine\n"
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "sample.mp4"]


def test_tsd_infer_writes_valid_sample(exports, synth_corpus, tmp_path, monkeypatch, capfd):
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[1]
    ref = tmp_path / "ref.png"
    Image.fromarray(read_frames(mp4)[0][0]).save(ref)
    cfg = compose_config(
        "infer",
        [
            f"ref_image={ref}",
            f"audio={mp4}",
            "stage=teacher",
            f"checkpoint={exports / 'teacher_best.pt'}",
            f"vae={exports / 'vae_pretrained.pt'}",
            "run_name=t",
        ],
        tmp_path,
        tmp_path / "run",
    )
    report = infer(cfg)
    out = tmp_path / "outputs" / "samples" / "t"
    info = probe(out / "sample.mp4")
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.fps == 25.0
    assert abs(len(load_audio(out / "sample.mp4")) / 16000 - info.num_frames / 25) < 1024 / 16000 + 1e-9
    assert len(list((out / "frames").glob("*.png"))) == info.num_frames == report["timings"]["frames"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["fps"] > 0 and summary["steps"] == 2 and summary["visemes"] == "audio encoder"
    assert json.loads((out / MARKER).read_text())["written_by"] == "tsd-infer"
    assert not list(out.parent.glob(".*"))  # no partial folders left behind
    # the console script, run again: its own sample is replaced
    args = {
        "ref_image": ref,
        "audio": mp4,
        "stage": "teacher",
        "checkpoint": exports / "teacher_best.pt",
        "vae": exports / "vae_pretrained.pt",
        "run_name": "t",
        "save_frames": "false",
    }
    code, _, err = _tsd_infer(monkeypatch, capfd, tmp_path, args)
    assert code == 0, err
    assert not (out / "frames").exists() and probe(out / "sample.mp4").num_frames == info.num_frames
    assert json.loads((out / "summary.json").read_text())["date"] >= summary["date"]
    assert not list(out.parent.glob(".*"))


def test_tsd_infer_paste_back_into_an_odd_sized_image(exports, synth_corpus, tmp_path):
    ref = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(ref)
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[0]
    cfg = compose_config(
        "infer",
        [
            f"ref_image={ref}",
            f"audio={mp4}",
            "stage=teacher",
            "paste_back=true",
            "detector=center",
            f"checkpoint={exports / 'teacher_best.pt'}",
            f"vae={exports / 'vae_pretrained.pt'}",
            "save_frames=false",
            "run_name=odd",
        ],
        tmp_path,
        tmp_path / "run",
    )
    infer(cfg)
    info = probe(tmp_path / "outputs" / "samples" / "odd" / "sample.mp4")
    assert (info.width, info.height) == (46, 38)  # padded by one edge pixel each way for H.264
    cfg.steps = 5000
    with pytest.raises(SystemExit) as err:
        infer(cfg)  # more steps than the sampler allows: refused once the checkpoint says so
    assert err.value.code == EXIT_USER_ERROR


def test_tsd_infer_ctrl_c_keeps_the_previous_sample(cli_args, tmp_path, monkeypatch, capfd):
    out = tmp_path / "outputs" / "samples" / "s"
    write_sample(out, iter([np.zeros((32, 32, 3), np.uint8)] * 3), np.zeros(1920, np.float32), 16000, 25.0)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(self, *args, **kwargs):
        yield np.zeros((32, 32, 3), np.uint8)
        raise KeyboardInterrupt

    monkeypatch.setattr(TalkingHeadPipeline, "frames", interrupted)
    code, _, err = _tsd_infer(monkeypatch, capfd, tmp_path, cli_args | {"run_name": "s"})
    assert code == EXIT_INTERRUPTED and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.parent.glob(".*"))  # the partial folder is gone


def test_tsd_infer_bad_audio_is_one_line(exports, tmp_path):
    cfg = compose_config(
        "infer",
        [
            f"ref_image={tmp_path / 'none.png'}",
            f"audio={tmp_path / 'none.wav'}",
            "stage=teacher",
            f"checkpoint={exports / 'teacher_best.pt'}",
            f"vae={exports / 'vae_pretrained.pt'}",
        ],
        tmp_path,
        tmp_path / "run",
    )
    with pytest.raises(SystemExit) as err:
        infer(cfg)
    assert err.value.code == 2


def test_tsd_infer_real_photo_and_speech(exports, tmp_path):
    """grace_hopper.jpg (face found, pasted back) + espeak-ng speech as a 22.05 kHz stereo mp3 -> a valid sample."""
    import av
    import matplotlib

    from temposyncdiff.data.tts import Espeak

    speech = Espeak().synthesize("The quick brown fox jumps over the lazy dog.")
    mp3, rate = tmp_path / "speech.mp3", speech.sample_rate
    with av.open(str(mp3), "w") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.repeat(speech.samples[None], 2, 0), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    photo = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    cfg = compose_config(
        "infer",
        [
            f"ref_image={photo}",
            f"audio={mp3}",
            "stage=teacher",
            "paste_back=true",
            "save_frames=false",
            f"checkpoint={exports / 'teacher_best.pt'}",
            f"vae={exports / 'vae_pretrained.pt'}",
            "run_name=photo",
        ],
        tmp_path,
        tmp_path / "run",
    )
    report = infer(cfg)
    info = probe(tmp_path / "outputs" / "samples" / "photo" / "sample.mp4")
    seconds = len(speech.samples) / rate
    assert (
        info.video_codec == "h264" and info.audio_codec == "aac" and abs(info.num_frames / 25 - seconds) <= 0.04 + 0.03
    )
    assert (info.width, info.height) == (512, 600)  # pasted back into the whole photo
    assert report["face"]["method"] in ("dlib", "center")
    assert report["face"]["faces_found"] == int(report["face"]["method"] == "dlib")


def test_pose_source_drives_every_window_of_a_pose_net(exports):
    """A net built with pose_mask re-voices the given frames window by window; without them it takes the photo."""
    torch.manual_seed(1)
    net = Denoiser(
        channels=(16,),
        attention_levels=(),
        cross_attention_levels=(),
        temporal_levels=(),
        heads=2,
        cond_dim=32,
        audio_dim=16,
        window=4,
        audio_encoder={"dim": 16, "width": 16},
        pose_mask=(0.25, 0.5, 0.75, 1.0),
    )
    with torch.no_grad():  # zero-initialised output layers would hide the pose input from a fresh net
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    vae = TinyVAE(channels=(8,), patch_size=4)
    pipe = TalkingHeadPipeline(net, vae, dict(NoiseSchedule().scheduler.config), steps=1, overlap=1, image_size=32)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (11, 32, 32, 3), dtype=np.uint8)
    wave = rng.standard_normal(16000 * 11 // 25).astype(np.float32) * 0.1
    face, ref = pipe.reference(video[0])
    asked = []

    def pose(a: int, b: int) -> np.ndarray:
        asked.append((a, b))
        return video[a:b]

    revoiced = np.stack(list(pipe.frames(ref, wave, pose=pose)))
    photo = np.stack(list(pipe.frames(ref, wave)))
    assert len(revoiced) == len(photo) == 11
    assert asked and asked[0][0] == 0 and max(b for _, b in asked) >= 11
    assert not np.array_equal(revoiced, photo)


def test_utterance_mel_mean_of_a_whole_and_of_a_growing_waveform():
    audio, rng = AudioFeatures(), np.random.default_rng(0)
    short = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    assert torch.allclose(UtteranceMelMean(audio)(short), audio.log_mel(short).mean(1), atol=1e-5)
    long = (rng.standard_normal(16000 * 25) * np.linspace(0.01, 0.3, 16000 * 25)).astype(np.float32)
    running = UtteranceMelMean(audio, block_s=5.0)
    means = [running(long[: k * 16000]) for k in range(1, 26)]  # as streamed, one second at a time
    assert running.done == 20 * 16000  # four whole blocks summed once; the tail keeps at least one
    assert torch.allclose(means[-1], audio.log_mel(long).mean(1), atol=1e-2)  # block edges: one frame each
    assert (means[-1] - means[0]).abs().max() > 0.5  # the mean of what has arrived: it grows louder


def test_a_mel_norm_net_reads_the_utterances_mean(exports):
    """An encoder built with mel_norm=utterance gets the whole audio's mean log-mel offline, the arrived audio's
    streamed; a plain one gets none."""
    vae, _ = load_net(exports / "vae_pretrained.pt", "vae")
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(16000 * 2) * np.linspace(0.01, 0.5, 16000 * 2)).astype(np.float32)
    audio = AudioFeatures()
    for norm in ("utterance", "none"):
        net = tiny_denoiser(mel_norm=norm)
        pipe = TalkingHeadPipeline(net, vae, dict(NoiseSchedule().scheduler.config), steps=1, overlap=1, image_size=32)
        seen, embed = [], net.embed_audio
        net.embed_audio = lambda mel, mel_mean=None: seen.append(mel_mean) or embed(mel, mel_mean)  # noqa: B023
        _, ref = pipe.reference(np.zeros((32, 32, 3), np.uint8), detector="center")
        offline = list(pipe.frames(ref, wave))
        if norm == "none":
            assert seen and all(m is None for m in seen)
            continue
        assert len(offline) == 50 and all(torch.equal(m, seen[0]) for m in seen)
        assert torch.allclose(seen[0][0], audio.log_mel(wave).mean(1), atol=1e-5)
        seen.clear()
        streamed = list(pipe.frames(ref, iter(np.split(wave, 10))))
        assert len(streamed) == 50 and not torch.allclose(seen[0], seen[-1])
        assert torch.allclose(seen[-1][0], audio.log_mel(wave).mean(1), atol=1e-5)
