"""Phone decoding with pocketsphinx -> per-frame visemes: espeak-ng speech, silence, framing, chunks, the CLI."""

from __future__ import annotations

import functools
import logging
import shutil
import sys

import numpy as np
import pytest

from temposyncdiff.cli.data import run
from temposyncdiff.data import phones
from temposyncdiff.data.audio import resample
from temposyncdiff.data.transcript_visemes import Pronouncer
from temposyncdiff.data.tts import Espeak
from temposyncdiff.data.visemes import SILENCE, VISEME_ID, espeak_visemes, expand_segments, frame_visemes
from temposyncdiff.errors import UserError
from tests.helpers.configs import compose_config
from tests.helpers.run_if import RunIf

needs_pocketsphinx = RunIf(modules=("pocketsphinx",))

SENTENCE = "Please bring me my blue boat from the market before it rains."
PAD_S = 0.6  # silence around the speech


@pytest.fixture(scope="module")
def speech():
    """espeak-ng speech at 16 kHz with PAD_S of digital silence each side, and its own viseme ground truth."""
    sp = Espeak().synthesize(SENTENCE)
    pad = np.zeros(int(PAD_S * 16000), np.float32)
    wave = np.concatenate([pad, resample(sp.samples, sp.sample_rate, 16000), pad])
    segments = expand_segments([(espeak_visemes(p), a + PAD_S, b + PAD_S) for p, a, b in sp.phonemes])
    num_frames = round(len(wave) / 16000 * 25)
    return wave, frame_visemes(segments, num_frames, 25.0), sp


def test_visemes_from_phones_frame_arithmetic():
    segs = [("SIL", 0.0, 0.1), ("M", 0.1, 0.2), ("AY", 0.2, 0.4), ("+NSN+", 0.4, 0.5), ("AH0", 0.5, 0.6)]
    ids = phones.visemes_from_phones(segs, 18, fps=25.0)  # frame k at k / 25 s
    assert ids.dtype == np.int64 and ids.shape == (18,)
    names = ["sil"] * 3 + ["MBP"] * 2 + ["AA"] * 3 + ["IH"] * 2 + ["sil"] * 3 + ["EH"] * 2 + ["sil"] * 3
    assert ids.tolist() == [VISEME_ID[n] for n in names]  # AY split in halves; the filler and past the end: sil
    assert phones.visemes_from_phones(segs, 3, fps=10.0).tolist() == [SILENCE, VISEME_ID["MBP"], VISEME_ID["AA"]]
    assert (phones.visemes_from_phones([], 5, 25.0) == SILENCE).all()


@needs_pocketsphinx
def test_espeak_sentence_gives_plausible_phones(speech):
    wave, truth, sp = speech
    segs = phones.phone_segments(wave, 16000)
    starts = [a for _, a, _ in segs]
    assert starts == sorted(starts) and segs[-1][2] <= len(wave) / 16000 + 0.02
    spoken = [p for p, _, _ in segs if not phones.is_silence(p)]
    assert 15 <= len(spoken) <= 60  # the sentence has 41 CMUdict phones
    ids = phones.visemes_from_phones(segs, len(truth), 25.0)
    t = np.arange(len(truth)) / 25.0
    lead, speaking = t < PAD_S - 0.1, (t > sp.words[0][1] + PAD_S) & (t < sp.words[-1][2] + PAD_S)
    assert (ids[lead] == SILENCE).all() and (ids[t > len(wave) / 16000 - PAD_S + 0.1] == SILENCE).all()
    assert (ids[speaking] != SILENCE).mean() > 0.8
    assert VISEME_ID["MBP"] in ids  # the sentence has seven bilabials
    acc = (ids == truth).mean()
    print(f"pocketsphinx viseme frame accuracy vs espeak's own phonemes: {acc:.2f}")
    assert acc > 2 * (truth == SILENCE).mean() and acc >= 0.4


@needs_pocketsphinx
def test_same_speech_as_int16_at_another_rate(speech):
    wave, truth, _ = speech
    ref = phones.visemes_for_audio(wave, 16000, len(truth), 25.0)
    again = phones.visemes_for_audio(wave, 16000, len(truth), 25.0)
    assert (ref == again).all()  # deterministic (the dither has a fixed seed)
    pcm = np.round(resample(wave, 16000, 22050) * 32767).astype(np.int16)
    other = phones.visemes_for_audio(pcm, 22050, len(truth), 25.0)
    assert ((other == SILENCE) == (ref == SILENCE)).mean() > 0.9


@needs_pocketsphinx
def test_silence_and_short_audio():
    for wave in (np.zeros(3 * 16000, np.float32), np.zeros(16000, np.int16), np.full(8000, 1e-4, np.float32)):
        assert all(phones.is_silence(p) for p, _, _ in phones.phone_segments(wave, 16000))
    assert phones.phone_segments(np.zeros(100, np.float32), 16000) == []  # shorter than one 25.6 ms frame
    assert (phones.visemes_for_audio(np.zeros(0, np.float32), 16000, 4, 25.0) == SILENCE).all()
    with pytest.raises(ValueError, match="mono"):
        phones.phone_segments(np.zeros((2, 1600), np.float32), 16000)


@needs_pocketsphinx
def test_chunks_cut_in_pauses(speech, monkeypatch):
    wave, truth, _ = speech
    rng = np.random.default_rng(0)
    loud = rng.normal(0, 0.3, 10 * 16000).astype(np.float32)
    loud[37000:39000] = 0.0  # a 125 ms pause
    bounds = phones._chunk_bounds(loud, 40000, 8000)
    assert bounds[0] == 0 and bounds[-1] == len(loud) and 37000 <= bounds[1] < 39000
    assert all(0 < b - a <= 40000 for a, b in zip(bounds[:-1], bounds[1:]))
    monkeypatch.setattr(phones, "CHUNK_S", 3.0)
    monkeypatch.setattr(phones, "CUT_SEARCH_S", 1.0)
    segs = phones.phone_segments(wave, 16000)  # 4.6 s: two chunks
    assert any(p == "SIL" and 0 < a < 4.0 for p, a, _ in segs)
    assert all(a < b <= c for (_, a, b), (_, c, _) in zip(segs, segs[1:]))  # ordered, no overlap across chunks
    ids = phones.visemes_from_phones(segs, len(truth), 25.0)
    assert ((ids == SILENCE) == (truth == SILENCE)).mean() > 0.8


@needs_pocketsphinx
def test_forced_alignment_to_text(speech, monkeypatch, caplog):
    wave, truth, _ = speech
    segs = phones.phone_segments(wave, 16000, text=SENTENCE)
    pron = Pronouncer()
    expected = [p for w in SENTENCE.split() for p in pron.phones(w)]
    assert [p for p, _, _ in segs if not phones.is_silence(p)] == expected  # the text's phones, in order
    ids = phones.visemes_from_phones(segs, len(truth), 25.0)
    decoded = phones.visemes_for_audio(wave, 16000, len(truth), 25.0)
    print(f"aligned {(ids == truth).mean():.2f} vs decoded {(decoded == truth).mean():.2f}")
    assert (ids == truth).mean() > (decoded == truth).mean()
    with caplog.at_level(logging.WARNING, logger=phones.__name__):
        fallback = phones.phone_segments(wave[:8000], 16000, text=SENTENCE * 5)  # too many words for 0.5 s
        assert "could not be aligned" in caplog.text
        monkeypatch.setattr(phones, "ALIGN_MAX_S", 1.0)
        assert phones.phone_segments(wave, 16000, text=SENTENCE) == phones.phone_segments(wave, 16000)
        assert "decoding phones" in caplog.text
    assert all(not p[-1].isdigit() for p, _, _ in fallback)  # decoded phones carry no stress digits


@needs_pocketsphinx
def test_cli_writes_phone_visemes(synth_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(synth_corpus, corpus, ignore=shutil.ignore_patterns("*.txt"))  # like tsd-data prepare: no words
    out = tmp_path / "vis"
    cfg = compose_config(
        "data",
        ["data_command=visemes", f"root={corpus}", f"viseme_root={out}", "source=phones"],
        tmp_path,
        tmp_path / "r",
    )
    res = run(cfg)
    truths = sorted(corpus.glob("*/*.visemes.npy"))
    assert res["source"] == "phones" and res["written"] == len(truths) == 9 and not res["skipped"]
    acc = []
    for f in truths:
        ids = np.load(out / f.parent.name / f.name.replace(".visemes", ""), allow_pickle=False)
        assert ids.dtype == np.int64 and ids.shape == np.load(f).shape
        acc.append(ids == np.load(f))
    assert np.concatenate(acc).mean() >= 0.4
    assert run(cfg)["existing"] == 9


def test_missing_pocketsphinx_is_a_clear_error(synth_corpus, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # import pocketsphinx -> ImportError
    monkeypatch.setattr(phones, "_decoder", functools.cache(phones._decoder.__wrapped__))
    with pytest.raises(UserError, match="pip install pocketsphinx"):
        phones.phone_segments(np.zeros(1600, np.float32), 16000)
    cfg = compose_config(
        "data",
        ["data_command=visemes", f"root={synth_corpus}", f"viseme_root={tmp_path / 'vis'}", "source=phones"],
        tmp_path,
        tmp_path / "r",
    )
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2 and "pip install pocketsphinx" in caplog.records[-1].getMessage()
    assert not (tmp_path / "vis").exists()
