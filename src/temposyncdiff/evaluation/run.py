"""tsd-eval's entry point: the split and the models loaded, the selected protocols run, the report written."""

from __future__ import annotations

import datetime as dt
import platform
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.errors import UserError
from temposyncdiff.evaluation.clips import load_clips
from temposyncdiff.evaluation.denoise import Fidelity, evaluate_denoise
from temposyncdiff.evaluation.generation import evaluate_generation
from temposyncdiff.evaluation.long import evaluate_long
from temposyncdiff.evaluation.models import load_models
from temposyncdiff.evaluation.report import (
    DEN_COLUMNS,
    GEN_COLUMNS,
    face_targets,
    markdown,
    table_rows,
    teacher_targets,
    versions,
    write_outputs,
)
from temposyncdiff.metrics.image import (
    LPIPS,
    LPIPS_BACKBONES,
    unavailable,
)
from temposyncdiff.regions import RegionBoxes
from temposyncdiff.utils.io import file_record
from temposyncdiff.utils.task import log
from temposyncdiff.utils.timing import device_name


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Load the split and the models, run the selected protocols (``cfg.eval``), write report, tables and plots."""
    protocols = cfg.get("eval") or {}
    if not protocols:
        raise UserError("no protocol selected: use eval=denoise, eval=generation, eval=long or a list of them")
    if cfg.visemes not in ("audio", "data"):
        raise UserError(f"visemes={cfg.visemes}: expected audio | data")
    if "denoise" in protocols and cfg.lpips.net not in LPIPS_BACKBONES:
        raise UserError(f"lpips.net={cfg.lpips.net}: expected {' | '.join(LPIPS_BACKBONES)}")
    max_frames = protocols.get("generation", {}).get("max_frames")
    clips = load_clips(cfg.manifest, cfg.max_utterances, max_frames, cfg.reference_frame)
    models = load_models(cfg)
    device = torch.device(cfg.device)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    checkpoints = {m.name: file_record(m.checkpoint) for m in cfg.models} | {"vae": file_record(cfg.vae)}
    if "generation" in protocols and protocols.generation.syncnet:
        checkpoints["syncnet"] = file_record(protocols.generation.syncnet)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "config": container,
        "checkpoints": checkpoints,
        "split": {
            "manifest": str(cfg.manifest),
            "utterances": [{"id": c.id, "num_frames": len(c.frames), "reference": c.reference_from} for c in clips],
        },
    }
    if "denoise" in protocols:
        lpips = LPIPS(cfg.lpips.torch_home, cfg.lpips.net)
        report["denoise"] = evaluate_denoise(cfg, clips, models, Fidelity(RegionBoxes(**cfg.regions), lpips))
    else:
        report["denoise"] = unavailable("not selected (eval=...)")
    if "generation" in protocols:
        report["generation"] = evaluate_generation(cfg, clips, models)
        report["generation"]["targets"] = teacher_targets(report["generation"])
        if face := face_targets(report, dict(protocols.generation.get("face_targets") or {})):
            report["generation"]["face_targets"] = face
    else:
        report["generation"] = unavailable("not selected (eval=...)")
    if "long" in protocols:
        report["long"] = evaluate_long(cfg, clips, models)
    paths = write_outputs(report, cfg.out_json, cfg.tables_dir, cfg.plots_dir)
    gen, den = table_rows(report)
    log.info(
        "eval report -> %s\n%s%s",
        paths["report"],
        markdown(gen, GEN_COLUMNS) if gen else "",
        markdown(den, DEN_COLUMNS) if den else "",
    )
    return report
