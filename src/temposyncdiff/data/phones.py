"""Timed phones from speech with pocketsphinx's bundled US-English acoustic model, and per-frame visemes from them.

Speaker-independent speech tokens for footage without word timings: phone decoding (allphone search with the
model's phone bigram ``en-us-phone.lm.bin``) or, given the words spoken, forced alignment to their CMUdict
phones. Audio is decoded in chunks of at most ``CHUNK_S`` seconds, cut at the quietest stretch before each
border, so memory stays bounded however long the audio. Forced alignment runs on the whole utterance and so
only up to ``ALIGN_MAX_S``; longer audio, or audio the words cannot be aligned to, is decoded phone by phone.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from temposyncdiff.data.audio import resample
from temposyncdiff.data.visemes import arpabet_visemes, expand_segments, frame_visemes
from temposyncdiff.errors import UserError

SAMPLE_RATE = 16000  # the acoustic model's rate
FRAME_RATE = 100  # pocketsphinx frames per second
# A pocketsphinx frame i analyses samples [160 i, 160 i + 410): its centre lies 12.8 ms after i/100, so the
# border between frames i-1 and i (midway between their centres) lies at i/100 + 7.8 ms.
FRAME_OFFSET_S = 0.0078
CHUNK_S = 30.0  # longest stretch of audio decoded at once
CUT_SEARCH_S = 5.0  # a chunk ends at the quietest 100 ms of its last CUT_SEARCH_S seconds
ALIGN_MAX_S = 120.0  # forced alignment searches the whole utterance at once: longer audio is phone-decoded
PHONE_LM_WEIGHT = 2.0  # language weight for phone decoding (the phone bigram is weak; 6.5, the default, drops phones)
INSTALL_HINT = "pip install pocketsphinx"

log = logging.getLogger(__name__)


class PhonesUnavailableError(UserError, RuntimeError):
    """pocketsphinx (the acoustic model behind phone decoding) is not installed."""


def _pocketsphinx():
    try:
        import pocketsphinx
    except ImportError as err:
        raise PhonesUnavailableError(
            f"phone decoding needs pocketsphinx, which is not installed: {INSTALL_HINT}"
        ) from err
    return pocketsphinx


@functools.cache
def _decoder(mode: str):
    """One decoder per process and mode: ``allphone`` (phone decoding) or ``align`` (empty dictionary)."""
    ps = _pocketsphinx()
    if mode == "allphone":
        return ps.Decoder(allphone=ps.get_model_path("en-us/en-us-phone.lm.bin"), lw=PHONE_LM_WEIGHT, loglevel="FATAL")
    return ps.Decoder(lm=None, dict=None, loglevel="FATAL")


def is_silence(phone: str) -> bool:
    """Silence and pocketsphinx's fillers (+NSN+ noise, +SPN+ speech noise, +BREATH+ ...)."""
    return phone == "SIL" or phone.startswith("+")


def _int16(wave: np.ndarray) -> bytes:
    """float [-1, 1] or int16 samples -> int16 bytes with 1-LSB Gaussian dither (fixed seed: deterministic).

    Dither keeps digital silence (exact zeros) from reaching the model as log(0) features, which it reads as S.
    """
    x = wave.astype(np.float64) if wave.dtype == np.int16 else np.asarray(wave, np.float64) * 32767.0
    x += np.random.default_rng(0).normal(0.0, 1.0, len(x))
    return np.clip(np.round(x), -32768, 32767).astype(np.int16).tobytes()


def _chunk_bounds(wave: np.ndarray, chunk: int, search: int) -> list[int]:
    """Sample indices [0, ..., len] splitting ``wave`` into chunks of at most ``chunk`` samples, cut in pauses."""
    hop, bounds = SAMPLE_RATE // FRAME_RATE, [0]
    while len(wave) - bounds[-1] > chunk:
        lo = bounds[-1] + chunk - search
        window = np.asarray(wave[lo : lo + search], np.float64)
        energy = (window[: len(window) // hop * hop].reshape(-1, hop) ** 2).mean(axis=1)
        smooth = np.convolve(energy, np.ones(10), mode="same")  # 100 ms
        bounds.append(lo + int(np.argmin(smooth)) * hop + hop // 2)
    return bounds + [len(wave)]


def _decode(decoder, data: bytes) -> None:
    decoder.start_utt()
    try:
        decoder.process_raw(data, full_utt=True)
    finally:
        decoder.end_utt()


def _allphone(wave: np.ndarray) -> list[tuple[str, float, float]]:
    decoder, out = _decoder("allphone"), []
    bounds = _chunk_bounds(wave, int(CHUNK_S * SAMPLE_RATE), int(CUT_SEARCH_S * SAMPLE_RATE))
    for a, b in zip(bounds[:-1], bounds[1:]):
        _decode(decoder, _int16(wave[a:b]))
        t0 = a / SAMPLE_RATE + FRAME_OFFSET_S
        for seg in decoder.seg() or ():  # None when the chunk is shorter than one frame
            out.append((seg.word, t0 + seg.start_frame / FRAME_RATE, t0 + (seg.end_frame + 1) / FRAME_RATE))
    return out


def _align(wave: np.ndarray, text: str) -> list[tuple[str, float, float]]:
    """Words of ``text`` force-aligned to ``wave``, each word's CMUdict phones spread over its span; [] on failure.

    Word-level alignment, not pocketsphinx's second (state-level) pass: that pass fails on some utterances
    the first aligns, and on the synthetic corpus it is no more accurate (frame accuracy 0.75 vs 0.74).
    """
    from temposyncdiff.data.transcript_visemes import Pronouncer, word_phones

    decoder, pron, words, tokens = _decoder("align"), Pronouncer(), [], []
    for word in text.split():
        phones = [p.rstrip("012") for p in pron.phones(word)]
        if phones:
            token = "_".join(phones).lower()  # one dictionary entry per pronunciation
            if decoder.lookup_word(token) is None:
                decoder.add_word(token, " ".join(phones), True)
            words.append(word)
            tokens.append(token)
    if not tokens:
        return []
    try:
        decoder.set_align_text(" ".join(tokens))
        _decode(decoder, _int16(wave))
    except RuntimeError:
        return []
    known = set(tokens)
    segs = [(s.word, s.start_frame, s.end_frame) for s in decoder.seg() or ()]
    if sum(w in known for w, _, _ in segs) != len(tokens):  # no path through all the words
        return []
    spoken, out = iter(words), []
    for w, first, last in segs:
        a, b = first / FRAME_RATE + FRAME_OFFSET_S, (last + 1) / FRAME_RATE + FRAME_OFFSET_S
        out += word_phones(next(spoken), a, b, pron) if w in known else [("SIL", a, b)]
    return out


def phone_segments(wave: np.ndarray, sample_rate: int, text: str | None = None) -> list[tuple[str, float, float]]:
    """Timed phones ``(phone, start_s, end_s)`` of mono speech (float in [-1, 1] or int16 samples).

    Decoded phones are pocketsphinx's ARPAbet set (no stress digits) plus ``SIL`` and fillers such as ``+NSN+``.
    With ``text`` (the words spoken, up to ``ALIGN_MAX_S`` of audio) the words are force-aligned and each
    word's CMUdict phones (with stress digits) spread over its span, with ``SIL`` between words.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"phone_segments needs mono samples [S], got shape {wave.shape}")
    if sample_rate != SAMPLE_RATE:
        wave = resample(wave if wave.dtype != np.int16 else wave / 32768.0, sample_rate, SAMPLE_RATE)
    if not len(wave):
        return []
    if text and text.strip():
        if len(wave) <= ALIGN_MAX_S * SAMPLE_RATE:
            segments = _align(wave, text)
            if segments:
                return segments
            log.warning("phones: the words could not be aligned to the audio; decoding phones instead")
        else:
            log.warning(f"phones: {len(wave) / SAMPLE_RATE:.0f} s is over {ALIGN_MAX_S:.0f} s; decoding phones")
    return _allphone(wave)


def visemes_from_phones(segments: list[tuple[str, float, float]], num_frames: int, fps: float) -> np.ndarray:
    """Per-frame viseme ids (int64): frame k takes the viseme of the phone covering time k/fps (else silence).

    Phones map through the project's ARPAbet table (diphthongs split in two halves); silence and fillers -> sil.
    """
    named = [(("sil",) if is_silence(p) else arpabet_visemes(p), start, end) for p, start, end in segments]
    return frame_visemes(expand_segments(named), num_frames, fps)


def visemes_for_audio(
    wave: np.ndarray, sample_rate: int, num_frames: int, fps: float, text: str | None = None
) -> np.ndarray:
    """Per-frame viseme ids (int64, ``num_frames`` at ``fps``) decoded from speech, optionally aligned to ``text``."""
    return visemes_from_phones(phone_segments(wave, sample_rate, text), num_frames, fps)
