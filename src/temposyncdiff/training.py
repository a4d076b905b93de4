"""Fit one stage from a composed ``train`` config, then export its weights (``tsd-train`` runs ``train``)."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from temposyncdiff.errors import UserError
from temposyncdiff.utils.checkpoints import check_resume, own_checkpoint
from temposyncdiff.utils.task import log, task
from temposyncdiff.utils.threads import set_threads


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def resolve_ckpt(cfg: DictConfig) -> Path | None:
    """The checked ``ckpt_path`` (see ``check_resume``); ``last`` means the newest ``last.ckpt`` of an earlier
    run of the same task and stage."""
    if cfg.ckpt_path in (None, "last"):
        return None if cfg.ckpt_path is None else check_resume(_newest_last(cfg), cfg.model.get("stage"))
    return check_resume(str(cfg.ckpt_path), cfg.model.get("stage"))


def _newest_last(cfg: DictConfig) -> Path:
    runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    candidates = []
    for ckpt in runs.glob("*/checkpoints/last.ckpt"):
        run_cfg = ckpt.parent.parent / ".hydra" / "config.yaml"
        try:
            stage = OmegaConf.load(run_cfg).get("stage") if run_cfg.is_file() else None
        except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
            log.warning("ckpt_path=last: skipping %s (unreadable: %s)", run_cfg, str(err).splitlines()[0])
            continue
        if stage == cfg.stage:
            candidates.append(ckpt)
    if not candidates:
        raise UserError(f"ckpt_path=last: no earlier '{cfg.stage}' run with a last.ckpt under {runs}")
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("resuming from %s", newest)
    return newest


def export_blocker(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """Why this run writes nothing under checkpoints/ (None: it exports)."""
    debug = HydraConfig.get().runtime.choices.get("debug") if HydraConfig.initialized() else None
    if debug or trainer.fast_dev_run:
        return f"{f'debug={debug}' if debug else 'fast_dev_run'}: a debug run never writes checkpoints/"
    if cfg.monitor.metric not in trainer.callback_metrics:
        return f"no validation ran in this run ({cfg.monitor.metric} never logged), so it has no best checkpoint"
    return None


@task
def train(cfg: DictConfig) -> float | None:
    """Fit (and optionally test) the configured stage; returns ``cfg.optimized_metric`` for sweepers."""
    if cfg.get("model") is None:
        raise UserError("no stage chosen: pass experiment=<corpus>/<stage>, e.g. experiment=quickstart/vae")
    ckpt_path = resolve_ckpt(cfg)  # before anything is built: a bad checkpoint is reported at once
    if not str(cfg.trainer.get("accelerator", "")).startswith(("gpu", "cuda")):
        log.info("torch threads: %d", set_threads(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(
        cfg.data, _convert_="all"
    )  # plain types: checkpoints stay weights-only loadable
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage", None)  # a label for logs and resume, not a constructor argument
    model = hydra.utils.instantiate(model_cfg, _convert_="all")  # plain dicts/lists: weights-only checkpoints
    model.compile_net = cfg.compile
    loggers = instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cfg.test:
        if cfg.train:  # this run's own best checkpoint, never one a resumed checkpoint names
            ckpt_path = own_checkpoint(trainer.checkpoint_callback, "best") if trainer.checkpoint_callback else None
            if ckpt_path is None:
                log.info("testing the weights as trained: this run has no best checkpoint of its own")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cfg.export and cfg.train and trainer.is_global_zero:
        blocker = export_blocker(cfg, trainer)
        if blocker:
            log.warning("not exporting: %s", blocker)
        else:
            for path in model.export(cfg.paths.checkpoint_dir, trainer.checkpoint_callback):
                log.info("exported %s", path)
    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    return None if metric is None else float(metric)
