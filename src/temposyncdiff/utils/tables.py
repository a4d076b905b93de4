"""Markdown tables of result rows (tsd-eval, tsd-bench, the student ablation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Column = str | tuple[str, str, Callable[[Any], str]]  # a key (also its header), or (header, key, format)


def markdown_table(rows: Iterable[dict], columns: Sequence[Column], cell: Callable[[Any], str] = str) -> str:
    """``rows`` as a markdown table; key-only columns are formatted by ``cell``; a missing or None value is blank."""
    cols = [(c, c, cell) if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(k) is None else f(r[k]) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
