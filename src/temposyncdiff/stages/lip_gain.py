"""A lip-conditioned net's lip shapes: their standardisation (``set_lip_norm``, from the training cache) and how far
the predicted shapes swing at inference (``Denoiser.lip_gain``), set on val clips at export.

Two steps, both at export: ``calibrate_lip_gain`` matches the head's predicted shapes to the true shapes' spread
(per shape, std over std), and ``calibrate_rendered_gain`` then scales that gain until the *rendered* videos' lips
(read back with dlib's landmarks) open and close as widely as the truth's. The second step exists because the net
draws a given lip shape smaller than it is asked to (at gain 1 the rendered opening swings about 0.75x the truth's
on real footage), so a gain right for the shapes is too small for the pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from temposyncdiff.data.batch import Batch
from temposyncdiff.metrics.identity import as_uint8_frames
from temposyncdiff.metrics.mouth import LipLandmarks, follow_scores
from temposyncdiff.nets.denoiser import Denoiser, relative_lips
from temposyncdiff.stages.base import embed_batch_audio
from temposyncdiff.stages.latent import cache_reader


def set_lip_norm(net: Denoiser, datamodule: Any) -> None:
    """Standardise a lip-conditioned net's shapes by the training cache's mean and std (kept when already set); a
    ``lip_relative`` net's shapes are first each frame's relative to its talk's (``Denoiser.standardize_lips``)."""
    if not torch.equal(net.lip_norm, torch.stack([torch.zeros(net.lip_dim), torch.ones(net.lip_dim)]).to(net.lip_norm)):
        return
    reader = cache_reader(datamodule, "train")
    lips = None if reader is None else reader.lips
    if lips is not None and net.lip_relative != "none":
        stats = reader.talk_lip_stats()
        person = np.repeat(np.stack([stats[t] for t in reader.talk_ids]), np.asarray(reader.num_frames), axis=0)
        lips = relative_lips(np.asarray(lips), person[:, 0], person[:, 1], net.lip_relative)
    if lips is None:
        rank_zero_warn(
            "model.net.lip_dim is set but the training data holds no lip shapes (build the cache with "
            "tsd-data cache lips=true): the lip head learns from the diffusion loss alone"
        )
        return
    lips = torch.from_numpy(np.array(lips, dtype=np.float32))  # a copy: the cache is a read-only memmap
    net.lip_norm.copy_(torch.stack([lips.mean(0), lips.std(0).clamp_min(1e-4)]))
    rank_zero_info(
        f"teacher: lip shapes (relative to each talk's: {net.lip_relative}) standardised by "
        f"mean {lips.mean(0).tolist()} std {lips.std(0).tolist()}"
    )


@torch.no_grad()
def calibrate_lip_gain(net: Denoiser, datamodule: Any, device: torch.device, name: str) -> None:
    """Set ``net.lip_gain`` so the head's predictions on the val clips vary as much as their true shapes do."""
    loader: Iterable[Batch] = datamodule.val_dataloader() if datamodule is not None else ()
    truth, guess, was_training = [], [], net.training
    net.eval()
    for batch in loader:
        if batch.lips is None:
            break
        batch = batch.to(device)
        emb, _ = embed_batch_audio(net, batch)
        truth.append(net.standardize_lips(batch.lips, batch.lip_person)[batch.mask])
        guess.append(net.predict_lips(emb, batch.visemes)[batch.mask])
    net.train(was_training)
    if not truth or sum(len(t) for t in truth) < 2:
        net.lip_gain.fill_(1.0)
        rank_zero_info(f"{name}: no held-out lip shapes; lip_gain stays 1")
        return
    truth, guess = torch.cat(truth), torch.cat(guess)
    net.lip_gain.copy_((truth.std(0) / guess.std(0).clamp_min(1e-6)).clamp(0.5, 4.0))
    rank_zero_info(
        f"{name}: lip_gain {[round(g, 3) for g in net.lip_gain.tolist()]} "
        f"(held-out truth std over the head's, {len(truth)} frames)"
    )


@torch.no_grad()
def calibrate_rendered_gain(
    net: Denoiser,
    render: Callable[[dict[str, Any]], Tensor],
    utterances: Sequence[dict[str, Any]],
    multipliers: Sequence[float],
    landmarks: LipLandmarks,
    target: float = 1.0,
    name: str = "student",
) -> dict[str, Any]:
    """Scale ``net.lip_gain`` by the multiplier whose rendered lip opening swings closest to ``target`` x the truth's.

    ``render(utt)`` -> the utterance generated with the net's current gain, frames ``[N,3,H,W]`` in [0, 1];
    ``utterances`` as ``held_out_utterances`` gives them (frames in [-1, 1]). Per multiplier, the mean over
    utterances of the landmark opening's amplitude ratio (std over the truth's) and correlation with the truth
    (``follow_scores``). Returns those rows, the chosen multiplier (1 when no utterance could be scored) and why.
    """
    base, tracks = net.lip_gain.clone(), []
    for utt in utterances:
        truth = as_uint8_frames((utt["frames"] + 1) / 2)
        track, opening = landmarks.truth(truth)
        tracks.append((track, opening))
    rows = []
    for m in multipliers:
        net.lip_gain.copy_(base * m)
        scores = []
        for utt, (track, opening) in zip(utterances, tracks):
            pred = landmarks.openings(as_uint8_frames(render(utt)), track.boxes)
            s = follow_scores(pred, opening, np.zeros(len(opening), bool))
            if s["status"] == "ok":
                scores.append(s)
        row = {"multiplier": float(m), "clips": len(scores)}
        if scores:
            row |= {k: float(np.mean([s[k] for s in scores])) for k in ("corr", "amplitude")}
        rows.append(row)
    scored = [r for r in rows if r["clips"]]
    if not scored:
        net.lip_gain.copy_(base)
        why = f"no val utterance could be scored (dlib found no lips moving in {len(utterances)})"
        rank_zero_info(f"{name}: rendered lip gain not calibrated: {why}")
        return {"multiplier": 1.0, "rows": rows, "reason": why}
    best = min(scored, key=lambda r: abs(r["amplitude"] - target))
    net.lip_gain.copy_(base * best["multiplier"])
    table = "; ".join(f"x{r['multiplier']:g}: amplitude {r['amplitude']:.2f} corr {r['corr']:.2f}" for r in scored)
    rank_zero_info(
        f"{name}: rendered lip gain x{best['multiplier']:g} -> lip_gain "
        f"{[round(g, 3) for g in net.lip_gain.tolist()]} ({len(utterances)} val utterances; {table})"
    )
    return {
        "multiplier": best["multiplier"],
        "rows": rows,
        "reason": f"rendered amplitude nearest {target:g}x the truth's",
    }
