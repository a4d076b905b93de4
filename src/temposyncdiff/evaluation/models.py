"""The exports tsd-eval runs (``<name>@<steps>``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from temposyncdiff.inference.pipeline import TalkingHeadPipeline


def load_models(cfg: DictConfig) -> dict[str, TalkingHeadPipeline | str]:
    """One pipeline per ``models`` entry, or the reason it is unavailable (missing checkpoint)."""
    out: dict[str, TalkingHeadPipeline | str] = {}
    for m in cfg.models:
        if not Path(m.checkpoint).is_file():
            out[m.name] = f"{m.checkpoint}: checkpoint not found"
            continue
        out[m.name] = TalkingHeadPipeline.from_checkpoints(
            m.checkpoint,
            cfg.vae,
            kind=m.kind,
            sampler=m.get("sampler"),
            guidance_scale=m.get("guidance_scale"),
            image_size=cfg.get("image_size"),
            device=cfg.device,
            seed=cfg.seed,
            detector="center",
        )
    return out


def runs(cfg: DictConfig, models: dict[str, TalkingHeadPipeline | str]) -> Iterator[tuple[str, Any, int, dict]]:
    """``(run name, pipeline or reason, steps, run info)`` for every model entry and step count."""
    for m in cfg.models:
        pipe = models[m.name]
        for steps in m.steps:
            info = {"model": m.name, "kind": m.kind, "steps": int(steps), "checkpoint": str(m.checkpoint)}
            if not isinstance(pipe, str):
                info |= {"sampler": pipe.sampler, "guidance_scale": pipe.guidance_scale}
            yield f"{m.name}@{steps}", pipe, int(steps), info
