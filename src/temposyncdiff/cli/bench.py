"""tsd-bench [task=latency|data] [bench=cpu|gpu]: component latency table, or cache-vs-mp4 loading speed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.cli.common import CONFIG_DIR, VERSION_BASE
from temposyncdiff.errors import UserError
from temposyncdiff.latency import bench_module, param_count
from temposyncdiff.utils.io import write_json, write_text
from temposyncdiff.utils.task import log, task

COLUMNS = (
    "component",
    "device",
    "dtype",
    "threads",
    "batch",
    "ms_per_frame",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "params",
)


def _vae(entry: DictConfig) -> torch.nn.Module:
    if entry.weights:
        from temposyncdiff.utils.weights import load_net

        return load_net(entry.weights, "vae")[0]
    return hydra.utils.instantiate(entry.net).eval()


def latency(cfg: DictConfig) -> dict:
    bench = cfg.bench
    device = torch.device(bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("bench=gpu needs a CUDA device; none is visible (use bench=cpu)")
    threads = [t if t is not None else None for t in bench.threads]
    rows = []
    for entry in bench.vae:
        vae = _vae(entry).to(device)
        size, f, c = entry.image_size, vae.downsample, vae.latent_channels
        for dtype in bench.dtypes:
            common = dict(batch_sizes=list(bench.batch_sizes), threads=threads, dtype=dtype, device=device,
                          warmup=bench.warmup, repeats=bench.repeats)  # fmt: skip
            rows += bench_module(f"{entry.name}/encoder", vae.to_latent, lambda b, s=size: torch.randn(b, 3, s, s),
                                 param_count(vae.encoder), **common)  # fmt: skip
            rows += bench_module(f"{entry.name}/decoder", vae.from_latent, lambda b, s=size // f, c=c: torch.randn(b, c, s, s),
                                 param_count(vae.decoder), **common)  # fmt: skip
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "config": OmegaConf.to_container(bench, resolve=True), "rows": rows}  # fmt: skip
    write_json(cfg.out_json, report)
    write_text(cfg.out_table, markdown_table(rows))
    log.info("latency table -> %s\n%s", cfg.out_table, markdown_table(rows))
    return report


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def data(cfg: DictConfig) -> dict:
    from temposyncdiff.data.dataset import benchmark_loading
    from temposyncdiff.data.manifest import read_manifest

    b = cfg.data_bench
    torch.set_num_threads(1)  # as in a DataLoader worker
    result = benchmark_loading(read_manifest(b.manifest), b.cache_dir, image_size=b.image_size, clip_len=b.clip_len,
                               max_items=b.max_items, log=log.info)  # fmt: skip
    write_json(b.out_json, result)
    return result


@task
def run(cfg: DictConfig) -> dict:
    if cfg.task not in ("latency", "data"):
        raise UserError(f"task={cfg.task}: choose latency or data")
    Path(cfg.paths.outputs_dir).mkdir(parents=True, exist_ok=True)
    return latency(cfg) if cfg.task == "latency" else data(cfg)


def main() -> None:
    hydra.main(version_base=VERSION_BASE, config_path=CONFIG_DIR, config_name="bench")(run)()


if __name__ == "__main__":
    main()
