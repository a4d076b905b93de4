"""Inference: offline and streaming generation agree, frame counts follow the audio, tsd-infer writes a valid sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from temposyncdiff.cli.infer import infer
from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.video import probe, read_frames
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.inference.pipeline import TalkingHeadPipeline
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.utils.weights import save_weights
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny random VAE and denoiser exported as the stages export them."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    vae = TinyVAE(channels=(8,), patch_size=4)
    net = Denoiser(channels=(16, 16), attention_levels=(), cross_attention_levels=(1,), temporal_levels=(1,), heads=2,
                   cond_dim=32, audio_dim=16, window=4, audio_encoder={"dim": 16, "width": 16})  # fmt: skip
    schedule = dict(NoiseSchedule().scheduler.config)
    save_weights(out / "vae_pretrained.pt", "vae", vae, {"image_size": 32})
    meta = {"schedule": {k: schedule[k] for k in SCHEDULE_KEYS},
            "sampler": "ddim", "steps": 2, "guidance_scale": 1.0, "overlap": 1, "image_size": 32}  # fmt: skip
    save_weights(out / "teacher_best.pt", "teacher", net, meta)
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


def test_tsd_infer_writes_valid_sample(exports, synth_corpus, tmp_path):
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[1]
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(read_frames(mp4)[0][0]).save(ref)
    cfg = compose_config("infer", [f"ref_image={ref}", f"audio={mp4}", "stage=teacher", f"checkpoint={exports / 'teacher_best.pt'}",
                                   f"vae={exports / 'vae_pretrained.pt'}", "run_name=t"], tmp_path, tmp_path / "run")  # fmt: skip
    report = infer(cfg)
    out = tmp_path / "outputs" / "samples" / "t"
    info = probe(out / "sample.mp4")
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.fps == 25.0
    assert abs(len(load_audio(out / "sample.mp4")) / 16000 - info.num_frames / 25) < 1024 / 16000 + 1e-9
    assert len(list((out / "frames").glob("*.png"))) == info.num_frames == report["timings"]["frames"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["fps"] > 0 and summary["steps"] == 2 and summary["visemes"] == "audio encoder"
    assert not list(out.parent.glob(".*"))  # no partial folders left behind


def test_tsd_infer_bad_audio_is_one_line(exports, tmp_path):
    cfg = compose_config("infer", [f"ref_image={tmp_path / 'none.png'}", f"audio={tmp_path / 'none.wav'}", "stage=teacher",
                                   f"checkpoint={exports / 'teacher_best.pt'}", f"vae={exports / 'vae_pretrained.pt'}"],
                         tmp_path, tmp_path / "run")  # fmt: skip
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
    cfg = compose_config("infer", [f"ref_image={photo}", f"audio={mp3}", "stage=teacher", "paste_back=true", "save_frames=false",
                                   f"checkpoint={exports / 'teacher_best.pt'}", f"vae={exports / 'vae_pretrained.pt'}",
                                   "run_name=photo"], tmp_path, tmp_path / "run")  # fmt: skip
    report = infer(cfg)
    info = probe(tmp_path / "outputs" / "samples" / "photo" / "sample.mp4")
    seconds = len(speech.samples) / rate
    assert (
        info.video_codec == "h264" and info.audio_codec == "aac" and abs(info.num_frames / 25 - seconds) <= 0.04 + 0.03
    )
    assert (info.width, info.height) == (512, 600)  # pasted back into the whole photo
    assert report["face"]["method"] in ("dlib", "center")
