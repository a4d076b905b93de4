"""tsd-data prepare: own videos (a real face photo panning in a canvas) -> LRS3 layout of face crops."""

from __future__ import annotations

import json
import logging
import wave
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import matplotlib
import numpy as np
import pytest
from PIL import Image

from temposyncdiff.cli.data import run
from temposyncdiff.data.faces import FaceDetector, crop_resize, square_crop_box
from temposyncdiff.data.prepare import (
    META_NAME,
    PrepareError,
    PrepareSettings,
    prepare_video,
    prepare_videos,
    split_utterances,
)
from temposyncdiff.data.video import probe, read_audio_track, read_frames
from tests.helpers.configs import compose_config

pytest.importorskip("dlib")

PHOTO = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
FPS, SR, SIZE = 25.0, 16000, 128
MAX_S, MIN_S = 2.0, 0.5
SETTINGS = PrepareSettings(image_size=SIZE, max_utterance_s=MAX_S, min_utterance_s=MIN_S)
WHOLE = replace(SETTINGS, max_utterance_s=None)  # one utterance per video


def render(t: float, size=(640, 480), x=(80, 280), y=(60, 100), scale=(0.5, 0.6)) -> np.ndarray:
    """The photo panning and zooming inside a flat canvas at progress ``t`` in [0, 1]."""

    def lerp(r: tuple[float, float]) -> float:
        return r[0] + (r[1] - r[0]) * t

    s = lerp(scale)
    photo = PHOTO.resize((round(PHOTO.width * s), round(PHOTO.height * s)), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", size, (70, 110, 150))
    canvas.paste(photo, (round(lerp(x)), round(lerp(y))))
    return np.asarray(canvas)


def make_video(
    path: Path, frames: list[np.ndarray], fps: int = 30, pts_ms=None, audio=None, rate=48000, rotation: int = 0
) -> Path:
    """Write frames (with ``pts_ms`` for variable frame rate, with a display ``rotation`` as phones record) and an
    optional float ``[C, S]`` audio track."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        vs.pix_fmt, vs.height, vs.width = "yuv420p", *frames[0].shape[:2]
        if rotation:
            vs.set_display_rotation(rotation)
        if pts_ms is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
        if audio is not None:
            aus = out.add_stream("aac", rate=rate, layout="stereo" if len(audio) == 2 else "mono")
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        if audio is not None:
            for start in range(0, audio.shape[1], 1024):
                chunk = np.ascontiguousarray(audio[:, start : start + 1024])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=aus.layout)
                frame.sample_rate, frame.pts = rate, start
                out.mux(aus.encode(frame))
            out.mux(aus.encode())
    return path


def tone(seconds: float, rate: int, channels: int, gap=None) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) / 1.5
    if gap:
        wave[(t >= gap[0]) & (t < gap[1])] = 0
    return np.stack([wave * (1 - 0.3 * c) for c in range(channels)]).astype(np.float32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Inputs (pan, VFR, no face, no audio, corrupt) prepared once; out_root lies inside the input folder."""
    src = tmp_path_factory.mktemp("videos")
    make_video(src / "pan.mp4", [render(i / 89) for i in range(90)], audio=tone(3.0, 48000, 2, gap=(1.60, 1.76)))
    pts = np.concatenate([[0], np.cumsum([50 if i % 2 == 0 else 20 for i in range(39)])]).tolist()  # 0 .. 1.38 s
    vfr = [render(i / 39, x=(200, 220), y=(80, 80), scale=(0.55, 0.55)) for i in range(40)]
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, (1, 12000)).astype(np.float32)  # 1.5 s, 8 kHz mono
    make_video(src / "sub" / "vfr clip (1).mov", vfr, pts_ms=pts, audio=noise, rate=8000)
    flat = [np.full((240, 320, 3), (30 + i, 140, 90), np.uint8) for i in range(36)]
    make_video(src / "noface.mp4", flat, audio=tone(1.2, 48000, 2))
    make_video(src / "silent.mkv", [render(0.5, size=(320, 240), x=(20, 20), y=(0, 0), scale=(0.4, 0.4))] * 36)
    (src / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    (src / "notes.txt").write_text("not a video")
    out = src / "prepared"
    logs: list[str] = []
    result = prepare_videos(src, out, SETTINGS, log=logs.append)
    return src, out, result, logs


def test_layout_and_report(prepared):
    _, out, result, logs = prepared
    files = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert files == {META_NAME, "pan", "pan/00001.mp4", "pan/00002.mp4", "vfr_clip_1", "vfr_clip_1/00001.mp4"}
    assert (result["videos"], result["utterances"], result["existing"]) == (2, 3, 0)
    reasons = {Path(s["path"]).name: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"noface.mp4", "silent.mkv", "corrupt.mp4"}
    assert "no face" in reasons["noface.mp4"] and "no audio" in reasons["silent.mkv"]
    assert "unreadable" in reasons["corrupt.mp4"] and all("\n" not in r for r in reasons.values())
    meta = json.loads((out / META_NAME).read_text())
    assert meta["skipped"] == result["skipped"] and meta["settings"]["image_size"] == SIZE
    assert meta["talks"]["vfr_clip_1"].endswith("vfr clip (1).mov") and len(logs) == 6
    assert logs[-1].startswith("skipped 3 of 5 inputs: ") and "silent.mkv: no audio track" in logs[-1]


def test_a_video_without_sound_takes_its_sidecar_audio_file(tmp_path):
    """A recording whose sound lies beside it (<stem>.wav, as from a separate recorder) is prepared with it."""
    video = make_video(tmp_path / "take.mp4", [render(i / 59) for i in range(60)])  # 2 s at 30 fps, no audio
    with wave.open(str(tmp_path / "take.wav"), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(22050)
        out.writeframes((tone(2.0, 22050, 1)[0] * 32767).astype("<i2").tobytes())
    prepare_videos([video], tmp_path / "out", WHOLE, log=lambda _: None)
    (mp4,) = (tmp_path / "out" / "take").glob("*.mp4")
    audio, rate = read_audio_track(mp4)
    assert rate == SR and abs(audio.shape[1] / SR - 2.0) <= 2 / FPS and np.abs(audio).max() > 0.1  # AAC pads
    (tmp_path / "take.wav").unlink()
    with pytest.raises(PrepareError, match=r"no audio track \(nor a sidecar audio file take\{\.wav"):
        prepare_videos([video], tmp_path / "out2", PrepareSettings(image_size=SIZE), log=lambda _: None)


def test_a_phone_video_is_turned_upright(tmp_path):
    """A portrait phone recording stores its frames sideways with a display rotation: they are read upright."""
    frames = [render(i / 29) for i in range(30)]
    sound = tone(1.0, 48000, 1)
    plain = make_video(tmp_path / "plain.mp4", frames, audio=sound)
    phone = make_video(tmp_path / "phone.mp4", [np.rot90(f).copy() for f in frames], audio=sound, rotation=-90)
    info = probe(phone)
    assert (info.width, info.height, info.rotation) == (640, 480, 270) and probe(plain).rotation == 0
    (truth, _), (read, _) = read_frames(plain), read_frames(phone)
    assert read.shape == truth.shape and np.abs(read.astype(int) - truth).mean() < 3
    prepare_videos([plain, phone], tmp_path / "out", WHOLE, log=lambda _: None)
    (a, _), (b, _) = (read_frames(next((tmp_path / "out" / name).glob("*.mp4"))) for name in ("plain", "phone"))
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 4  # the same upright face crops


def test_streams_and_durations(prepared):
    _, out, _, _ = prepared
    lengths = {}
    for mp4 in sorted(out.rglob("*.mp4")):
        info = probe(mp4)
        assert (info.fps, info.width, info.height) == (FPS, SIZE, SIZE)
        assert (info.audio_sample_rate, info.audio_channels) == (SR, 1)
        assert info.num_frames / FPS <= MAX_S + 1e-6
        audio, _ = read_audio_track(mp4)
        assert abs(audio.shape[1] / SR - info.num_frames / FPS) <= 1 / FPS, mp4
        lengths[mp4.relative_to(out).as_posix()] = info.num_frames
    assert 1.60 <= lengths["pan/00001.mp4"] / FPS <= 1.76  # cut in the silent gap
    assert lengths["pan/00001.mp4"] + lengths["pan/00002.mp4"] == 75  # 3 s at 30 fps -> 25 fps
    assert abs(lengths["vfr_clip_1/00001.mp4"] / FPS - 1.41) <= 2 / FPS  # VFR keeps its duration


def test_face_centred(prepared):
    _, out, _, _ = prepared
    detector = FaceDetector()
    for mp4 in sorted(out.rglob("*.mp4")):
        frames, _ = read_frames(mp4)
        for frame in frames[:: max(1, len(frames) // 4)]:
            x0, y0, x1, y1 = detector.detect(frame)
            assert abs((x0 + x1) / 2 - SIZE / 2) < 0.1 * SIZE and abs((y0 + y1) / 2 - SIZE / 2) < 0.12 * SIZE
            assert 0.35 * SIZE < x1 - x0 < 0.65 * SIZE  # margin 0.5: face about half the crop


def test_rerun_skips_finished_talks(prepared):
    src, out, first, _ = prepared
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    logs: list[str] = []
    again = prepare_videos(src, out, SETTINGS, log=logs.append)
    assert (again["videos"], again["utterances"], again["existing"]) == (2, 3, 2)
    assert again["skipped"] == first["skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")} == stamps
    assert sum("exists" in line for line in logs) == 2


def test_split_utterances_cuts_in_quiet_and_drops_short_tail():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.5, 0.5, 10 * SR).astype(np.float32)
    gap = noise.copy()
    gap[int(7.0 * SR) : int(7.2 * SR)] = 0
    (a, cut), (b, end) = split_utterances(gap, SR, FPS, 250, 8.0, 1.0)
    assert a == 0 and b == cut and end == 250 and 176 <= cut <= 179
    late = noise[: int(8.2 * SR)].copy()
    late[int(7.9 * SR) : int(8.0 * SR)] = 0
    assert split_utterances(late, SR, FPS, 205, 8.0, 1.0) == [(0, 199)]  # 6-frame tail dropped
    assert split_utterances(noise, SR, FPS, 250, None, 1.0) == [(0, 250)]
    assert split_utterances(noise[: SR // 2], SR, FPS, 12, 8.0, 1.0) == []


def test_face_detector_and_crop():
    detector = FaceDetector()
    photo = np.asarray(PHOTO)
    x0, y0, x1, y1 = detector.detect(photo)
    small = np.asarray(PHOTO.resize((110, 128)))  # face ~45 px: found by upsampling
    sx0, _, sx1, _ = detector.detect(small)
    assert abs((sx0 + sx1) / 2 * photo.shape[1] / 110 - (x0 + x1) / 2) < 15
    assert detector.detect(np.full((200, 200, 3), 128, np.uint8)) is None
    assert square_crop_box((10, 10, 60, 60), 100, 80, margin=0.5, lift=0.0) == (-5, -5, 75, 75)  # side capped at 80
    yy, xx = np.mgrid[:80, :100]
    frame = np.stack([xx * 2, yy * 3, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    crop = crop_resize(frame, (-5, -5, 75, 75), 40)
    assert crop.shape == (40, 40, 3) and np.abs(crop[0, 0].astype(int) - frame[0, 0]).max() <= 4  # edge padded
    assert np.abs(crop[-1, -1].astype(int) - frame[74, 74]).max() <= 6


def test_manifest_over_prepared_videos(prepared, tmp_path):
    """The seed's manifest command works on a folder prepared from real (photo-based) videos."""
    from temposyncdiff.data.manifest import build_manifest, read_manifest

    _, out, _, _ = prepared
    meta = build_manifest(
        out, tmp_path / "manifests", name="own", val_ratio=0.0, test_ratio=0.0, seed=123, log=lambda *_: None
    )
    rows = read_manifest(tmp_path / "manifests" / "own_train.jsonl")
    assert meta["counts"]["train"] == len(rows) == 3 and all(r["fps"] == 25.0 and r["width"] == 128 for r in rows)


def test_memory_does_not_hold_the_video(prepared, tmp_path):
    """Frames stream through two decoding passes: the peak is a few frames, not the 83 MB of RGB in pan.mp4."""
    import tracemalloc

    src, _, _, _ = prepared
    tracemalloc.start()
    try:
        count = prepare_video(src / "pan.mp4", tmp_path / "pan", FaceDetector(), SETTINGS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 2 and peak < 15e6, peak / 1e6  # one 640x480 RGB frame is 0.9 MB; the whole video 83 MB


def _cli_error(cfg, caplog) -> str:
    """The one line a ``tsd-data`` command logs before exiting with status 2."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2 and len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "\n" not in line
    return line


def test_cli_errors_are_one_line_and_exit_2(tmp_path, caplog):
    def prepare(*overrides: str) -> str:
        cfg = compose_config(
            "data", ["data_command=prepare", f"out={tmp_path / 'out'}", *overrides], tmp_path, tmp_path / "r"
        )
        return _cli_error(cfg, caplog)

    assert "inputs required" in prepare()
    assert "no such file or folder" in prepare(f"inputs={tmp_path / 'missing.mp4'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    assert "no video files" in prepare(f"inputs={tmp_path / 'empty'}")
    PHOTO.save(tmp_path / "photo.jpg")
    line = prepare(f"inputs={tmp_path / 'photo.jpg'}")
    assert "photo.jpg: not a video" in line and "audio" not in line
    bad = tmp_path / "bad"
    make_video(bad / "noface.mp4", [np.full((120, 160, 3), 90, np.uint8)] * 30, audio=tone(1.2, 16000, 1), rate=16000)
    make_video(bad / "silent.mp4", [render(0.5, size=(320, 240), x=(20, 20), y=(0, 0), scale=(0.4, 0.4))] * 30)
    line = prepare(f"inputs={bad}")
    assert line.startswith("error: nothing prepared: skipped 2 of 2 inputs: ")
    assert "noface.mp4: no face found" in line and "silent.mp4: no audio track" in line
    assert not (tmp_path / "out").exists()  # nothing prepared: no report, no folder


def test_cache_of_an_unknown_corpus_name_is_an_error(tmp_path, caplog):
    manifests = tmp_path / "data" / "manifests"
    manifests.mkdir(parents=True)
    (manifests / "synth_train.jsonl").write_text("")
    cfg = compose_config("data", ["data_command=cache", "data.name=synht"], tmp_path, tmp_path / "r")
    line = _cli_error(cfg, caplog)
    assert "no manifest of data.name=synht" in line and "names there: synth" in line
    assert not (tmp_path / "data" / "cache").exists()
