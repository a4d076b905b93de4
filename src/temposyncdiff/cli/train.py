"""tsd-train experiment=<corpus>/<stage> [key=value ...]: fit one stage, then export its weights."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.cli.common import CONFIG_DIR, VERSION_BASE
from temposyncdiff.errors import UserError
from temposyncdiff.utils.task import log, task


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def resolve_ckpt(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` means the newest ``last.ckpt`` of an earlier run of the same task and stage."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    candidates = []
    for ckpt in runs.glob("*/checkpoints/last.ckpt"):
        run_cfg = ckpt.parent.parent / ".hydra" / "config.yaml"
        if run_cfg.exists() and OmegaConf.load(run_cfg).get("stage") == cfg.stage:
            candidates.append(ckpt)
    if not candidates:
        raise UserError(f"ckpt_path=last: no earlier '{cfg.stage}' run with a last.ckpt under {runs}")
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("resuming from %s", newest)
    return str(newest)


@task
def train(cfg: DictConfig) -> float | None:
    """Fit (and optionally test) the configured stage; returns ``cfg.optimized_metric`` for sweepers."""
    if cfg.get("model") is None:
        raise UserError("no stage chosen: pass experiment=<corpus>/<stage>, e.g. experiment=quickstart/vae")
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
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt(cfg))
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path="best" if cfg.train else resolve_ckpt(cfg))
    if cfg.export and cfg.train and trainer.is_global_zero:
        for path in model.export(cfg.paths.checkpoint_dir, trainer.checkpoint_callback):
            log.info("exported %s", path)
    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    return None if metric is None else float(metric)


def main() -> None:
    hydra.main(version_base=VERSION_BASE, config_path=CONFIG_DIR, config_name="train")(train)()


if __name__ == "__main__":
    main()
