"""tsd-pipeline experiment=<name>: run a recipe's steps (each a tsd-* command), skipping current ones."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from temposyncdiff.cli.common import hydra_main
from temposyncdiff.errors import UserError
from temposyncdiff.utils.io import safe_name, write_json
from temposyncdiff.utils.task import log, task


def fingerprint(step: DictConfig) -> str:
    """Hash of the step's command and the size/mtime of its inputs: a change in either reruns it."""
    h = hashlib.sha256(json.dumps(list(step.cmd)).encode())
    for name in step.get("inputs", []):
        path = Path(name)
        stats = (
            [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()]
            if path.is_dir()
            else ([(name, path.stat().st_size, path.stat().st_mtime_ns)] if path.exists() else [(name, None)])
        )
        h.update(json.dumps(stats).encode())
    return h.hexdigest()


def is_current(step: DictConfig, stamp: Path) -> bool:
    return (
        stamp.is_file()
        and all(Path(o).exists() for o in step.outputs)
        and json.loads(stamp.read_text())["fingerprint"] == fingerprint(step)
    )


def run_step(step: DictConfig, root: Path, heartbeat_s: float = 60.0) -> float:
    """Run one step's command with this environment's console scripts (a line every ``heartbeat_s``); raise with its log on failure."""
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / step.cmd[0]), *map(str, step.cmd[1:]), f"paths.root_dir={root}", "extras.print_config=false"]
    log_path = Path(root) / "logs" / "pipeline" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while True:
            try:
                code = proc.wait(timeout=heartbeat_s)
                break
            except subprocess.TimeoutExpired:
                log.info("[%s] still running (%.0f s; log: %s)", step.name, time.perf_counter() - start, log_path)
    if code != 0:  # its last lines on stdout, its error line (if any) in ours: one line on stderr
        lines = log_path.read_text(errors="replace").splitlines()
        log.info("[%s] last lines of its log:\n%s", step.name, "\n".join(lines[-15:]))
        said = next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")), None)
        raise UserError(f"step '{step.name}' failed (exit {code}{f': {said}' if said else ''}); full log: {log_path}")
    return time.perf_counter() - start


@task
def pipeline(cfg: DictConfig) -> dict:
    """Run the recipe's steps in order and print a summary of what was done and where the results are."""
    if cfg.get("name") is not None:  # a recipe's namespace (own_video): it becomes folder and file names
        safe_name(cfg.name, "name")
    names = [s.name for s in cfg.steps]
    for name in list(cfg.only or []) + list(cfg.force):
        if name not in names:
            raise UserError(f"unknown step {name!r}; this recipe has: {', '.join(names)}")
    root, stamps = Path(cfg.paths.root_dir), Path(cfg.stamp_dir)
    summary, total = [], time.perf_counter()
    for step in cfg.steps:
        if cfg.only and step.name not in cfg.only:
            continue
        stamp = stamps / f"{step.name}.json"
        if step.name not in cfg.force and is_current(step, stamp):
            log.info("[%s] current, skipped -> %s", step.name, ", ".join(step.outputs))
            summary.append({"step": step.name, "status": "skipped (current)", "outputs": list(step.outputs)})
            continue
        log.info("[%s] running: %s", step.name, " ".join(map(str, step.cmd)))
        seconds = run_step(step, root)
        write_json(
            stamp, {"fingerprint": fingerprint(step), "seconds": round(seconds, 1), "cmd": list(map(str, step.cmd))}
        )
        log.info("[%s] done in %.1f s -> %s", step.name, seconds, ", ".join(step.outputs))
        summary.append({"step": step.name, "status": f"ran in {seconds:.1f} s", "outputs": list(step.outputs)})
    elapsed = time.perf_counter() - total
    lines = [f"pipeline '{cfg.experiment}' finished in {elapsed:.1f} s:"] + [
        f"  {s['step']:<9} {s['status']:<20} {', '.join(s['outputs'])}" for s in summary
    ]
    results = {k: str(v) for k, v in cfg.get("results", {}).items() if Path(v).exists()}
    numbers = key_numbers(Path(cfg.results.eval_report)) if "eval_report" in results else []
    lines += ["results:"] + [f"  {k:<12} {v}" for k, v in results.items()] + numbers
    log.info("\n".join(lines))
    report = {"experiment": cfg.experiment, "seconds": round(elapsed, 1), "steps": summary, "results": results}
    write_json(stamps / "summary.json", report)
    return report


def key_numbers(eval_report: Path) -> list[str]:
    """One line per generation run of the eval report: mouth and upper-face PSNR, mouth motion and LSE-C (own vs
    swapped audio), speed; then the real-face targets each run (and person) meets, when the report has them."""
    from temposyncdiff.evaluation.report import FACE_TARGETS, per_talk_rows, table_rows

    fields = (
        ("psnr_mouth", "mouth PSNR {:.2f} dB"),
        ("psnr_upper_face", "upper face {:.2f} dB"),
        ("mouth_corr", "mouth motion corr {:.2f}"),
        ("mouth_corr_swapped", "(swapped audio {:.2f})"),
        ("mouth_amplitude", "amplitude {:.2f}"),
        ("lip_corr", "lip opening corr {:.2f}"),
        ("lip_corr_swapped", "(swapped audio {:.2f})"),
        ("lip_amplitude", "amplitude {:.2f}"),
        ("lip_silence", "in silence {:.2f}x the truth's"),
        ("lse_c", "LSE-C {:.2f}"),
        ("lse_c_swapped", "(swapped audio {:.2f})"),
        ("lse_c_gap_rel", "LSE-C gap {:.2f}x the truth's"),
        ("ms_per_frame", "{:.1f} ms/frame"),
    )
    lines = ["key numbers (test split):"]
    report = json.loads(eval_report.read_text())
    rows = [r for r in table_rows(report)[0] if r.get("status") == "ok"]
    timed = [r for r in rows if isinstance(r.get("ms_per_frame"), int | float) and r["ms_per_frame"] > 0]
    teachers = [r for r in timed if r["run"].startswith("teacher")]
    base = max(teachers, key=lambda r: r.get("steps") or 0) if teachers else None  # the full-step teacher
    for r in rows:
        parts = [fmt.format(r[k]) for k, fmt in fields if isinstance(r.get(k), int | float)]
        if base is not None and r is not base and r in timed:
            parts.append(f"({base['ms_per_frame'] / r['ms_per_frame']:.0f}x faster than {base['run']})")
        lines.append(f"  {r['run']:<18} " + "  ".join(parts))
    runs = {r["run"] for r in timed}  # per talk: the generated runs, not the baselines
    talk_rows = [r for r in per_talk_rows(report) if r["run"] in runs]
    if talk_rows:
        lines.append("per talk:")
    for r in talk_rows:
        parts = [fmt.format(r[k]) for k, fmt in fields[:-1] if isinstance(r.get(k), int | float)]
        lines.append(f"  {r['talk'] + ' ' + r['run']:<30} " + "  ".join(parts))
    if face := report.get("generation", {}).get("face_targets"):
        lines.append("real-face targets met (eval_face_targets.md):")
    for t in face or ():
        missed = [f"{k} {t[k]:.3g}" for k, _ in FACE_TARGETS if t.get(f"{k}_met") is False]
        lines.append(
            f"  {t['talk'] + ' ' + t['run']:<30} {t['met']}" + (f"  missed: {', '.join(missed)}" if missed else "")
        )
    return lines


def main() -> None:
    """``experiment=<name>`` picks the recipe conf/pipeline/<name>.yaml."""
    sys.argv = [a.replace("experiment=", "pipeline=", 1) if a.startswith("experiment=") else a for a in sys.argv]
    hydra_main("pipeline", pipeline)


if __name__ == "__main__":
    main()
