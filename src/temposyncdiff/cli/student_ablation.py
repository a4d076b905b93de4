"""Student ablation: variants trained with ``tsd-train`` (shared teacher and couplings), then one evaluation.

``python -m temposyncdiff.cli.student_ablation [--no-train] [hydra overrides ...]`` trains every variant
(with / without the identity, the temporal and the ground-truth term) from ``experiment=quickstart/student`` plus the
overrides, then generates the same held-out utterances from the same noise with the teacher at 10/25/50 steps and
each variant at 1/2/4 steps (``stages.scoring.score_runs``) and times each end to end per frame at batch 1.
Writes ``<outputs>/tables/student_ablation.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import Tensor, nn

from temposyncdiff.cli.common import compose_run
from temposyncdiff.diffusion.distill import student_sampler
from temposyncdiff.diffusion.sampling import make_sampler
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.regions import RegionBoxes
from temposyncdiff.stages.latent import frozen_net, held_out_utterances
from temposyncdiff.stages.scoring import ScoreSettings, decode, generate, score_runs
from temposyncdiff.stages.student import truncate
from temposyncdiff.training import train
from temposyncdiff.utils.io import write_text
from temposyncdiff.utils.tables import markdown_table
from temposyncdiff.utils.task import log
from temposyncdiff.utils.timing import time_call

STUDENT = "experiment=quickstart/student"  # every variant starts from it
VARIANTS = {"full": [], "no_identity": ["model.identity_weight=0"], "no_temporal": ["model.temporal_weight=0"],
            "no_data": ["model.data_weight=0"]}  # fmt: skip
COLUMNS = ("model", "steps", "identity", "temporal", "data", "psnr", "psnr_mouth", "ssim", "psnr_rec", "ssim_rec",
           "psnr_vs_teacher", "psnr_mouth_gap", "lse_c", "lse_c_gap", "lse_c_gt_gap", "flicker", "flicker_gap",
           "ms_per_frame", "speedup")  # fmt: skip


def run_ablation(
    overrides: list[str] = (),
    variants: dict[str, list[str]] | None = None,
    student_steps: tuple[int, ...] = (1, 2, 4),
    teacher_steps: tuple[int, ...] = (50, 25, 10),
    train_variants: bool = True,
) -> list[dict[str, Any]]:
    """Train (unless ``train_variants`` is False: reuse their exports) and evaluate the variants; returns the rows."""
    variants = VARIANTS if variants is None else variants
    base = compose_run("train", [STUDENT, *overrides])
    m = base.model
    shared = [
        f"model.{k}={'null' if m[k] is None else m[k]}"
        for k in ("teacher_weights", "vae_weights", "syncnet_weights", "couplings_dir")
    ]
    exports = {}
    for name, extra in variants.items():
        export_dir = Path(base.paths.checkpoint_dir) / "ablation" / name
        exports[name] = export_dir / "student_best.pt"
        if train_variants:
            run_dir = Path(base.paths.log_dir) / "student_ablation" / name
            cfg = compose_run(
                "train",
                [
                    STUDENT,
                    *overrides,
                    *shared,
                    *extra,
                    f"paths.checkpoint_dir={export_dir}",
                    "task_name=student_ablation",
                    "model.val_utterances=0",
                ],
                run_dir,
            )
            log.info("ablation: training %s (%s)", name, " ".join(extra) or "defaults")
            train(cfg)

    teacher, tmeta = frozen_net(m.teacher_weights, "teacher")
    vae, _ = frozen_net(m.vae_weights, "vae")
    expert = (
        frozen_net(m.syncnet_weights, "syncnet")[0] if m.syncnet_weights and Path(m.syncnet_weights).is_file() else None
    )
    dm = hydra.utils.instantiate(base.data, _convert_="all")
    dm.prepare_data()
    dm.setup("validate")
    utts = [truncate(u, m.val_frames) for u in held_out_utterances(dm.val_dataloader().dataset, m.val_utterances)]
    overlap = tmeta.get("overlap", 2) if m.overlap is None else m.overlap
    tsched = NoiseSchedule(**{k: tmeta["schedule"][k] for k in SCHEDULE_KEYS}).scheduler.config
    runs, info = {}, {}
    for n in sorted(teacher_steps, reverse=True):  # the first run (most teacher steps) is the reference
        runs[f"teacher{n}"] = partial(
            generate,
            teacher,
            make_scheduler=partial(make_sampler, tmeta["sampler"], tsched),
            steps=n,
            guidance_scale=tmeta["guidance_scale"],
            overlap=overlap,
        )
        info[f"teacher{n}"] = {"model": "teacher", "steps": n, "net": teacher}  # no loss weights: blank cells
    for name, path in exports.items():
        net, meta = frozen_net(path, "student")
        vm = compose_run("train", [STUDENT, *overrides, *variants[name]]).model
        weights = {"identity": vm.identity_weight, "temporal": vm.temporal_weight, "data": vm.data_weight}
        for n in student_steps:
            sampler = partial(student_sampler, NoiseSchedule(**meta["schedule"]).scheduler.config)
            runs[f"{name}@{n}"] = partial(
                generate, net, make_scheduler=sampler, steps=n, guidance_scale=1.0, overlap=overlap
            )
            info[f"{name}@{n}"] = {"model": f"student/{name}", "steps": n, **weights, "net": net}
    settings = ScoreSettings(RegionBoxes(**m.regions), teacher.window, overlap, m.eval_seed, m.eval_visemes == "data")
    metrics = score_runs(runs, utts, vae, dm.audio, settings, expert)
    size = dm.hparams.image_size // vae.downsample
    shapes = (vae.latent_channels, size, size), (dm.audio.n_mels, dm.audio.window_frames)
    rows = []
    for key, fn in runs.items():
        r = {k: v for k, v in info[key].items() if k != "net"}
        r.update(metrics[key], psnr_vs_teacher=metrics[key].get("psnr_vs_ref", float("nan")))
        r["ms_per_frame"] = ms_per_frame(fn, info[key]["net"], vae, *shapes)
        rows.append(r)
    ref = rows[0]["ms_per_frame"]
    for r in rows:
        r["speedup"] = ref / r["ms_per_frame"]
    out = Path(base.paths.outputs_dir) / "tables"
    write_text(out / "student_ablation.md", markdown(rows, torch.get_num_threads()))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "student_ablation.csv", buf.getvalue())
    log.info("ablation table -> %s\n%s", out / "student_ablation.md", markdown(rows, torch.get_num_threads()))
    return rows


def ms_per_frame(
    gen: Callable[..., Tensor],
    net: Denoiser,
    vae: nn.Module,
    latent_shape: tuple[int, int, int],
    mel_shape: tuple[int, int],
    frames: int | None = None,
    repeats: int = 3,
) -> float:
    """End-to-end milliseconds per frame at batch 1 (audio encoder, every sampler step, VAE decoder; median).

    ``gen`` is ``generate`` with the sampler settings bound (``partial(generate, net, make_scheduler=...)``).
    """
    dev = next(net.parameters()).device
    n = frames or net.window
    ref, mel = torch.zeros(1, *latent_shape, device=dev), torch.randn(1, n, *mel_shape, device=dev)
    g = torch.Generator(dev)

    def run() -> Tensor:
        return decode(vae, gen(ref, mel, None, g.manual_seed(0)))

    with torch.inference_mode():
        return time_call(run, dev, warmup=1, repeats=repeats)["median_ms"] / n


def markdown(rows: list[dict[str, Any]], threads: int) -> str:
    """The table with a line on how the times were measured."""
    note = (
        f"\nSame held-out utterances, noise and conditions for every row; psnr_vs_teacher: vs the first teacher row. "
        f"ms_per_frame: end to end (audio encoder, all steps, VAE decoder), batch 1, CPU, {threads} threads, fp32; "
        f"speedup vs the first row.\n"
    )
    return markdown_table(rows, COLUMNS, lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-train", action="store_true", help="evaluate the variants' existing exports")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'NAME OVERRIDE ...'",
        help="one more variant: a name and its overrides, e.g. --variant 'gt model.data_weight=1'",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every variant (e.g. trainer.max_steps=1000)")
    args = parser.parse_args()
    extra = {name: rest for name, *rest in (v.split() for v in args.variant)}
    run_ablation(args.overrides, {**VARIANTS, **extra}, train_variants=not args.no_train)


if __name__ == "__main__":
    main()
