"""eval_report.json, the markdown/csv tables and the plots, from the protocols' results."""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import io
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from temposyncdiff.utils.io import atomic_path, write_json, write_text
from temposyncdiff.utils.tables import markdown_table

PACKAGES = ("temposyncdiff", "torchaudio", "torchmetrics", "lightning", "diffusers", "numpy", "av", "dlib-bin",
            "dlib", "face_recognition_models")  # fmt: skip
GEN_COLUMNS = ("run", "steps", "sampler", "status", "psnr", "ssim", "psnr_mouth", "ssim_mouth", "psnr_upper_face",
               "ssim_upper_face", "psnr_mouth_gap", "flicker", "flicker_gap", "seam_ratio", "seam_ratio_gt", "mouth_corr",
               "mouth_corr_swapped", "mouth_amplitude", "lip_corr", "lip_corr_swapped", "lip_amplitude", "lip_silence",
               "lip_silence_gap", "lse_c", "lse_d", "lse_c_swapped", "lse_c_gap", "lse_c_gap_rel", "identity",
               "lse_c_syncnet", "lse_d_syncnet", "lse_c_syncnet_swapped", "csim", "fid", "fvd", "ms_per_frame",
               "rtf")  # fmt: skip
DEN_COLUMNS = ("noise_level", "run", "steps", "status", "psnr", "ssim", "ms_ssim", "lpips", "psnr_mouth", "ssim_mouth",
               "psnr_upper_face", "ms_per_frame")  # fmt: skip
FIELD_COLUMNS = ("metric", "status", "path", "sha256", "reason")
TARGET_COLUMNS = ("run", "upper_face_minus_retake_db", "upper_face_met", "lse_c_gap_rel", "lse_c_gap_target",
                  "lse_c_gap_met")  # fmt: skip
# eval_face_targets: the real-face targets, per run (and per talk); (name, row key -> value, at least | at most)
FACE_TARGETS = (
    ("lip_corr", "at_least"),
    ("lip_corr_swapped", "at_most"),
    ("mouth_over_still_db", "at_least"),
    ("identity_of_vae", "at_least"),
    ("flicker_of_truth", "at_most"),
    ("silence_gap", "at_most"),
)
FACE_TARGET_COLUMNS = ("talk", "run", *(c for name, _ in FACE_TARGETS for c in (name, f"{name}_met")), "met")
# eval=long's blocks
LONG_COLUMNS = ("t0_s", "t1_s", "identity", "identity_min", "red", "green", "blue", "contrast", "colour_shift",
                "seam_ratio", "rss_mb")  # fmt: skip


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that shape the numbers (torch with its build tag)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def _num(x: Any) -> Any:
    """A table cell: numbers and ``"inf"`` as they are, unavailable entries as ``n/a``."""
    if isinstance(x, dict):
        return x.get("lpips", "n/a") if x.get("status") == "ok" else "n/a"
    return x


def gen_row(name: str, r: dict) -> dict[str, Any]:
    """One generation table row from a run's report entry."""
    row = {"run": name, "steps": r.get("steps"), "sampler": r.get("sampler"), "status": r.get("status")}
    if r.get("status") != "ok":
        return row
    f, ls = r["fidelity"], r["lip_sync"]
    row |= {
        f"{k}{'' if region == 'full' else '_' + region}": f[region][k]
        for region in ("full", "mouth", "upper_face")
        for k in ("psnr", "ssim")
    }
    swapped = r.get("fidelity_swapped", {}).get("mouth", {}).get("psnr")  # absent: no swap control, older reports
    if is_finite(swapped) and is_finite(row["psnr_mouth"]):
        row |= {"psnr_mouth_swapped": swapped, "psnr_mouth_gap": row["psnr_mouth"] - swapped}
    latency = r.get("latency", {})  # baselines generate nothing: no latency
    row |= {
        "flicker": r["flicker"]["flicker_pred"],
        "flicker_gap": r["flicker"]["flicker_gap"],
        "seam_ratio": r["seam"].get("ratio"),
        "seam_ratio_gt": r["seam"].get("ratio_gt"),
        "identity": r["identity"].get("mean"),
        "ms_per_frame": latency.get("ms_per_frame", {}).get("total"),
        "rtf": latency.get("real_time_factor"),
    }
    motion = r.get("mouth_motion", {})  # absent from reports written before it existed
    row |= {
        "mouth_corr": motion.get("own", {}).get("corr"),
        "mouth_corr_swapped": motion.get("swapped", {}).get("corr"),
        "mouth_amplitude": motion.get("own", {}).get("amplitude"),
    }
    lips = r.get("lip_landmarks", {})
    row |= {
        "lip_corr": lips.get("own", {}).get("corr"),
        "lip_corr_swapped": lips.get("swapped", {}).get("corr"),
        "lip_amplitude": lips.get("own", {}).get("amplitude"),
        "lip_silence": lips.get("silence", {}).get("ratio"),
        "lip_silence_gap": lips.get("silence", {}).get("gap"),
    }
    if "own" in ls:
        row |= {
            "lse_c": ls["own"]["lse_c"],
            "lse_d": ls["own"]["lse_d"],
            "lse_c_swapped": ls["swapped"].get("lse_c"),
            "lse_c_gap": ls.get("gap_lse_c"),
        }
    field = r.get("field", {})  # the field's metrics (absent from per-talk entries and older reports)
    sync = field.get("syncnet_python", {})
    row |= {
        "lse_c_syncnet": sync.get("own", {}).get("lse_c"),
        "lse_d_syncnet": sync.get("own", {}).get("lse_d"),
        "lse_c_syncnet_swapped": sync.get("swapped", {}).get("lse_c"),
        "csim": field.get("csim", {}).get("mean"),
        "fid": field.get("fid", {}).get("fid"),
        "fvd": field.get("fvd", {}).get("fvd"),
    }
    return row


def per_talk_rows(report: dict) -> list[dict]:
    """One generation row per run (and baseline) and talk, for reports scored with ``per_talk``."""
    g = report.get("generation", {})
    runs_ = {**g.get("results", {}), **g.get("baselines", {})}
    return [
        {"talk": talk} | gen_row(name, r | scores)
        for name, r in runs_.items()
        for talk, scores in r.get("per_talk", {}).items()
    ]


def relative_gap(gap: Any, truth_gap: Any) -> float | None:
    """A run's LSE-C audio-swap gap as a fraction of the ground truth's (1 = as audio-dependent as real video)."""
    return gap / truth_gap if is_finite(gap) and is_finite(truth_gap) and truth_gap > 0 else None


def teacher_targets(generation: dict, gap_target: float = 0.8) -> dict[str, dict[str, Any]]:
    """The teacher's targets as the project measures them, per run: upper-face PSNR against the ``synthetic_retake``
    baseline (the same utterance with other head motion: what a perfect generator that makes its own motion scores;
    an absolute 25 dB is beyond the corpus's random motion) and the LSE-C audio-swap gap over the truth's (any
    expert's units; target ``gap_target``). An entry is None where its baseline or lip-sync expert is missing."""
    retake = generation.get("baselines", {}).get("synthetic_retake", {})
    retake_upper = retake["fidelity"]["upper_face"]["psnr"] if retake.get("status") == "ok" else None
    truth_gap = generation.get("ground_truth", {}).get("lip_sync", {}).get("gap_lse_c")
    out = {}
    for name, r in generation.get("results", {}).items():
        if r.get("status") != "ok":
            continue
        row = gen_row(name, r)
        upper = row["psnr_upper_face"] - retake_upper if is_finite(retake_upper) else None
        rel = relative_gap(row.get("lse_c_gap"), truth_gap)
        out[name] = {
            "upper_face_minus_retake_db": upper,
            "upper_face_met": None if upper is None else bool(upper >= 0),
            "lse_c_gap_rel": rel,
            "lse_c_gap_target": gap_target,
            "lse_c_gap_met": None if rel is None else bool(rel >= gap_target),
        }
    return out


def face_targets(report: dict, limits: dict[str, float]) -> list[dict[str, Any]]:
    """The real-face targets, per run and, for reports scored ``per_talk``, per talk too (``talk`` "all": every
    clip): landmark lip correlation with the own audio's truth and with another utterance's audio, mouth PSNR over
    the ``reference_still`` baseline's (dB), identity over the ``vae_reconstruction`` baseline's, flicker over the
    truth's, and the mouth's opening in silence minus the truth's. Each value is checked against ``limits[name]``
    (``FACE_TARGETS`` says whether at least or at most); a value or limit that is missing is None, and ``met``
    counts the targets met of those measured. Empty when no run has landmark lip scores (drawn faces)."""
    gen, talk_rows = table_rows(report)[0], per_talk_rows(report)
    runs = set(report.get("generation", {}).get("results", {}))  # not the baselines
    talks = dict.fromkeys(r["talk"] for r in talk_rows)
    groups = [("all", gen)] + [(t, [r for r in talk_rows if r["talk"] == t]) for t in talks]
    out = []
    for talk, rows in groups:
        by_run = {r["run"]: r for r in rows}
        still, vae = by_run.get("reference_still", {}), by_run.get("vae_reconstruction", {})
        for row in rows:
            if row["run"] not in runs or row.get("status") != "ok" or not is_finite(row.get("lip_corr")):
                continue
            truth_flicker = _sub(row.get("flicker"), row.get("flicker_gap"))
            values = {
                "lip_corr": row.get("lip_corr"),
                "lip_corr_swapped": row.get("lip_corr_swapped"),
                "mouth_over_still_db": _sub(row.get("psnr_mouth"), still.get("psnr_mouth")),
                "identity_of_vae": _ratio(row.get("identity"), vae.get("identity")),
                "flicker_of_truth": _ratio(row.get("flicker"), truth_flicker),
                "silence_gap": row.get("lip_silence_gap"),
            }
            entry: dict[str, Any] = {"talk": talk, "run": row["run"]}
            for name, sense in FACE_TARGETS:
                v, limit = values[name], limits.get(name)
                ok = None
                if is_finite(v) and limit is not None:
                    ok = bool(v >= limit) if sense == "at_least" else bool(v <= limit)
                entry |= {name: v if is_finite(v) else None, f"{name}_met": ok}
            checked = [entry[f"{n}_met"] for n, _ in FACE_TARGETS if entry[f"{n}_met"] is not None]
            entry["met"] = f"{sum(checked)}/{len(checked)}"
            out.append(entry)
    return out if any(e["talk"] == "all" for e in out) else []


def _sub(a: Any, b: Any) -> float | None:
    return a - b if is_finite(a) and is_finite(b) else None


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if is_finite(a) and is_finite(b) and b > 0 else None


def table_rows(report: dict) -> tuple[list[dict], list[dict]]:
    """(generation rows, denoising rows) flattened from the report."""
    gen, den = [], []
    g, d = report.get("generation", {}), report.get("denoise", {})
    if "results" in g:
        gen = [gen_row(name, r) for name, r in {**g["results"], **g.get("baselines", {})}.items()]
        gt = g["ground_truth"]["lip_sync"]
        for row in gen:
            row["lse_c_gap_rel"] = relative_gap(row.get("lse_c_gap"), gt.get("gap_lse_c"))
        field_gt = g["ground_truth"].get("field_lip_sync", {})
        if "lse_c" in gt or "lse_c" in field_gt:
            gen.append(
                {
                    "run": "ground_truth",
                    "status": "ok",
                    "lse_c": gt.get("lse_c"),
                    "lse_d": gt.get("lse_d"),
                    "lse_c_swapped": gt.get("swapped", {}).get("lse_c"),
                    "lse_c_gap": gt.get("gap_lse_c"),
                    "lse_c_gap_rel": relative_gap(gt.get("gap_lse_c"), gt.get("gap_lse_c")),
                    "lse_c_syncnet": field_gt.get("lse_c"),
                    "lse_d_syncnet": field_gt.get("lse_d"),
                    "lse_c_syncnet_swapped": field_gt.get("swapped", {}).get("lse_c"),
                }
            )
    if "levels" in d:
        items = [("-", "vae_vs_gt", d["vae_vs_gt"])]
        items += [(t, name, r) for t, level in d["levels"].items() for name, r in level.items()]
        for t, name, r in items:
            row = {"noise_level": t, "run": name, "steps": r.get("steps"), "status": r.get("status", "ok")}
            if "full" in r:
                row |= {k: _num(r["full"][k]) for k in ("psnr", "ssim", "ms_ssim")} | {"lpips": _num(r["lpips"])}
                row |= {
                    "psnr_mouth": r["mouth"]["psnr"],
                    "ssim_mouth": r["mouth"]["ssim"],
                    "psnr_upper_face": r["upper_face"]["psnr"],
                    "ms_per_frame": r.get("ms_per_frame"),
                }
            den.append(row)
    return gen, den


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(_num(x))


def row_text(row: dict) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in row.items() if k not in ("run", "status") and v is not None)


def markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    return markdown_table(rows, columns, _cell)


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
    return buf.getvalue()


def is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and np.isfinite(x)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def plot_metric_vs_steps(report: dict, path: Path) -> None:
    """Denoising PSNR vs steps (per model and noise level, noisy input dashed) | generation PSNR vs steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4))
    ax_d, ax_g = fig.subplots(1, 2)
    steps: dict[Any, set] = {ax_d: set(), ax_g: set()}
    for t, level in report.get("denoise", {}).get("levels", {}).items():
        series: dict[str, list] = {}
        for name, r in level.items():
            if name != "noisy" and r.get("status") == "ok" and is_finite(r["full"]["psnr"]):
                series.setdefault(r["model"], []).append((r["steps"], r["full"]["psnr"]))
        for model, pts in series.items():
            ax_d.plot(*zip(*sorted(pts)), marker="o", label=f"{model}, t={t}")
            steps[ax_d] |= {p[0] for p in pts}
        if is_finite(level["noisy"]["full"]["psnr"]):
            ax_d.axhline(level["noisy"]["full"]["psnr"], ls="--", lw=0.8, color="grey")
    series = {}
    for r in report.get("generation", {}).get("results", {}).values():
        if r.get("status") == "ok" and is_finite(r["fidelity"]["full"]["psnr"]):
            f = r["fidelity"]
            series.setdefault(r["model"], []).append((r["steps"], f["full"]["psnr"], f["mouth"]["psnr"]))
            steps[ax_g].add(r["steps"])
    for model, pts in series.items():
        x, full, mouth = zip(*sorted(pts))
        ax_g.plot(x, full, marker="o", label=f"{model} (full)")
        ax_g.plot(x, mouth, marker="s", ls=":", label=f"{model} (mouth)")
    for ax, title in (
        (ax_d, "denoising vs VAE reconstruction (dashed: noisy input)"),
        (ax_g, "generation vs ground truth"),
    ):
        ax.set(xscale="log", xlabel="sampler steps", ylabel="PSNR (dB)", title=title)
        if steps[ax]:
            ax.set_xticks(sorted(steps[ax]), [f"{x:g}" for x in sorted(steps[ax])])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", transform=ax.transAxes)
    _save(fig, path)


def plot_quality_latency(report: dict, path: Path) -> None:
    """Generation PSNR vs end-to-end ms per frame, one line per model, labelled with steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    series: dict[str, list] = {}
    for r in report.get("generation", {}).get("results", {}).values():
        if r.get("status") == "ok" and is_finite(r["fidelity"]["full"]["psnr"]):
            series.setdefault(r["model"], []).append(
                (r["latency"]["ms_per_frame"]["total"], r["fidelity"]["full"]["psnr"], r["steps"])
            )
    for model, pts in series.items():
        ms, psnr, steps = zip(*sorted(pts))
        ax.plot(ms, psnr, marker="o", label=model)
        for x, y, s in pts:
            ax.annotate(f"{s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(
        xscale="log",
        xlabel="ms per frame (end to end)",
        ylabel="PSNR vs ground truth (dB)",
        title=f"quality-latency ({report.get('device', {}).get('device_name', '')})",
    )
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(LogFormatter(labelOnlyBase=False))
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no generation results", ha="center", transform=ax.transAxes)
    _save(fig, path)


def plot_long_drift(report: dict, path: Path) -> None:
    """eval=long's blocks against time: identity cosine, mean colour, seam ratio and memory."""
    from matplotlib.figure import Figure

    long = report["long"]
    rows = long["blocks"]
    t = [(r["t0_s"] + r["t1_s"]) / 2 for r in rows]
    fig = Figure(figsize=(9, 6))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    if "identity" in rows[0]:
        axes[0].plot(t, [r["identity"] for r in rows], marker="o", label="mean")
        axes[0].plot(t, [r["identity_min"] for r in rows], marker=".", ls="--", label="min")
        axes[0].legend()
    else:
        axes[0].text(0.5, 0.5, long["identity"].get("reason", "no identity"), ha="center", transform=axes[0].transAxes)
    axes[0].set(ylabel="identity cosine to the reference")
    for key in ("red", "green", "blue"):
        axes[1].plot(t, [r[key] for r in rows], color=key, marker=".")
    axes[1].set(ylabel="mean colour (0-255)")
    axes[2].plot(t, [r["seam_ratio"] if is_finite(r["seam_ratio"]) else np.nan for r in rows], marker="o")
    axes[2].axhline(1, color="grey", lw=0.5)
    axes[2].set(ylabel="seam ratio (border / inside)", xlabel="time (s)")
    axes[3].plot(t, [r["rss_mb"] for r in rows], marker="o")
    axes[3].set(ylabel="resident memory (MiB)", xlabel="time (s)")
    fig.suptitle(f"{long['run']}: {long['seconds']:.0f} s, {long['num_frames']} frames, {long['block_s']:g} s blocks")
    _save(fig, path)


def write_outputs(report: dict, out_json: str | Path, tables_dir: str | Path, plots_dir: str | Path) -> dict[str, Path]:
    """The report JSON, the ``eval_<table>.{md,csv}`` tables (generation, denoise; per talk, field, targets, face
    targets, long when the report has them) and the plots, each written atomically."""
    tables_dir, plots_dir = Path(tables_dir), Path(plots_dir)
    write_json(out_json, report)
    paths = {"report": Path(out_json)}

    def table(name: str, rows: list[dict], columns: tuple[str, ...]) -> None:
        for ext, fn in (("md", markdown), ("csv", csv_text)):
            paths[f"{name}_{ext}"] = tables_dir / f"eval_{name}.{ext}"
            write_text(paths[f"{name}_{ext}"], fn(rows, columns))

    for kind, rows, cols in zip(("generation", "denoise"), table_rows(report), (GEN_COLUMNS, DEN_COLUMNS)):
        table(kind, rows, cols)
    if talk_rows := per_talk_rows(report):
        table("generation_per_talk", talk_rows, ("talk", *GEN_COLUMNS))
    if files := report.get("generation", {}).get("field"):  # which of the field's weights were there
        table("field", [{"metric": name, **f} for name, f in files.items()], FIELD_COLUMNS)
    if targets := report.get("generation", {}).get("targets"):
        table("targets", [{"run": name, **t} for name, t in targets.items()], TARGET_COLUMNS)
    if face := report.get("generation", {}).get("face_targets"):
        table("face_targets", face, FACE_TARGET_COLUMNS)
    plots = [("metric_vs_steps", plot_metric_vs_steps), ("quality_latency", plot_quality_latency)]
    if report.get("long", {}).get("status") == "ok":
        table("long", report["long"]["blocks"], LONG_COLUMNS)
        plots.append(("long_drift", plot_long_drift))
    for name, plot in plots:
        paths[name] = plots_dir / f"{name}.png"
        plot(report, paths[name])
    return paths
