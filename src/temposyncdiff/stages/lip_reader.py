"""Fit a net's lip reader (``Denoiser.lip_reader``) to the training cache's latents and lip shapes, then freeze it.

The reader is a critic: the stages' ``lip_read_weight`` term reads the lip shapes back from the net's x0 estimates
and compares them with the shapes the net was asked to draw. It must read the true latents well before that term
means anything, so it is fitted frame by frame before training (seconds on a CPU) rather than learnt beside the
net, and frozen so that the term trains only what drew the latents. Its held-out correlation is logged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from temposyncdiff.errors import UserError
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.stages.latent import cache_reader


def held_out_corr(net: Denoiser, cache: Any, device: torch.device) -> float | None:
    """Mean over the cache's utterances of the correlation between the read and the true inner-lip opening."""
    if cache is None or cache.latents is None or cache.lips is None:
        return None
    corrs, offset = [], 0
    for n in np.asarray(cache.num_frames):
        latents = torch.from_numpy(np.array(cache.latents[offset : offset + n], dtype=np.float32)).to(device)
        truth = np.asarray(cache.lips[offset : offset + n])[:, 0]
        offset += n
        with torch.no_grad():
            read = net.lip_reader(latents)[:, 0].cpu().numpy()
        if n > 2 and read.std() > 0 and truth.std() > 0:
            corrs.append(float(np.corrcoef(read, truth)[0, 1]))
    return float(np.mean(corrs)) if corrs else None


def fit_lip_reader(
    net: Denoiser,
    datamodule: Any,
    device: torch.device,
    name: str,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> None:
    """Fit ``net.lip_reader`` to the train cache's latents (and their mirrored ones) and lip shapes, by MSE over its
    ``norm`` (their mean and std), then freeze it. A reader already fitted (its ``norm`` set: a resumed or
    initialised net) is only frozen."""
    reader = net.lip_reader
    unset = torch.stack([torch.zeros(net.lip_dim), torch.ones(net.lip_dim)]).to(reader.norm)
    if not torch.equal(reader.norm, unset):
        reader.requires_grad_(False)
        return
    cache = cache_reader(datamodule, "train")
    if cache is None or cache.latents is None or cache.lips is None:
        raise UserError(
            "model.lip_read_weight needs the training data's cached latents and lip shapes to fit the lip reader "
            "(tsd-data cache lips=true, then tsd-data cache vae=...)"
        )
    latents = [cache.latents] + ([cache.latents_mirror] if cache.latents_mirror is not None else [])
    lips = torch.from_numpy(np.array(cache.lips, dtype=np.float32))
    reader.norm.copy_(torch.stack([lips.mean(0), lips.std(0).clamp_min(1e-4)]))
    gen = np.random.default_rng(seed)
    opt = torch.optim.Adam(reader.parameters(), lr=lr)
    for _ in range(steps):
        idx = np.sort(gen.choice(len(lips), size=min(batch_size, len(lips)), replace=False))
        source = latents[gen.integers(len(latents))]  # a mirrored face has the same lip gaps and width
        x = torch.from_numpy(np.array(source[idx], dtype=np.float32)).to(device)
        loss = ((reader(x) - lips[idx].to(device)) / reader.norm[1]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    reader.requires_grad_(False)
    corr = held_out_corr(net, cache_reader(datamodule, "val"), device)
    rank_zero_info(
        f"{name}: lip reader fitted on {len(lips)} frames ({steps} steps, loss {loss.item():.3f}); held-out "
        f"inner-lip correlation per utterance: {'n/a (no val latents)' if corr is None else f'{corr:.2f}'}"
    )
