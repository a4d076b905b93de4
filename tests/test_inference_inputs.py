"""Inference inputs: image modes, face framing, paste-back, speech files, viseme sources, bad input."""

from __future__ import annotations

import logging
import sys
import wave
from pathlib import Path

import av
import matplotlib
import numpy as np
import pytest
from PIL import Image

from temposyncdiff.data.faces import crop_resize
from temposyncdiff.data.transcript import Transcript, write_transcript
from temposyncdiff.data.video import write_video
from temposyncdiff.errors import UserError
from temposyncdiff.inference.inputs import (
    InputError,
    center_box,
    check_reference_file,
    even_size,
    load_image,
    load_speech,
    load_visemes_for,
    paste_back,
    prepare_reference,
)
from tests.helpers.run_if import RunIf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets on shared CPUs
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _save(tmp_path: Path, img: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


# --- images -----------------------------------------------------------------------------------------------


def test_rgb_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out = load_image(_save(tmp_path, Image.fromarray(arr), "a.png"))
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


@pytest.mark.parametrize(
    ("mode", "transparent", "opaque", "expected"),
    [("RGBA", (9, 9, 9, 0), (*RED, 255), RED), ("LA", (9, 0), (100, 255), (100, 100, 100))],
)
def test_alpha_composited_on_white(tmp_path, mode, transparent, opaque, expected):
    img = Image.new(mode, (4, 2), transparent)
    img.paste(Image.new(mode, (2, 2), opaque), (2, 0))
    out = load_image(_save(tmp_path, img, "a.png"))
    assert out.shape == (2, 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 3]) == expected


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.paste(1, (2, 0, 4, 2))
    out = load_image(_save(tmp_path, img, "p.png", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 3]) == BLUE


def test_grayscale(tmp_path):
    out = load_image(_save(tmp_path, Image.new("L", (3, 2), 77), "l.png"))
    assert out.shape == (2, 3, 3) and (out == 77).all()


def test_16bit_gradient_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, axis=0)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    out = load_image(_save(tmp_path, img, "g16.png"))
    assert np.abs(out[0, :, 0].astype(int) - np.arange(256)).max() <= 1
    assert (out[..., 0] == out[..., 2]).all()


def test_float_grayscale(tmp_path):
    img = Image.fromarray(np.linspace(0, 1, 11, dtype=np.float32)[None])
    assert img.mode == "F"
    out = load_image(_save(tmp_path, img, "f.tiff"))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and abs(int(out[0, 5, 0]) - 128) <= 1


def test_cmyk_jpeg(tmp_path):
    out = load_image(_save(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "c.jpg", quality=95))
    assert np.abs(out[8, 8].astype(int) - RED).max() < 10


def test_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste(Image.new("RGB", (20, 20), BLUE), (20, 0))  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    out = load_image(_save(tmp_path, img, "r.jpg", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)
    assert np.abs(out[5, 10].astype(int) - RED).max() < 20 and np.abs(out[35, 10].astype(int) - BLUE).max() < 20


def test_large_image_downscaled(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (400, 200), RED), "big.jpg")
    out = load_image(path, max_pixels=20_000)
    assert out.shape[0] * out.shape[1] <= 20_000 and abs(out.shape[1] / out.shape[0] - 2) < 0.05


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (100, 100)), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="too large"):
        load_image(path)


def test_bad_image_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(InputError, match="not an image") as err:
        load_image(text)
    assert str(text) in str(err.value) and "\n" not in str(err.value)
    whole = _save(tmp_path, Image.open(PHOTO), "whole.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match="unreadable image"):
        load_image(cut)
    with pytest.raises(FileNotFoundError, match="missing.png: file not found") as err:
        load_image(tmp_path / "missing.png")
    assert isinstance(err.value, UserError)


# --- faces ------------------------------------------------------------------------------------------------


@RunIf(modules=("dlib",))
def test_dlib_framing_of_a_real_face():
    from temposyncdiff.data.faces import FaceDetector

    ref = prepare_reference(PHOTO, 160, detector="dlib")
    assert (
        ref.method == "dlib" and ref.faces == 1 and ref.crop.shape == (160, 160, 3) and ref.image.shape == (600, 512, 3)
    )
    x0, y0, x1, y1 = FaceDetector().detect(ref.crop)
    assert 0.35 < (x1 - x0) / 160 < 0.7  # the face fills about half the crop (margin 0.5)
    assert abs((x0 + x1) / 2 - 80) < 16 and abs((y0 + y1) / 2 - 80) < 32


@RunIf(modules=("dlib",))
def test_a_stills_face_box_is_the_median_over_scales(monkeypatch):
    """detect_still: the box is the median of dlib's boxes on the image at each scale (in the image's pixels), so a
    still's crop does not hang on one detection; faces_found is the full-size count; photos are cropped with it."""
    from temposyncdiff.data.faces import FaceDetector

    det = FaceDetector()
    per_width = {400: (100, 100, 200, 200), 300: (60, 90, 165, 165), 200: (56, 52, 104, 100)}

    def detect(image):
        det.faces_found = {400: 2, 300: 1, 200: 1}[image.shape[1]]
        return per_width[image.shape[1]]

    monkeypatch.setattr(det, "detect", detect)
    box = det.detect_still(np.zeros((400, 400, 3), np.uint8))
    assert box == (100, 104, 208, 200) and det.faces_found == 2  # medians of (100, 80, 112), (100, 120, 104), ...
    asked = []
    monkeypatch.setattr(FaceDetector, "detect_still", lambda self, image: asked.append(image.shape) or (8, 8, 56, 56))
    prepare_reference(np.zeros((64, 64, 3), np.uint8), 32, detector="dlib")
    assert asked == [(64, 64, 3)]


def _no_face(tmp_path: Path) -> Path:
    ramp = np.linspace(0, 255, 120, dtype=np.float32)
    return _save(tmp_path, Image.fromarray(np.add.outer(ramp[:80] / 2, ramp / 2).astype(np.uint8)), "wall.png")


@RunIf(modules=("dlib",))
def test_no_face_with_dlib_is_a_clear_error(tmp_path):
    path = _no_face(tmp_path)
    with pytest.raises(InputError, match="no face found in .*wall.png; pass detector=center"):
        prepare_reference(path, 64, detector="dlib")


@RunIf(modules=("dlib",))
def test_no_face_auto_falls_back_to_centre_crop(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ref = prepare_reference(_no_face(tmp_path), 64)
    assert ref.method == "center" and "no face found" in caplog.text


@pytest.mark.parametrize("without_dlib", [False, True])
def test_centre_crop(tmp_path, monkeypatch, without_dlib):
    if without_dlib:
        monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
        with pytest.raises(InputError, match="needs dlib"):
            prepare_reference(_no_face(tmp_path), 64, detector="dlib")
    ref = prepare_reference(_no_face(tmp_path), 64, detector="auto" if without_dlib else "center")
    assert ref.method == "center" and ref.crop.shape == (64, 64, 3)
    assert ref.box == center_box(120, 80) == (20, 0, 100, 80)
    assert center_box(60, 100) == (0, 13, 60, 73)  # portrait: a third of the spare height from the top


@pytest.mark.parametrize("size", [(1, 1), (40, 20), (31, 500)])
def test_tiny_reference_is_refused(tmp_path, size):
    path = _save(tmp_path, Image.new("RGB", size, RED), "tiny.png")
    for check in (lambda: check_reference_file(path), lambda: prepare_reference(path, 64, detector="center")):
        with pytest.raises(InputError, match=rf"tiny.png: the face would be {min(size)} px .*min_face_px=32") as err:
            check()
        assert "\n" not in str(err.value)
    check_reference_file(path, min_face_px=min(size))
    assert prepare_reference(path, 64, detector="center", min_face_px=min(size)).crop.shape == (64, 64, 3)


@RunIf(modules=("dlib",))
def test_two_faces_the_largest_is_used_and_reported(tmp_path, caplog):
    photo = Image.open(PHOTO)  # 512 x 600
    group = Image.new("RGB", (410, 300), (128, 128, 128))
    group.paste(photo.resize((154, 180)), (0, 60))
    group.paste(photo.resize((256, 300)), (154, 0))
    with caplog.at_level(logging.WARNING):
        ref = prepare_reference(_save(tmp_path, group, "group.png"), 64, detector="dlib")
    x0, _, x1, _ = ref.box
    assert ref.faces == 2 and 154 < (x0 + x1) / 2 < 410  # centred on the larger face
    assert "2 faces found in" in caplog.text and "using the largest" in caplog.text


def test_even_size():
    image = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    padded = even_size(image)
    assert padded.shape == (6, 4, 3) and np.array_equal(padded[:5, :3], image)
    assert np.array_equal(padded[5, :3], image[4]) and np.array_equal(padded[:5, 3], image[:, 2])
    assert even_size(padded) is padded


@pytest.mark.parametrize("box", [(150, 120, 420, 390), (-40, -30, 200, 210)])
def test_paste_back_round_trip(box):
    image = load_image(PHOTO)
    out = paste_back(image, box, crop_resize(image, box, 256))
    x0, y0, x1, y1 = box
    outside = np.ones(image.shape[:2], bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    assert np.array_equal(out[outside], image[outside])
    inner = np.s_[max(y0, 0) : y1, max(x0, 0) : x1]
    mse = np.mean((out[inner].astype(float) - image[inner]) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30


def test_paste_back_feathers_the_edge():
    image = np.zeros((100, 100, 3), np.uint8)
    out = paste_back(image, (20, 20, 80, 80), np.full((32, 32, 3), 200, np.uint8), feather=0.2)
    row = out[50, 20:80, 0].astype(int)
    assert row[0] < 20 and row[30] == 200 and (np.diff(row[:30]) >= 0).all()
    assert (
        paste_back(image, (20, 20, 80, 80), np.full((8, 8, 3), 200, np.uint8), feather=0)[20:80, 20:80] == 200
    ).all()


# --- audio ------------------------------------------------------------------------------------------------


def _write_audio(path: Path, codec: str, rate: int, channels: int, seconds: float = 0.5, amp: float = 0.5) -> Path:
    """A 440 Hz tone encoded with PyAV."""
    try:
        av.codec.Codec(codec, "w")
    except ValueError:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    layout = "mono" if channels == 1 else "stereo"
    tone = amp * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate, dtype=np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone[None], channels, axis=0), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.mark.parametrize(
    ("name", "codec", "rate", "channels"),
    [
        ("a.wav", "pcm_s16le", 8000, 2),
        ("a.wav", "pcm_s16le", 48000, 1),
        ("a.wav", "pcm_s16le", 48000, 2),
        ("a.flac", "flac", 22050, 2),
        ("a.mp3", "libmp3lame", 22050, 2),
        ("a.m4a", "aac", 44100, 1),
    ],
)
def test_speech_formats(tmp_path, name, codec, rate, channels):
    speech = load_speech(_write_audio(tmp_path / name, codec, rate, channels))
    assert speech.dtype == np.float32 and speech.ndim == 1 and abs(len(speech) / 16000 - 0.5) < 0.05
    peak_hz = np.argmax(np.abs(np.fft.rfft(speech))) * 16000 / len(speech)
    assert abs(peak_hz - 440) < 5


def test_speech_from_video(tmp_path):
    path = write_video(tmp_path / "v.mp4", np.zeros((10, 16, 16, 3), np.uint8), audio=np.full(6400, 0.3, np.float32))
    assert 6400 <= len(load_speech(path)) <= 6400 + 1024  # AAC pads to whole 1024-sample frames


def test_bad_speech(tmp_path, caplog):
    with pytest.raises(InputError, match=r"0\.10 s long; at least 0\.2 s"):
        load_speech(_write_audio(tmp_path / "short.wav", "pcm_s16le", 16000, 1, seconds=0.1))
    with pytest.raises(InputError, match="limit is max_seconds=0.3"):
        load_speech(_write_audio(tmp_path / "long.wav", "pcm_s16le", 16000, 1), max_seconds=0.3)
    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:
        w.setparams((1, 2, 16000, 0, "NONE", "not compressed"))  # a header and no samples
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    silent_video = write_video(tmp_path / "mute.mp4", np.zeros((5, 16, 16, 3), np.uint8))
    for path, reason in [
        ("empty.wav", "empty|no samples"),
        (corrupt, "unreadable|corrupt"),
        (silent_video, "no audio"),
    ]:
        with pytest.raises(UserError, match=reason) as err:
            load_speech(tmp_path / path)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_speech(tmp_path / "missing.wav")
    with caplog.at_level(logging.WARNING):
        silent = load_speech(_write_audio(tmp_path / "silent.wav", "pcm_s16le", 16000, 1, amp=0.0))
    assert not silent.any() and "silent" in caplog.text


# --- visemes ----------------------------------------------------------------------------------------------


def test_viseme_file(tmp_path, caplog):
    assert load_visemes_for(10, 25.0) is None
    np.save(tmp_path / "v.npy", np.arange(1, 13, dtype=np.int64))
    assert load_visemes_for(12, 25.0, viseme_file=tmp_path / "v.npy").tolist() == list(range(1, 13))
    with caplog.at_level(logging.WARNING):
        assert load_visemes_for(5, viseme_file=tmp_path / "v.npy").tolist() == [1, 2, 3, 4, 5]
        padded = load_visemes_for(15, viseme_file=tmp_path / "v.npy")
    assert padded.dtype == np.int64 and padded[12:].tolist() == [0, 0, 0] and "trimmed or padded" in caplog.text
    for name, array, reason in [
        ("f.npy", np.zeros(12, np.float32), "1-D integer array"),
        ("m.npy", np.zeros((12, 2), np.int64), "1-D integer array"),
        ("r.npy", np.full(12, 15, np.int64), r"0\.\.14"),
    ]:
        np.save(tmp_path / name, array)
        with pytest.raises(InputError, match=reason):
            load_visemes_for(12, viseme_file=tmp_path / name)
    (tmp_path / "t.npy").write_text("0 1 2\n")
    with pytest.raises(InputError, match="not a .npy array"):
        load_visemes_for(12, viseme_file=tmp_path / "t.npy")


def test_visemes_from_transcript(tmp_path):
    path = tmp_path / "utt.txt"
    write_transcript(path, Transcript("MAMA", [("MAMA", 0.2, 0.8)]))
    ids = load_visemes_for(25, 25.0, transcript=path)
    assert ids.dtype == np.int64 and ids.shape == (25,)
    assert (ids[:4] == 0).all() and (ids[21:] == 0).all() and ids[5:20].any()
    write_transcript(path, Transcript("MAMA"))
    with pytest.raises(InputError, match="no word timings"):
        load_visemes_for(25, transcript=path)
    with pytest.raises(FileNotFoundError):
        load_visemes_for(25, transcript=tmp_path / "none.txt")


@pytest.mark.parametrize(
    ("word_end", "num_frames", "warned"), [(0.9, 25, False), (2.0, 25, True), (0.5, 100, True), (3.2, 100, False)]
)
def test_transcript_of_another_length_warns(tmp_path, caplog, word_end, num_frames, warned):
    path = tmp_path / "utt.txt"
    write_transcript(path, Transcript("MAMA", [("MAMA", 0.1, word_end)]))
    with caplog.at_level(logging.WARNING):
        ids = load_visemes_for(num_frames, 25.0, transcript=path)
    assert ids.shape == (num_frames,) and ("words end at" in caplog.text) == warned


def test_video_reference_gives_first_frame(synth_corpus):
    from temposyncdiff.data.video import read_frames

    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[0]
    assert np.array_equal(load_image(mp4), read_frames(mp4)[0][0])


def test_phone_visemes_for_speech_without_a_transcript():
    """phones: the speech's own phones (pocketsphinx) give the tokens; a file or transcript still wins."""
    pytest.importorskip("pocketsphinx")
    from temposyncdiff.data.tts import Espeak

    sp = Espeak().synthesize("the quick brown fox jumps over the lazy dog")
    wave, rate = sp.samples, sp.sample_rate
    n = int(len(wave) / rate * 25)
    ids = load_visemes_for(n, 25.0, wave=wave, sample_rate=rate)
    assert ids.dtype == np.int64 and ids.shape == (n,) and (ids != 0).mean() > 0.5
    assert load_visemes_for(n, 25.0) is None
