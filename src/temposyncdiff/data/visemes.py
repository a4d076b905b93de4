"""The one viseme table: 15 mouth-shape classes and the phoneme -> viseme maps (ARPAbet and espeak-ng).

Velar and glottal consonants (K G NG HH) have no mouth shape of their own; they take the neutral
mid-open ``EH`` class. Schwa (AH0 / espeak ``@``) does too. Diphthongs are split in two halves
(e.g. AY -> AA then IH) so the mouth moves through both shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VISEMES: tuple[str, ...] = (
    "sil",
    "AA",
    "AE",
    "EH",
    "IH",
    "OH",
    "OO",
    "FV",
    "MBP",
    "WQ",
    "L",
    "CH",
    "TH",
    "SZ",
    "R",
)
VISEME_ID: dict[str, int] = {name: i for i, name in enumerate(VISEMES)}
NUM_VISEMES = len(VISEMES)
SILENCE = VISEME_ID["sil"]

# ARPAbet (CMUdict, stress digits stripped) -> one or two visemes.
ARPABET: dict[str, tuple[str, ...]] = {
    "AA": ("AA",),
    "AE": ("AE",),
    "AH": ("AA",),
    "AO": ("OH",),
    "AW": ("AA", "OO"),
    "AY": ("AA", "IH"),
    "EH": ("EH",),
    "ER": ("R",),
    "EY": ("EH", "IH"),
    "IH": ("IH",),
    "IY": ("IH",),
    "OW": ("OH", "OO"),
    "OY": ("OH", "IH"),
    "UH": ("OO",),
    "UW": ("OO",),
    "B": ("MBP",),
    "P": ("MBP",),
    "M": ("MBP",),
    "F": ("FV",),
    "V": ("FV",),
    "TH": ("TH",),
    "DH": ("TH",),
    "S": ("SZ",),
    "Z": ("SZ",),
    "SH": ("CH",),
    "ZH": ("CH",),
    "CH": ("CH",),
    "JH": ("CH",),
    "L": ("L",),
    "T": ("L",),
    "D": ("L",),
    "N": ("L",),
    "R": ("R",),
    "W": ("WQ",),
    "Y": ("IH",),
    "K": ("EH",),
    "G": ("EH",),
    "NG": ("EH",),
    "HH": ("EH",),
}

# espeak-ng English phoneme mnemonics (as its phoneme events name them) -> one or two visemes.
ESPEAK: dict[str, tuple[str, ...]] = {
    "a": ("AE",),
    "aa": ("AE",),
    "a#": ("AA",),
    "A:": ("AA",),
    "A@": ("AA", "R"),
    "A": ("AA",),
    "V": ("AA",),
    "aI": ("AA", "IH"),
    "aI@": ("AA", "IH"),
    "aU": ("AA", "OO"),
    "e": ("EH",),
    "E": ("EH",),
    "eI": ("EH", "IH"),
    "e@": ("EH", "R"),
    "i": ("IH",),
    "i:": ("IH",),
    "I": ("IH",),
    "I#": ("IH",),
    "I2": ("IH",),
    "i@": ("IH", "R"),
    "i@3": ("IH", "R"),
    "0": ("OH",),
    "O": ("OH",),
    "O:": ("OH",),
    "O@": ("OH", "R"),
    "o@": ("OH", "R"),
    "oU": ("OH", "OO"),
    "OI": ("OH", "IH"),
    "o": ("OH",),
    "u:": ("OO",),
    "U": ("OO",),
    "U@": ("OO", "R"),
    "u": ("OO",),
    "@": ("EH",),
    "@2": ("EH",),
    "@5": ("EH",),
    "@L": ("EH", "L"),
    "3": ("R",),
    "3:": ("R",),
    "p": ("MBP",),
    "b": ("MBP",),
    "m": ("MBP",),
    "f": ("FV",),
    "v": ("FV",),
    "T": ("TH",),
    "D": ("TH",),
    "s": ("SZ",),
    "z": ("SZ",),
    "S": ("CH",),
    "Z": ("CH",),
    "tS": ("CH",),
    "dZ": ("CH",),
    "l": ("L",),
    "t": ("L",),
    "d": ("L",),
    "n": ("L",),
    "r": ("R",),
    "w": ("WQ",),
    "j": ("IH",),
    "k": ("EH",),
    "g": ("EH",),
    "N": ("EH",),
    "h": ("EH",),
    "?": ("EH",),
    "x": ("EH",),
}


def arpabet_visemes(phone: str) -> tuple[str, ...]:
    """Visemes for one ARPAbet phone (stress digit allowed); unknown phones map to ``EH``, schwa (AH0) too."""
    phone = phone.upper()
    if phone == "AH0":
        return ("EH",)
    return ARPABET.get(phone.rstrip("012"), ("EH",))


def espeak_visemes(phoneme: str) -> tuple[str, ...]:
    """Visemes for one espeak-ng phoneme mnemonic; pauses (``_``) are silence, unknowns ``EH``."""
    if not phoneme or phoneme.startswith("_"):
        return ("sil",)
    name = phoneme.rstrip("-;/#'") or phoneme
    if phoneme in ESPEAK:
        return ESPEAK[phoneme]
    return ESPEAK.get(name, ESPEAK.get(name[:1], ("EH",)))


def expand_segments(
    segments: Sequence[tuple[Sequence[str], float, float]],
) -> list[tuple[str, float, float]]:
    """Split each (visemes, start, end) segment evenly among its visemes."""
    out: list[tuple[str, float, float]] = []
    for visemes, start, end in segments:
        step = (end - start) / len(visemes)
        out.extend((v, start + k * step, start + (k + 1) * step) for k, v in enumerate(visemes))
    return out


def frame_visemes(segments: Sequence[tuple[str, float, float]], num_frames: int, fps: float) -> np.ndarray:
    """Per-frame viseme ids (int64) from timed (viseme, start_s, end_s) segments.

    Frame k stands for time k/fps (its timestamp) and takes the viseme covering that time;
    uncovered frames are silence.
    """
    ids = np.full(num_frames, SILENCE, dtype=np.int64)
    times = np.arange(num_frames) / fps
    for name, start, end in segments:
        ids[(times >= start) & (times < end)] = VISEME_ID[name]
    return ids
