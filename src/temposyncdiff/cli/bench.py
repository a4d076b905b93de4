"""tsd-bench [task=latency|data|prepare_memory] [bench=cpu|gpu|latency_cpu]: generation latency table, cache-vs-mp4
loading speed, or tsd-data prepare's peak memory vs video length.

task=latency times the generation path of every model in ``bench.models`` (teacher, student) per component and
end to end at each of its step counts, over the grid threads x batch x dtype x runtime (narrowed per component or
runtime by ``bench.restrict``), and writes ``latency.json``, a markdown table and a plot.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from temposyncdiff.bench.generation import COMPONENTS, RUNTIMES, GenerationPath, Setting, bench_generation
from temposyncdiff.bench.report import SUMMARY, plot, report_markdown, summary
from temposyncdiff.cli.common import hydra_main
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import write_json, write_text
from temposyncdiff.utils.tables import markdown_table
from temposyncdiff.utils.task import log, task
from temposyncdiff.utils.timing import DTYPES, machine_info, param_count
from temposyncdiff.utils.weights import load_net

SAMPLER_KEYS = ("sampler", "sampler_kwargs", "guidance_scale", "overlap")


# ---- models and the grid ------------------------------------------------------------------------------------------
def load_models(
    bench: DictConfig, device: torch.device, image_size: int | None = None
) -> dict[str, tuple[GenerationPath, list[int], dict]]:
    """name -> (generation path, step counts, facts for the report), from exports or random-init net configs.

    An export's sampler settings (meta) win over the entry's, as ``tsd-infer`` uses them; steps are the entry's.
    ``image_size`` other than the VAE's own (``vae.image_size``, an export's trained size) takes a random-init VAE
    with ``vae.sizes[image_size]``'s overrides of ``vae.net``.
    """
    torch.manual_seed(0)
    vae, vae_meta = load_net(bench.vae.weights, "vae") if bench.vae.weights else (instantiate(bench.vae.net), {})
    size = vae_meta.get("image_size") or bench.vae.image_size  # an export's trained size wins
    if image_size is not None and image_size != size:
        vae, size = (
            instantiate(OmegaConf.merge(bench.vae.net, (bench.vae.sizes or {}).get(image_size) or {})),
            image_size,
        )
    out = {}
    for name, entry in bench.models.items():
        if entry is None:  # a preset leaves this model out
            continue
        if entry.weights:
            net, meta = load_net(entry.weights, entry.kind)
        else:
            net, meta = instantiate(entry.net, _convert_="all"), {}
        settings = {k: OmegaConf.to_container(entry[k]) if k == "sampler_kwargs" else entry[k] for k in SAMPLER_KEYS}
        settings |= {k: meta[k] for k in SAMPLER_KEYS if meta.get(k) is not None}
        schedule = meta.get("schedule") or OmegaConf.to_container(bench.schedule)
        path = GenerationPath(net.to(device), vae.to(device), schedule, **settings, latent_size=size // vae.downsample)
        facts = {
            "weights": entry.weights,
            "vae_weights": bench.vae.weights,
            "window": net.window,
            "image_size": size,
            "params": param_count(net),
            **settings,
        }
        out[name] = (path, sorted(entry.steps), facts)
    return out


def plan(bench: DictConfig, device: torch.device) -> dict[Setting, list[str]]:
    """Setting -> the components timed in it: the grid's product, narrowed by ``restrict`` (per component/runtime)."""
    for kind, names, known in (
        ("runtime", bench.runtimes, RUNTIMES),
        ("component", bench.components, COMPONENTS),
        ("dtype", bench.dtypes, DTYPES),
        ("restrict key", bench.restrict, (*RUNTIMES, *COMPONENTS)),
    ):
        if unknown := [n for n in names if n not in known]:
            raise UserError(f"bench: unknown {kind} {unknown} (known: {', '.join(known)})")

    def threads(values: list) -> list[int | None]:  # null = all cores; on CUDA the CPU threads are left alone
        return [None] if device.type == "cuda" else list(dict.fromkeys(v or os.cpu_count() for v in values))

    def allowed(name: str, axis: str, value: Any) -> bool:
        limit = (bench.restrict.get(name) or {}).get(axis)
        return limit is None or value in (threads(limit) if axis == "threads" else limit)

    out = {}
    for runtime in bench.runtimes:
        for dtype in bench.dtypes:
            for n in threads(bench.threads):
                for batch in bench.batch_sizes:
                    point = {"dtypes": dtype, "threads": n, "batch_sizes": batch}
                    comps = [
                        c
                        for c in bench.components
                        if all(allowed(name, k, v) for name in (c, runtime) for k, v in point.items())
                    ]
                    if comps:
                        out[Setting(runtime, dtype, n, batch)] = comps
    return out


# ---- tasks --------------------------------------------------------------------------------------------------------
def latency(cfg: DictConfig) -> dict:
    bench = cfg.bench
    device = torch.device(bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("bench=gpu needs a CUDA device; none is visible (use bench=cpu)")
    settings = plan(bench, device)
    machine = machine_info(device)
    rows, skipped, models = [], [], {}
    for image_size in bench.image_sizes or [None]:
        for name, (path, steps, facts) in load_models(bench, device, image_size).items():
            r, s = bench_generation(
                name,
                path,
                steps,
                settings,
                device,
                bench.warmup,
                bench.repeats,
                bench.budget_s,
                bench.peak_matmul_size,
                log.info,
            )
            rows, skipped = rows + r, skipped + [x | {"image_size": path.image_size} for x in s]
            models[name if image_size is None else f"{name} {path.image_size} px"] = facts
    report = {
        "machine": machine,
        "config": OmegaConf.to_container(bench, resolve=True),
        "models": models,
        "rows": rows,
        "skipped": skipped,
        "summary": summary(rows, bench.reference),
    }
    write_json(cfg.out_json, report)
    write_text(cfg.out_table, report_markdown(report))
    plot(report, cfg.out_plot)
    log.info(
        "latency -> %s, %s, %s\n%s",
        cfg.out_json,
        cfg.out_table,
        cfg.out_plot,
        markdown_table(report["summary"], SUMMARY),
    )
    return report


def data(cfg: DictConfig) -> dict:
    from temposyncdiff.data.dataset import benchmark_loading
    from temposyncdiff.data.manifest import read_manifest

    b = cfg.data_bench
    torch.set_num_threads(1)  # as in a DataLoader worker
    result = benchmark_loading(
        read_manifest(b.manifest),
        b.cache_dir,
        image_size=b.image_size,
        clip_len=b.clip_len,
        max_items=b.max_items,
        log=log.info,
    )
    write_json(b.out_json, result)
    return result


def prepare_memory(cfg: DictConfig) -> dict:
    from temposyncdiff.bench.prepare import bench_prepare, report_markdown

    b = cfg.prepare_memory
    report = bench_prepare(
        b.seconds,
        b.heights,
        fps=b.fps,
        audio_rate=b.audio_rate,
        work_dir=b.work_dir,
        settings=OmegaConf.to_container(b.settings),
        log=log.info,
    )
    report["machine"] = machine_info(torch.device("cpu"))
    write_json(b.out_json, report)
    write_text(b.out_table, table := report_markdown(report, report["machine"]))
    log.info("prepare memory -> %s, %s\n%s", b.out_json, b.out_table, table)
    return report


TASKS = {"latency": latency, "data": data, "prepare_memory": prepare_memory}


@task
def run(cfg: DictConfig) -> dict:
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task}: choose one of {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)


def main() -> None:
    hydra_main("bench", run)


if __name__ == "__main__":
    main()
