"""The trained models tsd-app offers: folders holding a stage's export (``student_best.pt`` or ``teacher_best.pt``)
beside ``vae_pretrained.pt`` — ``checkpoints/`` and the own-footage recipe's ``checkpoints/own/<name>/``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STAGES = ("student", "teacher")
VAE_FILE = "vae_pretrained.pt"


@dataclass(frozen=True)
class Model:
    """One stage's export in ``folder``; ``label`` names it in the page."""

    label: str
    folder: Path
    stage: str

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"{self.stage}_best.pt"

    @property
    def vae(self) -> Path:
        return self.folder / VAE_FILE

    @property
    def onnx_dir(self) -> Path:
        """Where tsd-export writes this model's graphs (runtime=onnx)."""
        from temposyncdiff.export.onnx import default_onnx_dir

        return default_onnx_dir(self.checkpoint, self.stage)


def find_models(dirs: Iterable[str | os.PathLike], depth: int = 2) -> list[Model]:
    """Every stage export in ``dirs`` or up to ``depth`` folder levels below them (hidden folders skipped), students
    first; labelled ``<stage> (<folder>)``, the folder as written from the searched one's name down."""
    models, seen = [], set()
    for top in map(Path, dirs):
        for folder in _folders(top, depth):
            real = folder.resolve()
            if real in seen or not (folder / VAE_FILE).is_file():
                continue
            seen.add(real)
            where = (Path(top.name) / folder.relative_to(top)).as_posix() if top.name else folder.as_posix()
            models += [Model(f"{s} ({where})", folder, s) for s in STAGES if (folder / f"{s}_best.pt").is_file()]
    return sorted(models, key=lambda m: (STAGES.index(m.stage), m.label))


def _folders(top: Path, depth: int) -> list[Path]:
    """``top`` and its subfolders down to ``depth`` levels, in name order (none when ``top`` is not a folder)."""
    if not top.is_dir():
        return []
    below = sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")) if depth else []
    return [top, *(f for sub in below for f in _folders(sub, depth - 1))]
