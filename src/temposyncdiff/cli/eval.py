"""tsd-eval [eval=denoise|generation] [split=...]: denoising and generation metrics -> outputs/metrics, tables, plots."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from temposyncdiff.cli.common import CONFIG_DIR, VERSION_BASE
from temposyncdiff.evaluation import run_eval
from temposyncdiff.utils.task import task


@task
def evaluate(cfg: DictConfig) -> dict:
    """Run the selected protocols and write report, tables and plots; returns the report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return run_eval(cfg)


def main() -> None:
    hydra.main(version_base=VERSION_BASE, config_path=CONFIG_DIR, config_name="eval")(evaluate)()


if __name__ == "__main__":
    main()
