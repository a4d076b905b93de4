"""Landmark mouth opening: known lip gaps cut into a real photo, the audio-swap control, silences, unavailability."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from temposyncdiff.evaluation.generation import GenerationScorer
from temposyncdiff.evaluation.report import GEN_COLUMNS, gen_row
from temposyncdiff.metrics.mouth import MouthOpening, lip_opening, silent_frames
from tests.helpers.configs import face_regions


def shrink(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.LANCZOS)) for f in frames])


def test_lip_opening_is_a_gap_over_the_eye_distance_in_any_pose():
    pts = np.zeros((68, 2))
    pts[36:42], pts[42:48] = (0.0, 0.0), (10.0, 0.0)  # eye centres 10 apart
    pts[[61, 62, 63]], pts[[67, 66, 65]] = (5.0, 8.0), (5.0, 10.0)  # inner lips 2 apart
    assert lip_opening(pts) == pytest.approx(0.2)
    a = np.deg2rad(25)
    turned = 3 * pts @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) + (40, 7)  # rolled, scaled, moved
    assert lip_opening(turned) == pytest.approx(0.2)
    pts[[67, 66, 65]] = (5.0, 7.0)  # lower inner lip above the upper: overlap reads negative
    assert lip_opening(pts) == pytest.approx(-0.1)


@pytest.mark.parametrize("size", [256, 64])
def test_opening_grows_with_a_known_lip_gap(landmarks, opener, size):
    open_by, iod, closed = opener
    gaps = [0, 4, 8, 12, 16]  # px at 256
    frames = shrink(np.stack([open_by(h) for h in gaps]), size)
    track = landmarks.track(frames)
    measured = landmarks.openings(frames, track.boxes)
    assert track.found == track.checked == 2  # frames 0 and 4 (detect_every=5)
    assert np.all(np.diff(measured) > 0.02)
    expected = closed + np.array(gaps) / iod
    assert np.abs(measured - expected).max() < 0.03 + 0.1 * expected.max()


def test_correlation_amplitude_and_the_audio_swap_control(landmarks, opener):
    open_by, *_ = opener
    gaps = np.round(8 + 8 * np.sin(2 * np.pi * np.arange(20) / 8)).astype(int)  # syllables every 8 frames
    truth = shrink(np.stack([open_by(h) for h in gaps]), 96)
    shuffled = truth[np.random.default_rng(0).permutation(len(truth))]
    m = MouthOpening(landmarks)
    m.update(truth, truth, swapped=shuffled, clip_id="a")
    out = m.compute()
    assert out["status"] == "ok" and out["num_frames"] == 20 and out["frames_without_landmarks"] == 0
    assert out["own"] == {"corr": pytest.approx(1.0), "amplitude": pytest.approx(1.0), "num_clips": 1}
    assert out["swapped"]["corr"] < 0.5 and out["swapped"]["num_clips"] == 1
    assert out["silence"]["status"] == "unavailable"  # no audio given
    still = MouthOpening(landmarks)
    still.update(np.repeat(truth[:1], 20, axis=0), truth)
    assert still.compute()["own"] == {"corr": 0.0, "amplitude": 0.0, "num_clips": 1}
    assert still.compute()["swapped"]["status"] == "unavailable"


def test_silent_frames_on_audio_with_known_pauses():
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000  # 2 s = 50 frames of 640 samples
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 1e-3 * rng.standard_normal(len(t))  # speech-level tone, -50 dB floor
    wave[10 * 640 : 20 * 640] = 1e-3 * rng.standard_normal(6400)  # 400 ms pause
    wave[30 * 640 : 34 * 640] = 1e-3 * rng.standard_normal(2560)  # 160 ms: too short
    silent = silent_frames(wave, 50)
    assert np.flatnonzero(silent).tolist() == list(range(10, 20))
    assert np.flatnonzero(silent_frames(wave, 50, min_ms=150)).tolist() == [*range(10, 20), *range(30, 34)]
    assert not silent_frames(wave, 50, threshold_db=-60).any()  # the pauses are only ~46 dB down
    assert np.flatnonzero(silent_frames(wave[: 40 * 640], 50)).tolist() == [*range(10, 20), *range(40, 50)]  # no audio


def test_mouth_left_open_in_silence(landmarks, opener):
    open_by, *_ = opener
    gaps = np.array([4] * 10 + [12, 16, 8, 16, 12, 16, 8, 12, 16, 12])  # a pause, then speech
    truth = shrink(np.stack([open_by(h) for h in gaps]), 96)
    gaping = truth.copy()
    gaping[:10] = truth[11]  # the generated mouth stays open (16 px) in the pause
    wave = np.concatenate([np.zeros(10 * 640), 0.3 * np.sin(np.arange(10 * 640) / 3)])
    m = MouthOpening(landmarks)
    m.update(gaping, truth, wave)
    silence = m.compute()["silence"]
    assert silence["num_frames"] == 10 and silence["num_clips"] == 1
    assert 0.05 < silence["truth"] < 0.15 and silence["pred"] > 0.25  # 4 px vs 16 px at an eye distance of ~51 px
    assert silence["ratio"] == pytest.approx(silence["pred"] / silence["truth"])
    assert silence["gap"] == pytest.approx(silence["pred"] - silence["truth"])
    same = MouthOpening(landmarks)
    same.update(truth, truth, wave)
    assert same.compute()["silence"]["ratio"] == pytest.approx(1.0)


def test_unavailable_without_weights_or_faces(landmarks, tmp_path):
    m = MouthOpening(weights_dir=tmp_path)
    m.update(np.zeros((4, 32, 32, 3), np.uint8), np.zeros((4, 32, 32, 3), np.uint8))
    out = m.compute()
    assert out["status"] == "unavailable" and "shape_predictor_68_face_landmarks.dat" in out["reason"]
    blank = MouthOpening(landmarks)
    grey = np.full((12, 64, 64, 3), 128, np.uint8)
    blank.update(grey, grey, clip_id="talk/00001")
    out = blank.compute()
    assert out == {
        "status": "unavailable",
        "reason": "no clip scored (talk/00001: dlib finds a face in 0 of 4 checked frames of the truth)",
    }


def test_generation_scorer_reports_lip_landmarks(landmarks, opener):
    open_by, *_ = opener
    truth = shrink(np.stack([open_by(h) for h in (0, 8, 16, 8, 0, 8, 16, 8)]), 64)
    still = np.repeat(truth[:1], len(truth), axis=0)
    scorer = GenerationScorer(
        face_regions(), lse_reason="no expert", identity_reason="no dlib", lips=MouthOpening(landmarks)
    )
    scorer.update(truth, truth, truth[0], borders=[], swapped=still, wave=np.zeros(8 * 640), clip_id="a")
    report = scorer.compute()
    json.dumps(report, allow_nan=False)
    row = gen_row("oracle@1", {"status": "ok", **report})
    assert row["lip_corr"] == pytest.approx(1.0) and row["lip_corr_swapped"] == 0.0
    assert row["lip_amplitude"] == pytest.approx(1.0) and row["lip_silence"] is None  # all silent: no loud level
    assert {"lip_corr", "lip_corr_swapped", "lip_amplitude", "lip_silence", "lip_silence_gap"} <= set(GEN_COLUMNS)
    absent = GenerationScorer(face_regions(), lse_reason="no expert", identity_reason="no dlib")
    absent.update(truth, truth, truth[0], borders=[])
    assert absent.compute()["lip_landmarks"]["status"] == "unavailable"
