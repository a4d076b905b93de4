"""The synthetic corpus: streams, durations, transcript format and timing, determinism, missing espeak-ng."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from temposyncdiff.data import tts
from temposyncdiff.data.audio import load_audio
from temposyncdiff.data.synthetic import corpus as synth
from temposyncdiff.data.transcript import read_transcript
from temposyncdiff.data.video import probe, read_frames
from temposyncdiff.data.visemes import NUM_VISEMES, SILENCE


def test_layout_streams_and_durations(synth_corpus):
    mp4s = sorted(synth_corpus.glob("*/*.mp4"))
    assert len(mp4s) == 9 and len({p.parent.name for p in mp4s}) == 3
    for mp4 in mp4s:
        info = probe(mp4)
        assert info.video_codec == "h264" and info.fps == 25.0 and info.width == info.height == 64
        assert info.audio_codec == "aac" and info.audio_sample_rate == 16000 and info.audio_channels == 1
        audio = load_audio(mp4)
        # AAC decodes with up to one codec frame of end padding; the real speech ends with the video
        assert abs(len(audio) / 16000 - info.num_frames / 25) < 1024 / 16000 + 1e-9
        visemes = np.load(mp4.with_suffix(".visemes.npy"))
        mouth = np.load(mp4.with_suffix(".mouth.npy"))
        assert visemes.dtype == np.int64 and visemes.shape == (info.num_frames,)
        assert visemes.min() >= 0 and visemes.max() < NUM_VISEMES
        assert mouth.dtype == np.float32 and mouth.shape == (info.num_frames, 5)


def test_transcript_format_and_speech_inside_word_spans(synth_corpus):
    for mp4 in sorted(synth_corpus.glob("*/*.mp4")):
        txt = mp4.with_suffix(".txt")
        lines = txt.read_text().splitlines()
        assert (
            lines[0].startswith("Text:  ") and lines[1].startswith("Conf:  ") and lines[3] == "WORD START END ASDSCORE"
        )
        tr = read_transcript(txt)
        assert tr.text == " ".join(w for w, _, _ in tr.words) and tr.text.isupper()
        starts = [s for _, s, _ in tr.words]
        assert starts == sorted(starts)
        audio = load_audio(mp4)
        hop = 160
        energy = np.array([np.mean(audio[i : i + hop] ** 2) for i in range(0, len(audio) - hop, hop)])
        speech = energy > 0.02 * energy.max()
        t = np.arange(len(energy)) * hop / 16000 + hop / 32000
        inside = np.zeros_like(speech)
        for _, s, e in tr.words:
            inside |= (t >= s - 0.02) & (t <= e + 0.02)
        assert speech[inside].mean() > 0.5  # words are mostly voiced
        assert (speech & inside).sum() / speech.sum() > 0.95  # nearly all speech energy lies inside word spans


def test_lips_move_with_speech(synth_corpus):
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[0]
    visemes = np.load(mp4.with_suffix(".visemes.npy"))
    frames, _ = read_frames(mp4)
    mouth = frames[:, 40:56, 20:44].astype(np.float32)  # lower-centre region of a 64 px face
    motion = np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2, 3))
    speaking = visemes[1:] != SILENCE
    assert motion[speaking].mean() > 2 * motion[~speaking].mean()


def test_same_seed_identical_files(tmp_path):
    cfg = dict(identities=1, utterances=2, image_size=32, seed=3, workers=2)
    a = synth.synthesize_corpus(synth.SynthConfig(out=str(tmp_path / "a"), **cfg))
    # one worker speaks both utterances in one process, two workers may not: the files must not care
    b = synth.synthesize_corpus(synth.SynthConfig(out=str(tmp_path / "b"), **{**cfg, "workers": 1}))
    assert a["settings"] == b["settings"]

    def digest(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != synth.META_NAME
        }

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    c = synth.synthesize_corpus(synth.SynthConfig(out=str(tmp_path / "c"), **{**cfg, "seed": 4}))
    assert c["utterances"] == 2 and digest(tmp_path / "c") != digest(tmp_path / "a")


def test_deterministic_video_has_the_same_bytes_call_after_call(tmp_path):
    """x264's mbtree gave other bytes (and frames) for the same input from call to call in one process; the
    synthetic corpus and the retake baseline encode with ``deterministic=True``."""
    from temposyncdiff.data.audio import resample
    from temposyncdiff.data.video import write_video

    rng = np.random.default_rng(0)
    t, (yy, xx) = np.arange(96)[:, None, None], np.mgrid[:64, :64]
    base = 128 + 60 * np.sin((xx[None] + 2 * t) / 7) + 40 * np.cos((yy[None] - t) / 5)
    frames = np.stack([base, np.roll(base, 3, axis=2), base[:, ::-1]], -1) + rng.normal(0, 6, (96, 64, 64, 3))
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    digests = set()
    for k in range(8):  # other work between the calls (it changed the bytes before)
        resample(rng.random(20000 + k).astype(np.float32), 22050, 16000)
        digests.add(
            hashlib.sha256(write_video(tmp_path / "v.mp4", iter(frames), deterministic=True).read_bytes()).hexdigest()
        )
    assert len(digests) == 1


def test_rerun_resumes_and_settings_guard(tmp_path):
    cfg = synth.SynthConfig(out=str(tmp_path / "s"), identities=1, utterances=2, image_size=32, workers=1)
    synth.synthesize_corpus(cfg)
    (tmp_path / "s" / "spk000" / "00002.mouth.npy").unlink()  # as if interrupted before it finished
    again = synth.synthesize_corpus(cfg)
    assert again["made_now"] == 1
    with pytest.raises(FileExistsError, match="other settings"):
        synth.synthesize_corpus(synth.SynthConfig(out=cfg.out, identities=1, utterances=2, image_size=48, workers=1))


def test_missing_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tts.Espeak, "_lib", None)
    with pytest.raises(tts.EspeakUnavailableError, match="apt-get install espeak-ng"):
        tts.Espeak(library="libespeak-ng-does-not-exist.so")


def test_speech_does_not_depend_on_what_was_spoken_before():
    engine = tts.Espeak()
    first = engine.synthesize("My friend watched the violin.", voice="en-us+m3", rate=180)
    engine.synthesize("The doctor found a blue boat yesterday.", voice="en-gb-scotland+f2", pitch=30)
    again = engine.synthesize("My friend watched the violin.", voice="en-us+m3", rate=180)
    assert np.array_equal(first.samples, again.samples) and first.phonemes == again.phonemes
    with pytest.raises(ValueError, match="no voice 'xx-nope'"):  # raised in the child, re-raised here
        engine.synthesize("hello", voice="xx-nope")


def test_retake_changes_only_head_motion_and_blinks(synth_corpus, tmp_path):
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[1]
    truth, _ = read_frames(mp4)
    takes = [synth.retake(mp4, draw) for draw in (1, 2)]

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))

    for take in takes:
        assert take.shape == truth.shape and take.dtype == np.uint8
        assert psnr(take, truth) < 29  # the head moves and blinks otherwise (21-26 dB on the fixture corpus)
        assert psnr(take.mean(0), truth.mean(0)) > 27  # the same person in the same place on average (29-34 dB)
    assert psnr(*takes) < 29  # each draw its own motion
    # the take's own generator in place of the new draw's gives the original frames (33 dB: H.264 at 64 px)
    cfg = synth.SynthConfig(out=str(synth_corpus), identities=3, utterances=3, image_size=64, seed=7)
    identity, rng, audio, segments, _ = synth._speech(cfg, int(mp4.parent.name[3:]), int(mp4.stem) - 1)
    same = np.stack(list(synth._render(cfg, identity, np.load(mp4.with_suffix(".mouth.npy")), audio, rng)))
    assert psnr(same, truth) > 31
    (tmp_path / "spk000").mkdir()
    with pytest.raises(ValueError, match="not an utterance of a synthetic corpus"):
        synth.retake(tmp_path / "spk000" / "00001.mp4")
