"""tsd-eval [eval=denoise|generation] [split=...]: denoising and generation metrics -> outputs/metrics, tables, plots."""

from __future__ import annotations

from omegaconf import DictConfig

from temposyncdiff.cli.common import hydra_main
from temposyncdiff.evaluation.run import run_eval
from temposyncdiff.utils.task import task
from temposyncdiff.utils.threads import set_threads


@task
def evaluate(cfg: DictConfig) -> dict:
    """Run the selected protocols and write report, tables and plots; returns the report."""
    set_threads(cfg.threads)
    return run_eval(cfg)


def main() -> None:
    hydra_main("eval", evaluate)


if __name__ == "__main__":
    main()
