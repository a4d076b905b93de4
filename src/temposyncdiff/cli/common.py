"""Hydra wiring shared by the entry points: where the configs live and how to start a task."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from temposyncdiff.utils.task import EXIT_USER_ERROR

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")
VERSION_BASE = "1.3"


def check_overrides(config_name: str, overrides: list[str]) -> str | None:
    """Compose ``config_name`` with ``overrides`` as Hydra will; the first line of the reason if that fails."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=VERSION_BASE):
            compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:  # YAML: a broken config file
        noise = (
            "full_key:",
            "object_type",
            "reference_type",
            "See https",
            "To append",
            "Config search path",
            "provider=",
        )
        text = f"{err}\n{err.__cause__ or ''}"
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise)]
        return " ".join(lines) or type(err).__name__
    return None


def compose_run(config_name: str, overrides: list[str], run_dir: Path | None = None, hydra: bool = False) -> DictConfig:
    """``config_name`` composed with ``overrides`` as its entry point composes it (the ablation, the tests); with
    ``run_dir``, registered as the current Hydra run there, so ``${hydra:...}`` resolves as in a real run; with
    ``hydra``, the ``hydra`` node (launcher, sweeper) is kept without a run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=VERSION_BASE):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=hydra or run_dir is not None)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
    return cfg


def hydra_main(config_name: str, fn: Callable[..., Any]) -> None:
    """Run ``fn`` as a Hydra task. A single run's overrides are checked first, so a typo'd key or bad value
    is one line on stderr and exit 2 instead of Hydra's report; flags (``-m``, ``--help``) go to Hydra as they are."""
    args = sys.argv[1:]
    if any(a.startswith("--experimental-rerun") for a in args):  # Hydra unpickles the file it names
        print(
            "error: --experimental-rerun is not supported (it unpickles a file); rerun with the saved overrides "
            "from the run's .hydra/overrides.yaml instead",
            file=sys.stderr,
        )
        sys.exit(EXIT_USER_ERROR)
    if not any(a.startswith("-") for a in args):
        reason = check_overrides(config_name, args)
        if reason:
            print(f"error: bad command-line setting: {reason}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    hydra.main(version_base=VERSION_BASE, config_path=CONFIG_DIR, config_name=config_name)(fn)()
