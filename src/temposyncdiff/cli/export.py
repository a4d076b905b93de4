"""tsd-export [stage=student] [checkpoint=...] [vae=...] [out_dir=...]: ONNX graphs for tsd-infer runtime=onnx."""

from __future__ import annotations

import logging
import warnings

from omegaconf import DictConfig

from temposyncdiff.cli.common import hydra_main
from temposyncdiff.errors import UserError
from temposyncdiff.export.onnx import default_onnx_dir, export_onnx
from temposyncdiff.utils.task import log, task
from temposyncdiff.utils.threads import set_threads


@task
def export(cfg: DictConfig) -> dict:
    """Export the stage's denoiser, its audio encoder and the VAE to ONNX, verified against PyTorch."""
    if not isinstance(cfg.tolerance, int | float) or isinstance(cfg.tolerance, bool) or not cfg.tolerance >= 0:
        raise UserError(f"tolerance={cfg.tolerance}: must be a number >= 0")
    set_threads(cfg.threads)
    for name in ("onnx_ir", "onnxscript"):  # hundreds of INFO lines per graph (passes, deduplicated initialisers)
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="# The axis name")  # the inputs share the batch axis, as meant
    out_dir = cfg.out_dir or default_onnx_dir(cfg.checkpoint, cfg.stage)
    sidecar = export_onnx(
        cfg.checkpoint, cfg.vae, out_dir, kind=cfg.stage, opset=cfg.opset, tolerance=cfg.tolerance, seed=cfg.seed
    )
    diffs = ", ".join(f"{name} {g['max_abs_diff']:.2g}" for name, g in sidecar["graphs"].items())
    log.info("wrote %s (opset %d); max abs difference from PyTorch: %s", out_dir, sidecar["opset"], diffs)
    return sidecar


def main() -> None:
    hydra_main("export", export)


if __name__ == "__main__":
    main()
