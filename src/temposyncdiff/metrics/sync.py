"""Lip-sync metrics LSE-D / LSE-C (as syncnet_python defines them) and the audio-swap control.

For one clip with per-window video embeddings v_t and audio embeddings a_t (window t of both covers
the same frames when in sync), and each offset o in [-vshift, vshift]:

    dist(o) = mean over t of ||v_t - a_{t+o}||     LSE-D = min_o dist(o)
    LSE-C = median_o dist(o) - LSE-D               best offset = argmin_o dist(o)

Audio and video of different lengths are trimmed to the shorter; a clip with fewer than
``vshift + min_overlap`` windows is skipped with a warning and counted. Two protocols (``protocol=``):

- ``"temposyncdiff"`` (default): the mean runs only over t where both v_t and a_{t+o} exist, distances are
  plain Euclidean, and the reported offset is o: o > 0 means the matching audio comes o frames *after*
  the picture (the audio lags). With our own expert (unit-vector embeddings) values are not comparable
  with published SyncNet numbers.
- ``"syncnet_python"``: the arithmetic of syncnet_python's SyncNetInstance (``calc_pdist`` and ``evaluate``):
  the audio embeddings are zero-padded by vshift on both sides, so the mean runs over every t (a missing
  a_{t+o} counts as ||v_t||); distances are ``F.pairwise_distance`` (||v - a + 1e-6||); the reported offset
  is its ``vshift - argmin``, i.e. -o. With its published ``syncnet_v2.model``
  (``metrics.syncnet_python.load_syncnet_python``) the values are in the units papers report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

SyncProtocol = Literal["temposyncdiff", "syncnet_python"]


@runtime_checkable
class SyncExpert(Protocol):
    """What LSE needs from a lip-sync expert (``SyncNet`` or a wrapper around an external one)."""

    def video_windows(self, frames: Tensor) -> Tensor: ...  # [T,3,H,W] -> [N_v, ...]
    def audio_windows(self, mel: Tensor) -> Tensor: ...  # [n_mels, M] -> [N_a, ...], window t aligned with video t
    def embed_video(self, video: Tensor) -> Tensor: ...  # [B, ...] -> [B, D]
    def embed_audio(self, mel: Tensor) -> Tensor: ...  # [B, ...] -> [B, D]


@torch.no_grad()
def embed_clip(expert: SyncExpert, frames: Tensor, mel: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One clip's frames ``[T,3,H,W]`` and full log-mel ``[n_mels,M]`` -> (video ``[N_v,D]``, audio ``[N_a,D]``).

    Put the expert in eval mode first (its BatchNorm layers would otherwise use window statistics).
    """
    v, a = expert.video_windows(frames), expert.audio_windows(mel)
    if len(v) == 0 or len(a) == 0:
        return v.new_zeros(0, 1), a.new_zeros(0, 1)
    ev = torch.cat([expert.embed_video(x) for x in v.split(batch_size)])
    ea = torch.cat([expert.embed_audio(x) for x in a.split(batch_size)])
    return ev, ea


def offset_distances(
    video_emb: Tensor, audio_emb: Tensor, vshift: int, protocol: SyncProtocol = "temposyncdiff"
) -> Tensor:
    """``[2*vshift+1]`` mean distances: entry ``o + vshift`` is mean_t ||v_t - a_{t+o}|| (lengths trimmed to the shorter).

    ``protocol="syncnet_python"``: as syncnet_python's ``calc_pdist``, over every t with the audio zero-padded
    and ``F.pairwise_distance``'s 1e-6 eps; the default: over the t where a_{t+o} exists, plain Euclidean.
    """
    n = min(len(video_emb), len(audio_emb))
    if n <= vshift:
        raise ValueError(f"{n} windows cannot cover offsets up to {vshift}")
    v, a = video_emb[:n].double(), audio_emb[:n].double()
    if protocol == "syncnet_python":
        padded = F.pad(a, (0, 0, vshift, vshift))
        return torch.stack([F.pairwise_distance(v, padded[j : j + n]).mean() for j in range(2 * vshift + 1)])
    if protocol != "temposyncdiff":
        raise ValueError(f"unknown LSE protocol {protocol!r}, expected one of {get_args(SyncProtocol)}")
    d = torch.cdist(v, a, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.stack([d.diagonal(o).mean() for o in range(-vshift, vshift + 1)])


class LipSyncError(Metric):
    """LSE-D / LSE-C over clips: ``update(video_emb [N_v,D], audio_emb [N_a,D])`` once per clip.

    ``compute()`` -> dict of means ``lse_d``, ``lse_c``, ``offset_zero_frac`` (fraction of clips whose best
    offset is 0), counts ``num_clips``, ``num_skipped`` (scalar tensors), and per-clip lists ``clip_lse_d``,
    ``clip_lse_c``, ``clip_offset``. With no scored clip the means are NaN. Use ``embed_clip`` to get the embeddings.
    ``protocol`` picks the distance arithmetic and the offset's sign (see the module docstring).
    Per process by default (``sync_on_compute=False``); pass ``sync_on_compute=True`` to gather rank-sharded clips.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self, vshift: int = 15, min_overlap: int = 5, protocol: SyncProtocol = "temposyncdiff", **kwargs: Any
    ) -> None:
        # every caller scores all of its clips in each process: no gathering across ranks unless asked for
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        if vshift < 0 or min_overlap < 1:
            raise ValueError(f"need vshift >= 0 and min_overlap >= 1, got {vshift}, {min_overlap}")
        if protocol not in get_args(SyncProtocol):
            raise ValueError(f"unknown LSE protocol {protocol!r}, expected one of {get_args(SyncProtocol)}")
        self.vshift, self.min_overlap, self.protocol = vshift, min_overlap, protocol
        self.add_state("clip_lse_d", default=[], dist_reduce_fx="cat")
        self.add_state("clip_lse_c", default=[], dist_reduce_fx="cat")
        self.add_state("clip_offset", default=[], dist_reduce_fx="cat")
        self.add_state("num_skipped", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, video_emb: Tensor, audio_emb: Tensor) -> None:
        """Score one clip from its per-window embeddings (any device; lengths may differ)."""
        if video_emb.ndim != 2 or audio_emb.ndim != 2:
            raise ValueError(f"embeddings must be [N,D], got {tuple(video_emb.shape)} and {tuple(audio_emb.shape)}")
        n = min(len(video_emb), len(audio_emb))
        if n < self.vshift + self.min_overlap:
            self.num_skipped += 1
            warnings.warn(
                f"LipSyncError: skipped a clip with {n} windows (< vshift + min_overlap = {self.vshift + self.min_overlap}); "
                f"{int(self.num_skipped)} skipped so far",
                stacklevel=3,
            )
            return
        if video_emb.shape[1] != audio_emb.shape[1]:
            raise ValueError(f"embedding sizes differ: video {video_emb.shape[1]}, audio {audio_emb.shape[1]}")
        if not (torch.isfinite(video_emb).all() and torch.isfinite(audio_emb).all()):
            raise ValueError("LipSyncError: non-finite embeddings")
        dist = offset_distances(video_emb, audio_emb, self.vshift, self.protocol)
        lse_d, idx = dist.min(0)
        self.clip_lse_d.append(lse_d.float().view(1))
        self.clip_lse_c.append((dist.median() - lse_d).float().view(1))
        offset = self.vshift - idx if self.protocol == "syncnet_python" else idx - self.vshift
        self.clip_offset.append(offset.view(1))

    def compute(self) -> dict[str, Any]:
        """Scalar tensors for means and counts; per-clip values as Python lists."""
        if len(self.clip_lse_d) == 0:  # a list of per-clip tensors, or one tensor once synced across ranks
            d = c = torch.zeros(0, device=self.device)
            off = torch.zeros(0, dtype=torch.long, device=self.device)
        else:
            d, c, off = (dim_zero_cat(x).view(-1) for x in (self.clip_lse_d, self.clip_lse_c, self.clip_offset))
        return {
            "lse_d": d.mean(),
            "lse_c": c.mean(),
            "offset_zero_frac": (off == 0).float().mean(),
            "num_clips": torch.tensor(len(d)),
            "num_skipped": self.num_skipped.clone(),
            "clip_lse_d": d.tolist(),
            "clip_lse_c": c.tolist(),
            "clip_offset": off.tolist(),
        }


Clip = TypeVar("Clip")


def audio_swap_control(
    score_fn: Callable[[Clip, Clip], tuple[Tensor, Tensor]], clips: Sequence[Clip], **metric_kwargs: Any
) -> dict[str, Any]:
    """LSE of each clip with its own audio vs another clip's audio; a model that ignores audio shows no gap.

    ``score_fn(clip, audio_source)`` returns (video_emb, audio_emb) for ``clip``'s video against ``audio_source``'s
    audio, e.g. ``lambda c, s: embed_clip(expert, c.frames, s.mel)``. Clip i is scored with ``score_fn(c_i, c_i)``
    and ``score_fn(c_i, c_{(i+1) % n})`` (a fixed derangement). Returns ``{"own", "swapped"}`` (``LipSyncError``
    outputs), ``gap_lse_c`` = own - swapped and ``gap_lse_d`` = swapped - own (positive = audio matters).
    """
    n = len(clips)
    if n < 2:
        raise ValueError(f"audio_swap_control needs at least 2 clips, got {n}")
    own, swapped = LipSyncError(**metric_kwargs), LipSyncError(**metric_kwargs)
    for i, clip in enumerate(clips):
        own.update(*score_fn(clip, clip))
        swapped.update(*score_fn(clip, clips[(i + 1) % n]))
    r_own, r_swap = own.compute(), swapped.compute()
    return {
        "own": r_own,
        "swapped": r_swap,
        "gap_lse_c": float(r_own["lse_c"] - r_swap["lse_c"]),
        "gap_lse_d": float(r_swap["lse_d"] - r_own["lse_d"]),
    }
