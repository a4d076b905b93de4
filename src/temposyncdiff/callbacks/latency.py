"""Latency of the stage's own net at the end of training (rank zero, on the training device, before Lightning's
teardown moves the net to the CPU): logged as ``latency/*`` to every logger and written to the run dir.

Generation stages (teacher, student: a ``Denoiser`` net with an audio encoder, the frozen VAE as
``frozen("vae")`` and the sampler settings of ``export_meta()``) get the generation path per component and end
to end per frame (``bench.generation.GenerationPath``) at ``steps`` (null = the stage's exported steps).
Every other stage gets one call of its net on the inputs of its first training batch, or, when the stage calls
only the net's sub-nets (e.g. the lip-sync expert's towers), one call of each of those.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from temposyncdiff.bench.generation import COMPONENTS, GenerationPath, Setting, bench_generation
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.utils.io import write_json
from temposyncdiff.utils.timing import autocast, count_flops, machine_info, num_threads, param_count, time_call


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, list | tuple):
        return type(x)(_detached(v) for v in x)
    return {k: _detached(v) for k, v in x.items()} if isinstance(x, dict) else x


class LatencyBenchmark(pl.Callback):
    def __init__(
        self,
        steps: list[int] | None = None,
        dtype: str = "fp32",
        threads: int | None = None,
        warmup: int = 1,
        repeats: int = 5,
        budget_s: float | None = 30.0,
        filename: str = "latency.json",
        prefix: str = "latency",
    ) -> None:
        self.steps, self.dtype, self.threads = steps, dtype, threads
        self.warmup, self.repeats, self.budget_s = warmup, repeats, budget_s
        self.filename, self.prefix = filename, prefix
        self._examples: dict[str, tuple[nn.Module, tuple, dict]] = {}
        self._hooks: list = []

    # ---- capture the first training batch's calls -------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            net = pl_module.net
            self._hooks = [
                m.register_forward_pre_hook(functools.partial(self._capture, name), with_kwargs=True)
                for name, m in (("net", net), *net.named_children())
            ]

    def _capture(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._examples.setdefault(name, (module, _detached(args), _detached(kwargs)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---- benchmark --------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        net, device = pl_module.net, pl_module.device
        was_training = net.training
        try:
            rows = self._generation(pl_module) if self._is_generation(pl_module) else self._calls(device)
        finally:
            net.train(was_training)
        metrics = {self._key(r): r["ms_per_frame"] if r["component"] in COMPONENTS else r["median_ms"] for r in rows}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        path = Path(trainer.default_root_dir) / self.filename
        write_json(path, {"machine": machine_info(device), "stage": type(pl_module).__name__, "rows": rows})
        rank_zero_info("latency: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()) + f" -> {path}")

    def _key(self, row: dict) -> str:
        if row["component"] not in COMPONENTS:
            return f"{self.prefix}/{row['component']}_ms"
        steps = f"@{row['steps']}" if row["steps"] else ""
        return f"{self.prefix}/{row['component']}{steps}_ms_per_frame"

    def _is_generation(self, pl_module: pl.LightningModule) -> bool:
        frozen = getattr(pl_module, "frozen", None)
        return (
            isinstance(pl_module.net, Denoiser)
            and pl_module.net.audio is not None
            and callable(frozen)
            and frozen("vae") is not None
            and "net" in self._examples
        )

    def _generation(self, pl_module: pl.LightningModule) -> list[dict]:
        meta = pl_module.export_meta()
        latent_size = self._examples["net"][1][0].shape[-1]  # the denoiser's x_t [B, T, C, h, w] in training
        path = GenerationPath(
            pl_module.net,
            pl_module.frozen("vae"),
            meta["schedule"],
            meta.get("sampler", "ddim"),
            meta.get("sampler_kwargs"),
            meta.get("guidance_scale", 1.0),
            meta.get("overlap", 2),
            latent_size,
        )
        plan = {Setting("eager", self.dtype, self.threads, 1): list(COMPONENTS)}
        rows, _ = bench_generation(
            type(pl_module).__name__,
            path,
            list(self.steps or [meta["steps"]]),
            plan,
            pl_module.device,
            self.warmup,
            self.repeats,
            self.budget_s,
            log=rank_zero_info,
        )
        return rows

    def _calls(self, device: torch.device) -> list[dict]:
        """One call of the net (or of each sub-net the stage called) on its first training batch's inputs."""
        calls = {"net": self._examples["net"]} if "net" in self._examples else self._examples
        rows = []
        for name, (module, args, kwargs) in calls.items():
            module.eval()
            call = functools.partial(module, *args, **kwargs)
            with num_threads(self.threads), torch.inference_mode(), autocast(device, self.dtype):
                threads = torch.get_num_threads()
                stats = time_call(call, device, self.warmup, self.repeats, self.budget_s)
                flops = count_flops(call)
            batch = next((len(a) for a in args if isinstance(a, torch.Tensor)), None)
            rows.append(
                {
                    "component": name,
                    "batch": batch,
                    "dtype": self.dtype,
                    "threads": threads,
                    **stats,
                    "flops": flops,
                    "gflops": flops / stats["median_ms"] / 1e6,
                    "params": param_count(module),
                }
            )
        return rows
