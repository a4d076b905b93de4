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
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.errors import UserError

log = logging.getLogger("temposyncdiff")
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class BelowWarning(logging.Filter):
    """Lets through records below WARNING: the console handler prints those on stdout, the rest go to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def route_library_logs(names: tuple[str, ...] = ("lightning", "lightning.pytorch", "lightning.fabric")) -> None:
    """Send Lightning's log records through the run's handlers (progress on stdout, problems on stderr and
    the run's log file) instead of the stderr handlers it installs when imported before logging is set up."""
    if not logging.getLogger().handlers:
        return
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def fail(message: str, code: int) -> None:
    """Log ``message`` as an error (stderr shows it as one bare line, the run's log file in full) and exit."""
    log.error("%s", message)
    if not logging.getLogger().handlers:  # outside a Hydra run nothing is configured: say it on stderr anyway
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


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
        route_library_logs()
        try:
            missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
            if missing:
                raise UserError(f"{', '.join(missing)} required: pass {' '.join(f'{k}=...' for k in missing)}")
            if cfg.get("extras", {}).get("print_config", True):
                print_config_tree(cfg, out_dir)
            return fn(cfg)
        except USER_ERRORS as err:
            fail(f"error: {err}", EXIT_USER_ERROR)
        except InstantiationException as err:  # a config value a constructor refused (wrong type or range)
            if isinstance(err.__cause__, USER_ERRORS):  # a constructor's own one-line error says it best
                fail(f"error: {err.__cause__}", EXIT_USER_ERROR)
            fail(f"error: bad setting: {' '.join(line.strip() for line in str(err).splitlines())}", EXIT_USER_ERROR)
        except KeyboardInterrupt:
            fail("interrupted: partial outputs were removed", EXIT_INTERRUPTED)
        except Exception:
            log.exception("task failed (run dir: %s)", out_dir)
            raise
        finally:
            close_loggers()

    return wrapper
