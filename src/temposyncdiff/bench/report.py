"""tsd-bench latency's outputs: the end-to-end summary with speed-ups, the markdown tables and the plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from temposyncdiff.utils.io import atomic_path
from temposyncdiff.utils.tables import markdown_table


def _f(spec: str = "", scale: float = 1.0, unit: str = "") -> Callable[[Any], str]:
    return lambda v: format(v * scale if scale != 1.0 else v, spec) + unit


SUMMARY = (("model", "model", _f()), ("px", "image_size", _f()), ("steps", "steps", _f()),
           ("net calls", "net_calls", _f()), ("ms/frame", "ms_per_frame", _f(".2f")), ("fps", "fps", _f(".1f")),
           ("RTF", "rtf", _f(".3f")), ("speed-up", "speedup", _f(".1f", unit="x")), ("runtime", "runtime", _f()),
           ("dtype", "dtype", _f()), ("threads", "threads", _f()), ("batch", "batch", _f()),
           ("vs eager fp32", "vs_fp32", _f(".2f", unit="x")), ("PSNR dB", "psnr_db", _f(".1f")),
           ("% peak", "peak_pct", _f(".1f")), ("window ms", "median_ms", _f(".1f")))  # fmt: skip
COLUMNS = (("model", "model", _f()), ("component", "component", _f()), ("steps", "steps", _f()),
           ("runtime", "runtime", _f()), ("dtype", "dtype", _f()), ("threads", "threads", _f()),
           ("batch", "batch", _f()), ("px", "image_size", _f()), ("ms/frame", "ms_per_frame", _f(".3f")), ("median ms", "median_ms", _f(".2f")),
           ("p10 ms", "p10_ms", _f(".2f")), ("p90 ms", "p90_ms", _f(".2f")), ("n", "repeats", _f()),
           ("MFLOP/frame", "flops_per_frame", _f(".1f", 1e-6)), ("GFLOP/s", "gflops", _f(".2f")),
           ("% peak", "peak_pct", _f(".1f")), ("PSNR dB", "psnr_db", _f(".1f")), ("params", "params", _f(",")),
           ("peak MB", "peak_mem_mb", _f(".0f")))  # fmt: skip


def summary(rows: list[dict], reference: str) -> list[dict]:
    """End-to-end rows with the speed-up over ``reference``'s largest step count in the same setting, and over the
    same model's eager float32 row (``vs_fp32``). ``median_ms`` is one window's compute: a stream's first frame waits
    for it once its audio has come."""
    e2e = [r for r in rows if r["component"] == "end_to_end"]

    def key(r: dict) -> tuple:
        return r["runtime"], r["dtype"], r["threads"], r["batch"], r["image_size"]

    def same_work(r: dict) -> tuple:
        return r["model"], r["steps"], r["threads"], r["batch"], r["image_size"]

    fp32 = {same_work(r): r["ms_per_frame"] for r in e2e if (r["runtime"], r["dtype"]) == ("eager", "fp32")}
    base: dict[tuple, dict] = {}
    for r in e2e:
        if r["model"] == reference and r["steps"] > base.get(key(r), {}).get("steps", -1):
            base[key(r)] = r
    order = {k: i for i, k in enumerate(dict.fromkeys(map(key, e2e)))}
    models = list(dict.fromkeys(r["model"] for r in e2e))
    out = [
        {
            k: r[k]
            for k in (
                "model",
                "steps",
                "net_calls",
                "ms_per_frame",
                "fps",
                "rtf",
                "runtime",
                "dtype",
                "threads",
                "batch",
                "image_size",
                "psnr_db",
                "peak_pct",
                "median_ms",
            )
        }
        | {"speedup": base[key(r)]["ms_per_frame"] / r["ms_per_frame"] if key(r) in base else None}
        | {"vs_fp32": fp32[same_work(r)] / r["ms_per_frame"] if same_work(r) in fp32 else None}
        for r in e2e
    ]
    return sorted(out, key=lambda r: (r["image_size"], order[key(r)], models.index(r["model"]), r["steps"]))


def report_markdown(report: dict) -> str:
    m = report["machine"]
    head = (
        f"# Latency\n\n{m['device']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, load average "
        f"{' '.join(map(str, m['load_avg']))}, CPU flags "
        f"{' '.join(k for k, v in m.get('cpu_flags', {}).items() if v) or 'none of note'}. Per frame = per new frame of a steady-state window "
        f"(window - overlap frames per stream); RTF = time per frame x 25 fps (< 1: faster than real time); PSNR: the decoded frames against eager fp32's (blank: identical); "
        f"window ms: one window's compute, what a stream's first frame waits for once its audio has come.\n\n"
    )
    skipped = "".join(
        f"- skipped {s['model']} {s['runtime']} {s['dtype']} threads={s['threads']} batch={s['batch']}: {s['reason']}\n"
        for s in report["skipped"]
    )
    return (
        head
        + f"## End to end (speed-up vs {report['config']['reference']})\n\n"
        + markdown_table(report["summary"], SUMMARY)
        + "\n## All rows\n\n"
        + markdown_table(report["rows"], COLUMNS)
        + ("\n" + skipped if skipped else "")
    )


def plot(report: dict, path: str | Path) -> None:
    """End-to-end ms per frame vs sampler steps: one line per model and setting (log-log)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    series: dict[str, list] = {}
    for r in report["summary"]:
        label = (
            f"{r['model']} {r['image_size']} px ({r['runtime']}, {r['dtype']}, {r['threads']} thr, batch {r['batch']})"
        )
        series.setdefault(label, []).append((r["steps"], r["ms_per_frame"]))
    for label, pts in series.items():
        ax.plot(
            *zip(*sorted(pts)),
            marker="o",
            ls="-" if label.startswith(report["config"]["reference"]) else "--",
            label=label,
        )
    steps = sorted({r["steps"] for r in report["summary"]})
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sampler steps",
        ylabel="ms per frame (end to end)",
        title=f"generation latency ({report['machine']['device']})",
    )
    if steps:
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
