"""espeak-ng speech synthesis through its C library, with word and phoneme timings from its own events."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
from dataclasses import dataclass

import numpy as np

from temposyncdiff.errors import UserError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EV_LIST_END, _EV_WORD, _EV_PHONEME = 0, 1, 7
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4

INSTALL_HINT = "install it with 'apt-get install espeak-ng' (Debian/Ubuntu) or your system's package manager"


class EspeakUnavailableError(UserError, RuntimeError):
    """espeak-ng's shared library is not installed or cannot be loaded."""


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Speech:
    """Synthesised speech: mono int16-range float samples and timings in seconds."""

    samples: np.ndarray  # float32 in [-1, 1]
    sample_rate: int
    words: list[tuple[str, float, float]]  # (WORD, start, end)
    phonemes: list[tuple[str, float, float]]  # (espeak mnemonic, start, end); "_" = pause


class Espeak:
    """One espeak-ng engine per process (the C library keeps global state).

    The engine carries state from one utterance to the next (pitch flutter, glottal phase), so the same
    request would sound slightly different depending on what was spoken before. ``synthesize`` therefore
    speaks in a forked child of this process, whose engine is initialised but has never spoken: the same
    text and voice give the same samples whatever ran before, in any worker.
    """

    _lib: ctypes.CDLL | None = None
    _sample_rate = 0

    def __init__(self, library: str | None = None) -> None:
        if Espeak._lib is None:
            name = library or ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as err:
                raise EspeakUnavailableError(f"espeak-ng library not found ({name}): {INSTALL_HINT}") from err
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS)
            if rate <= 0:
                raise EspeakUnavailableError(f"espeak-ng failed to initialise (code {rate}): {INSTALL_HINT}")
            Espeak._lib, Espeak._sample_rate = lib, rate
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, str]] = []
        self._callback = _CALLBACK(self._on_audio)

    @property
    def sample_rate(self) -> int:
        return Espeak._sample_rate

    def _on_audio(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EV_LIST_END:
            ev = events[i]
            if ev.type in (_EV_WORD, _EV_PHONEME):
                name = bytes(ev.id).split(b"\0")[0].decode("utf-8", "replace") if ev.type == _EV_PHONEME else ""
                self._events.append((ev.type, ev.text_position, ev.sample, name))
            i += 1
        return 0

    def synthesize(
        self, text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50, pitch_range: int = 50
    ) -> Speech:
        """Speak ``text``; words are timed from the phonemes espeak-ng attributes to them."""
        return _in_forked_child(self._speak_here, text, voice, rate, pitch, pitch_range)

    def _speak_here(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> Speech:
        lib = Espeak._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice '{voice}'")
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._events = [], []
        lib.espeak_SetSynthCallback(self._callback)
        data = text.encode("utf-8")
        lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return self._timings(text, samples.astype(np.float32) / 32768.0)

    def _timings(self, text: str, samples: np.ndarray) -> Speech:
        sr, total = self.sample_rate, len(samples)
        phon = [(pos, s, n) for kind, pos, s, n in self._events if kind == _EV_PHONEME]
        phonemes = [
            (name, start / sr, (phon[k + 1][1] if k + 1 < len(phon) else total) / sr)
            for k, (_, start, name) in enumerate(phon)
        ]
        words = []
        for kind, pos, _, _ in self._events:
            if kind != _EV_WORD:
                continue
            own = [p for (p_pos, _, name), p in zip(phon, phonemes) if p_pos == pos and not name.startswith("_")]
            if own:
                word = _word_at(text, pos - 1)
                words.append((word, own[0][1], own[-1][2]))
        return Speech(samples, sr, words, phonemes)


def _in_forked_child(fn, *args):
    """``fn(*args)`` in a forked child; its result or exception comes back through a pipe.

    A plain fork, not multiprocessing: the corpus workers are daemonic pool processes, which may not have
    multiprocessing children.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        os.close(read_fd)
        try:
            payload = pickle.dumps((True, fn(*args)))
        except BaseException as err:  # noqa: BLE001 - handed to the parent
            payload = pickle.dumps((False, err))
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError(f"espeak-ng's child process died (wait status {status})")
    ok, value = pickle.loads(payload)
    if not ok:
        raise value
    return value


def _word_at(text: str, index: int) -> str:
    """The word starting at character ``index``, upper-cased, punctuation stripped (LRS3 style)."""
    end = index
    while end < len(text) and not text[end].isspace():
        end += 1
    return "".join(c for c in text[index:end] if c.isalnum() or c == "'").upper()
