"""LRS3 transcript files: ``Text:`` line, ``Conf:`` line, then a ``WORD START END ASDSCORE`` table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import write_text


class TranscriptError(UserError, ValueError):
    """A transcript file cannot be parsed."""


@dataclass
class Transcript:
    text: str
    words: list[tuple[str, float, float]] = field(default_factory=list)  # (WORD, start_s, end_s)
    conf: str = "5"


def format_transcript(t: Transcript, asd_score: float = 7.0) -> str:
    """LRS3 text for a transcript (two spaces after the field names, as the corpus has them)."""
    lines = [f"Text:  {t.text}", f"Conf:  {t.conf}", "", "WORD START END ASDSCORE"]
    lines += [f"{w} {s:.2f} {e:.2f} {asd_score:.1f}" for w, s, e in t.words]
    return "\n".join(lines) + "\n"


def write_transcript(path: str | os.PathLike, t: Transcript) -> None:
    write_text(path, format_transcript(t))


def read_transcript(path: str | os.PathLike) -> Transcript:
    """Parse an LRS3 transcript; bytes that are not UTF-8 are decoded as Latin-1 rather than failing."""
    raw = Path(path).read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        content = raw.decode("latin-1")
    text, conf, words, in_table = None, "", [], False
    for n, line in enumerate(content.splitlines(), 1):
        line = line.strip()
        if line.startswith("Text:"):
            text = line[5:].strip()
        elif line.startswith("Conf:"):
            conf = line[5:].strip()
        elif line.upper().startswith("WORD START END"):
            in_table = True
        elif in_table and line:
            parts = line.split()
            try:
                start, end = float(parts[1]), float(parts[2])
            except (IndexError, ValueError) as err:
                raise TranscriptError(f"{path}:{n}: bad word line {line!r}") from err
            if end < start:
                raise TranscriptError(f"{path}:{n}: word ends before it starts ({line!r})")
            words.append((parts[0], start, end))
    if text is None:
        raise TranscriptError(f"{path}: no 'Text:' line")
    return Transcript(text=text, words=words, conf=conf)
