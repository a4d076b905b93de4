"""What every Hydra entry point shares: config printing/saving, one-line user errors, closing loggers."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.errors import UserError

log = logging.getLogger("temposyncdiff")
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None) -> None:
    """Print the composed config as a rich tree (one branch per top-level key) and save it as YAML."""
    tree = rich.tree.Tree("CONFIG", style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
    if save_dir is not None:
        with open(Path(save_dir) / "config_tree.log", "w") as f:
            rich.print(tree, file=f)


def close_loggers() -> None:
    """Finish a W&B run if one is open, so a failed task still flushes its logs."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def task(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task: print the config, run, turn user errors into one line + exit 2, always close loggers."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
        if cfg.get("extras", {}).get("print_config", True):
            print_config_tree(cfg, out_dir)
        try:
            return fn(cfg)
        except USER_ERRORS as err:
            log.error("error: %s", err)
            sys.exit(2)
        except Exception:
            log.exception("task failed (run dir: %s)", out_dir)
            raise
        finally:
            close_loggers()

    return wrapper
