"""Transcript -> per-frame visemes: CMUdict lookups, fallbacks, framing, file writing, synthetic ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from temposyncdiff.data.transcript import Transcript, read_transcript
from temposyncdiff.data.transcript_visemes import (
    Pronouncer,
    guess_phones,
    transcript_to_frames,
    word_visemes,
    write_viseme_files,
)
from temposyncdiff.data.visemes import SILENCE, VISEME_ID


def names(word: str) -> list[str]:
    return [v for v, _, _ in word_visemes(word, 0.0, 1.0)]


def test_known_words():
    assert names("BOB")[0] == names("BOB")[-1] == "MBP"
    assert names("FIVE")[0] == "FV"
    assert names("SHOE") == ["CH", "OO"]
    segs = word_visemes("BOB", 1.0, 1.5)
    assert segs[0][1] == 1.0 and segs[-1][2] == pytest.approx(1.5)
    assert all(a[2] == pytest.approx(b[1]) for a, b in zip(segs, segs[1:]))
    assert segs[1][2] - segs[1][1] > segs[0][2] - segs[0][1]  # the stressed vowel outlasts a consonant


def test_apostrophes_hyphens_digits():
    p = Pronouncer()
    assert p.phones("DON'T") == ["D", "OW1", "N", "T"]
    assert p.phones("WORLD'S")[-1] == "Z"
    assert p.phones("O'BRIEN") == p.phones("o\u2019brien")  # typographic apostrophe
    assert p.phones("'HELLO'") == p.phones("hello")
    assert p.phones("BLUE-GREEN") == p.phones("BLUE") + p.phones("GREEN")  # not in CMUdict: split
    assert p.phones("42") == p.phones("FORTY") + p.phones("TWO")
    assert p.phones("CAFÉ") == p.phones("CAFE")
    assert p.phones("BUS'S") == p.phones("BUS") + ["IH", "Z"]  # possessive not in CMUdict
    assert p.unknown == set()


def test_unknown_words_use_fallback():
    p = Pronouncer()
    assert p.phones("BLORPTHISH") == ["B", "L", "AO", "R", "P", "TH", "IH", "SH"]
    assert p.phones("ZORBLAX'S")[-2:] == ["IH", "Z"]
    assert p.unknown == {"BLORPTHISH", "ZORBLAX"}
    assert guess_phones("cake") == ["K", "EY", "K"] and guess_phones("knight") == ["N", "AY", "T"]
    ids = transcript_to_frames(Transcript("GLIMPTASTIC", [("GLIMPTASTIC", 0.0, 0.8)]), 20)
    assert (ids != SILENCE).all()


def test_frames_silence_clipping_empty():
    t = Transcript("BOB BOB", [("BOB", 0.2, 0.6), ("BOB", 1.0, 1.4), ("BOB", 1.8, 3.0)])
    ids = transcript_to_frames(t, 50, fps=25.0)
    assert ids.dtype == np.int64 and ids.shape == (50,)
    assert (ids[:5] == SILENCE).all() and (ids[15:25] == SILENCE).all()  # before the first word, between words
    assert ids[5] == ids[14] == VISEME_ID["MBP"]
    assert (ids[45:] != SILENCE).all()  # the last word runs past the video: clipped
    assert (transcript_to_frames(Transcript(""), 30) == SILENCE).all()


def test_write_viseme_files(synth_corpus, tmp_path):
    out = tmp_path / "vis"
    logs: list[str] = []
    res = write_viseme_files(synth_corpus, out, log=logs.append)
    assert res["written"] == 9 and not res["skipped"] and logs
    for f in sorted(synth_corpus.glob("*/*.visemes.npy")):
        got = np.load(out / f.parent.name / f.name.replace(".visemes", ""))
        assert got.dtype == np.int64 and got.shape == np.load(f).shape
    assert write_viseme_files(synth_corpus, out, log=logs.append)["existing"] == 9

    (tmp_path / "latin1.txt").write_bytes(
        "Text:  CAF\xc9\n\nWORD START END ASDSCORE\nCAF\xc9 0.1 0.5 7\n".encode("latin-1")
    )
    (tmp_path / "bad.txt").write_text("no header here\n")
    (tmp_path / "late.txt").write_text("Text:  BOB\n\nWORD START END ASDSCORE\nBOB 9.0 9.5 7\n")
    (tmp_path / "long.txt").write_text("Text:  BOB\n\nWORD START END ASDSCORE\nBOB 0.5 9.5 7\n")
    rows = [
        {"id": f"t/{n}", "talk_id": "t", "transcript": str(tmp_path / f"{n}.txt"), "num_frames": 50, "fps": 25.0}
        for n in ("latin1", "bad", "late", "long", "missing")
    ] + [{"id": "t/none", "talk_id": "t", "transcript": None, "num_frames": 50, "fps": 25.0}]
    res = write_viseme_files(rows, out, log=logs.append)
    assert res["written"] == 2 and res["clipped"] == 1
    assert sorted(s["id"] for s in res["skipped"]) == ["t/bad", "t/late", "t/missing"]
    assert np.load(out / "t" / "latin1.npy")[3] == VISEME_ID["EH"]  # K of CAFE (0.10-0.18 s)
    assert (np.load(out / "t" / "long.npy")[-1]) != SILENCE


def test_agreement_with_synthetic_ground_truth(synth_corpus):
    pred, gt = [], []
    for f in sorted(synth_corpus.glob("*/*.visemes.npy")):
        truth = np.load(f)
        pred.append(
            transcript_to_frames(read_transcript(f.with_name(f.name.replace(".visemes.npy", ".txt"))), len(truth))
        )
        gt.append(truth)
    pred, gt = np.concatenate(pred), np.concatenate(gt)
    acc = float((pred == gt).mean())
    speech = float(((pred == SILENCE) == (gt == SILENCE)).mean())
    majority = np.bincount(gt).max() / len(gt)
    print(f"viseme frame accuracy {acc:.3f} (majority class {majority:.3f}), speech/silence agreement {speech:.3f}")
    assert acc >= 0.35 and acc > 2 * majority
    assert speech >= 0.85
