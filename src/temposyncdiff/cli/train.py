"""tsd-train experiment=<corpus>/<stage> [key=value ...]: fit one stage, then export its weights."""

from __future__ import annotations

from temposyncdiff.cli.common import hydra_main
from temposyncdiff.training import train


def main() -> None:
    hydra_main("train", train)


if __name__ == "__main__":
    main()
