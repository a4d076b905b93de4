"""Video in (``tsd-infer video=``): a talking video re-voiced at its own size, 25 fps, as long as the new audio;
faceless frames and everything outside the blended region pass through bit-identical; the seam measure."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from temposyncdiff.cli.infer import infer
from temposyncdiff.data.audio import AudioFeatures, load_audio
from temposyncdiff.data.faces import crop_resize
from temposyncdiff.data.video import probe, read_frames
from temposyncdiff.inference import video_in
from temposyncdiff.inference.inputs import Blend, blend_mask, load_image, paste_back, seam_ratio
from temposyncdiff.inference.pipeline import TalkingHeadPipeline
from temposyncdiff.inference.video_in import (
    VideoRevoicer,
    VideoSource,
    changed_region,
    reference_frame,
    source_plan,
    track_video,
)
from tests.helpers.configs import compose_config
from tests.helpers.nets import save_tiny_exports

pytest.importorskip("dlib")
MOUTH = (0.28, 0.6, 0.72, 0.9)  # the own-footage nets' pose_mask
SIZE = (192, 144)  # width, height


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Tiny random exports (32 px): a re-voicing net (pose_mask) and one that draws the whole crop."""
    out = {}
    for name, mask in (("pose", MOUTH), ("whole", None)):
        out[name] = tmp_path_factory.mktemp(f"ckpt_{name}")
        save_tiny_exports(out[name], pose_mask=mask)
    return out


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    """A real face (matplotlib's sample photo of Grace Hopper), 102x120 px: dlib finds it."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((102, 120), Image.Resampling.LANCZOS))


def scene(hopper: np.ndarray, k: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Frame ``k``: a textured background with the face moving left and right; black where ``k`` is negative."""
    w, h = size
    if k < 0:
        return np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 3 % 256)], axis=-1).astype(np.uint8)
    x = (w - hopper.shape[1]) // 2 + round(30 * np.sin(k / 8))
    y = (h - hopper.shape[0]) // 2
    frame[y : y + hopper.shape[0], x : x + hopper.shape[1]] = hopper
    return frame


def write_video(path: Path, frames, times: list[float] | None = None, gop: int = 12) -> Path:
    """H.264 at 25 fps, or at the given frame ``times`` (variable rate), near-lossless."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25, options={"crf": "8", "preset": "ultrafast", "g": str(gop)})
        vs.pix_fmt = "yuv420p"
        if times is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
        for k, frame in enumerate(frames):
            if k == 0:
                vs.height, vs.width = frame.shape[:2]
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                f.pts, f.time_base = round(times[k] * 1000), Fraction(1, 1000)
            out.mux(vs.encode(f))
        out.mux(vs.encode())
    return path


def speech(path: Path, seconds: float) -> Path:
    samples = np.random.default_rng(0).normal(0, 0.1, round(seconds * 16000))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def run_infer(tmp_path: Path, exports: Path, video: Path, audio: Path, *extra: str) -> tuple[dict, Path]:
    cfg = compose_config(
        "infer",
        [
            f"video={video}",
            f"audio={audio}",
            "stage=teacher",
            f"checkpoint={exports / 'teacher_best.pt'}",
            f"vae={exports / 'vae_pretrained.pt'}",
            "save_frames=false",
            "run_name=v",
            "threads=1",
            *extra,
        ],
        tmp_path,
        tmp_path / "run",
    )
    infer(cfg)
    out = tmp_path / "outputs" / "samples" / "v"
    return json.loads((out / "summary.json").read_text()), out / "sample.mp4"


@pytest.mark.parametrize(
    ("video_s", "audio_s", "loop"), [(2.0, 1.2, "pingpong"), (1.0, 2.4, "pingpong"), (1.0, 1.6, "hold")]
)
def test_output_keeps_size_at_25_fps_and_lasts_as_long_as_the_audio(
    exports, hopper, tmp_path, one_thread, video_s, audio_s, loop
):
    video = write_video(tmp_path / "in.mp4", (scene(hopper, k) for k in range(round(video_s * 25))))
    ref = tmp_path / "still.png"
    Image.fromarray(scene(hopper, 3)).save(ref)
    extra = [f"video_loop={loop}"] + ([f"ref_image={ref}"] if loop == "hold" else [])  # identity from another image
    summary, mp4 = run_infer(tmp_path, exports["pose"], video, speech(tmp_path / "a.wav", audio_s), *extra)
    info = probe(mp4)
    assert (info.width, info.height) == SIZE and info.fps == 25.0
    assert info.num_frames == round(audio_s * 25)
    assert abs(len(load_audio(mp4)) / 16000 - audio_s) < 1 / 25
    rv = summary["revoice"]
    assert rv["length"] == ("trimmed" if video_s > audio_s else loop)
    assert rv["pasted"] == info.num_frames and rv["passed_through"] == 0 and rv["region"] == list(MOUTH)
    assert 0.5 < rv["seam_ratio"] <= rv["seam_ratio_max"] < 3
    v = summary["video"]
    assert (v["width"], v["height"], v["fps"], v["duration_s"], v["resampled"]) == (*SIZE, 25.0, video_s, False)
    assert v["face_track"]["faces_found"] == v["face_track"]["detections"] > 0
    assert summary["ref_image"] == (str(ref) if loop == "hold" else f"{video} at 0.00 s")
    assert summary["timings"]["ms_per_frame"]["paste_back"] > 0


def test_variable_frame_rate_input_is_resampled_to_25_fps(exports, hopper, tmp_path, one_thread):
    steps = np.resize([0.03, 0.05, 0.07], 32)  # 20 fps on average, no two neighbours alike
    times = np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    video = write_video(tmp_path / "vfr.mp4", (scene(hopper, k) for k in range(len(times))), times=list(times))
    summary, mp4 = run_infer(tmp_path, exports["pose"], video, speech(tmp_path / "a.wav", 2.0))
    info = probe(mp4)
    assert info.fps == 25.0 and info.num_frames == 50 and (info.width, info.height) == SIZE
    v = summary["video"]
    assert v["resampled"] and v["decoded_frames"] == 32 and v["frames_at_model_fps"] == round(times[-1] * 25) + 1
    assert summary["revoice"]["length"] == "pingpong"


@pytest.mark.parametrize("net", ["pose", "whole"])
def test_faceless_frames_and_pixels_outside_the_blend_pass_through(exports, hopper, tmp_path, one_thread, net):
    black = {*range(0, 8), *range(20, 35)}  # no face at the start and in the middle
    video = write_video(tmp_path / "in.mp4", (scene(hopper, -1 if k in black else k) for k in range(50)))
    source, _ = read_frames(video)
    track = track_video(video)
    assert track.stats["first_face_s"] == 0.4  # the detector samples every 5th frame: 0 and 5 are black
    pipe = TalkingHeadPipeline.from_checkpoints(exports[net] / "teacher_best.pt", kind="teacher")
    image, at = reference_frame(track)
    assert at == 0.4 and np.array_equal(image, source[10])
    face, ref = pipe.reference(image)
    region = MOUTH if net == "pose" else None
    revoicer = VideoRevoicer(pipe, track, face.crop, region)
    wave = np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)
    out = list(revoicer.frames(ref, wave))
    assert len(out) == 50
    for k, frame in enumerate(out):
        if k in black:
            assert np.array_equal(frame, source[k]), k
            continue
        blend = blend_mask(tuple(track.boxes[k]), frame.shape, 0.1, region)
        h, w = blend.weight.shape
        outside = np.ones(frame.shape[:2], bool)
        outside[blend.top : blend.top + h, blend.left : blend.left + w] = False
        assert np.array_equal(frame[outside], source[k][outside]) and not np.array_equal(frame, source[k]), k
    report = revoicer.report()
    assert report["passed_through"] == len(black) and report["pasted"] == 50 - len(black)
    assert report["region"] == (list(MOUTH) if region else None)


def test_revoiced_lips_are_read_beside_the_sources(tmp_path, landmarks, opener):
    """score_lips: a re-voicer that draws the source's own mouth follows it (corr ~1, amplitude ~1, same mouth in
    silence); one that draws one still mouth does not."""
    open_by, _, _ = opener
    gaps = np.round(6 + 6 * np.sin(np.arange(40) / 3)).astype(int)  # 0 .. 12 px lip gaps

    def frame(gap: int) -> np.ndarray:
        canvas = np.full((320, 352, 3), 90, np.uint8)
        canvas[32:288, 48:304] = open_by(int(gap))
        return canvas

    track = track_video(write_video(tmp_path / "talk.mp4", (frame(g) for g in gaps)))

    def drawing(still: bool) -> SimpleNamespace:
        def frames(ref_latent, wave, visemes, timings, pose):
            first = None
            for a in range(0, 40, 8):
                crops = pose(a, a + 8)
                first = crops[0] if first is None else first
                yield from ([first] * len(crops) if still else crops)

        return SimpleNamespace(image_size=128, window=8, audio=AudioFeatures(), frames=frames)

    wave = np.random.default_rng(0).normal(0, 0.1, 40 * 640).astype(np.float32)
    wave[15 * 640 : 25 * 640] = 0  # 400 ms of silence
    scores = {}
    for still in (False, True):
        revoicer = VideoRevoicer(drawing(still), track, None, MOUTH, lips=landmarks)
        assert len(list(revoicer.frames(None, wave))) == 40
        scores[still] = revoicer.report()["lips_vs_source"]
    own, frozen = scores[False], scores[True]
    assert own["num_frames"] == 40 and own["corr"] > 0.9 and 0.8 < own["amplitude"] < 1.2
    assert own["silence"]["num_frames"] == 10 and own["silence"]["ratio"] == pytest.approx(1, abs=0.15)
    assert frozen["corr"] < 0.5 and frozen["amplitude"] < 0.3
    assert "lips_vs_source" not in VideoRevoicer(drawing(False), track, None, MOUTH).report()


def test_changed_region_is_the_nets_pose_mask(exports):
    pose, whole = (
        TalkingHeadPipeline.from_checkpoints(exports[k] / "teacher_best.pt", kind="teacher") for k in exports
    )
    assert changed_region(pose) == MOUTH and changed_region(whole) is None


def test_source_plan():
    assert source_plan(4, 3).tolist() == [0, 1, 2]  # a longer video is cut
    assert source_plan(4, 11).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert source_plan(4, 6, "hold").tolist() == [0, 1, 2, 3, 3, 3]
    assert source_plan(1, 3).tolist() == [0, 0, 0]


def test_backward_legs_are_decoded_in_chunks_after_seeking(hopper, tmp_path, monkeypatch):
    video = write_video(tmp_path / "in.mp4", (scene(hopper, k) for k in range(40)), gop=7)
    frames, _ = read_frames(video)
    track = track_video(video)
    starts = []
    real = video_in.VideoFrames

    def spy(path, start=0.0):
        starts.append(start)
        return real(path, start)

    monkeypatch.setattr(video_in, "VideoFrames", spy)
    plan = source_plan(40, 130)
    got = list(VideoSource(track, buffer_bytes=6 * SIZE[0] * SIZE[1] * 3).play(plan))
    assert [j for j, _ in got] == plan.tolist()
    assert all(np.array_equal(rgb, frames[j]) for j, rgb in got)
    # legs 0..39, 38..0, 1..39, 38..27; a backward leg 6 frames at a time, each chunk sought but the one from 0
    assert sum(s > 0 for s in starts) == 6 + 1 + 2
    assert len(starts) == 9 + 2  # the first leg and the chunk from frame 0; no seek fell back to the start


def test_seam_ratio_is_one_for_a_clean_paste_and_flags_a_hard_edge():
    image = load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    box = (53, 7, 485, 439)  # the face crop of this image (dlib's box, framed as prepare frames it)

    def measure(generated, feather):
        out = paste_back(image, box, generated, feather, MOUTH)
        return seam_ratio(out, image, blend_mask(box, image.shape, feather, MOUTH))

    clean = crop_resize(image, box, 256)  # the face itself through a 256 px model crop
    assert 0.85 < measure(clean, 0.1) < 1.1
    magenta = np.full((128, 128, 3), (255, 0, 255), np.uint8)
    assert measure(magenta, 0.0) > 3  # a hard edge of the wrong colour
    brighter = np.clip(clean.astype(int) + 40, 0, 255).astype(np.uint8)
    assert measure(brighter, 0.0) > 1.5 and 0.85 < measure(brighter, 0.1) < 1.1  # the feather hides the step
    flat = np.zeros((40, 40, 3), np.uint8)
    assert seam_ratio(flat, flat, Blend(10, 10, np.ones((20, 20), np.float32))) == 1.0  # no texture: no seam


@pytest.mark.slow
def test_a_long_720p_video_streams_in_bounded_memory(exports, hopper, tmp_path):
    """10 minutes of 720p (15000 frames, 41 GB decoded) re-voiced in about the peak memory of 10 seconds."""
    face = np.asarray(Image.fromarray(hopper).resize((306, 360), Image.Resampling.LANCZOS))
    background = scene(np.zeros((0, 0, 3), np.uint8), 0, (1280, 720))

    def frames(seconds: int):
        for k in range(seconds * 25):
            frame = background.copy()
            x = 480 + round(200 * np.sin(k / 40))
            frame[180:540, x : x + 306] = face
            yield frame

    wrap = (
        "import resource, sys\n"
        "from temposyncdiff.cli.infer import main\n"
        "sys.argv = ['tsd-infer', *sys.argv[1:]]\n"
        "try:\n    main()\n"
        "finally:\n    print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    peak_mb, summary = {}, {}
    for seconds in (10, 600):
        video = write_video(tmp_path / f"{seconds}.mp4", frames(seconds), gop=250)
        out = tmp_path / f"out{seconds}"
        settings = {
            "video": video,
            "audio": speech(tmp_path / f"{seconds}.wav", seconds),
            "stage": "teacher",
            "checkpoint": exports["pose"] / "teacher_best.pt",
            "vae": exports["pose"] / "vae_pretrained.pt",
            "save_frames": "false",
            "out_dir": out,
            "extras.print_config": "false",
        }
        args = [f"{k}={v}" for k, v in settings.items()]
        done = subprocess.run([sys.executable, "-c", wrap, *args], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        peak_mb[seconds] = int(done.stderr.rsplit("peak_rss_kb", 1)[1].split()[0]) / 1024
        summary[seconds] = json.loads((out / "summary.json").read_text())
        assert summary[seconds]["timings"]["frames"] == seconds * 25 and probe(out / "sample.mp4").width == 1280
    print(f"peak RSS: 10 s {peak_mb[10]:.0f} MB, 10 min {peak_mb[600]:.0f} MB; {summary[600]['timings']}")
    assert peak_mb[600] - peak_mb[10] < 200
