"""tsd-data <command> [key=value ...]: synth | manifest | prepare | visemes | cache."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from temposyncdiff.cli.common import CONFIG_DIR, VERSION_BASE
from temposyncdiff.utils.task import log, task

COMMANDS = ("synth", "manifest")


@task
def run(cfg: DictConfig) -> dict:
    """Run one corpus command and return its summary."""
    if cfg.command == "synth":
        from temposyncdiff.data.synth import SynthConfig, synthesize_corpus

        keys = SynthConfig.__dataclass_fields__
        return synthesize_corpus(SynthConfig(**{k: cfg[k] for k in keys}), overwrite=cfg.overwrite, log=log.info)
    if cfg.command == "manifest":
        from temposyncdiff.data.manifest import build_manifest

        return build_manifest(
            cfg.root, cfg.out_dir, name=cfg.name, layout=cfg.layout, viseme_root=cfg.viseme_root,
            val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio, seed=cfg.seed, split_by=cfg.split_by,
            workers=cfg.workers, log=log.info,
        )  # fmt: skip
    raise ValueError(f"unknown command {cfg.command!r}")


def main() -> None:
    """Turn ``tsd-data <command>`` into the Hydra override ``data_command=<command>``, then run."""
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        print(f"usage: tsd-data {{{'|'.join(COMMANDS)}}} [key=value ...]   (see conf/data_command/)", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], f"data_command={args[0]}", *args[1:]]
    hydra.main(version_base=VERSION_BASE, config_path=CONFIG_DIR, config_name="data")(run)()


if __name__ == "__main__":
    main()
