"""Shared fixtures: a tiny synthetic corpus made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from temposyncdiff.data.synth import SynthConfig, synthesize_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """3 identities x 3 utterances at 64 px (LRS3 layout) under a session temp dir."""
    out = tmp_path_factory.mktemp("synth") / "lrs3"
    synthesize_corpus(SynthConfig(out=str(out), identities=3, utterances=3, image_size=64, seed=7, workers=1))
    return out
