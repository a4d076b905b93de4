"""Hydra wiring shared by the entry points: where the configs live and how to start a task."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")
VERSION_BASE = "1.3"
