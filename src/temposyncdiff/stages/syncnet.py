"""Lip-sync expert stage: SyncNet trained with BCE on in-sync vs shifted / other-utterance pairs, LSE on whole utterances.

Every 5-frame video window of a batch (frames t..t+F-1) is scored against the in-sync audio window (centred on
frame t + F//2, cut from the clip's mel context, ``mel_context``) of every window: its own (positive), those of
the same clip ``min_shift``..``max_shift`` frames away (shifted negatives) and those of other utterances in the
batch (preferably of the same talk). Training clips get per-clip appearance and voice jitter. Validation scores
the same pairs (``val/acc`` = balanced in-sync vs off-sync accuracy) and, on up to ``lse_max_utterances`` whole
utterances of the split (clips are too short for a +-15 frame offset search), LSE-C / LSE-D, the offset-0
fraction and the audio-swap control.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchmetrics import MeanMetric

from temposyncdiff.data.batch import Batch
from temposyncdiff.errors import UserError
from temposyncdiff.metrics.sync import audio_swap_control, embed_clip
from temposyncdiff.nets.syncnet import SyncNet, mel_context
from temposyncdiff.stages.base import StageModule


def pair_masks(
    mask: Tensor,
    ids: list[str],
    frames: int,
    centres: tuple[int, int],
    min_shift: int,
    max_shift: int,
    same_talk: bool = True,
) -> dict[str, Tensor]:
    """Every valid video window of a batch (CPU ``mask [B,T]``) and which (video i, audio j) pairs are negatives.

    Window i covers frames t..t+F-1 of clip ``item[i]`` (``window`` = t); audio window j is centred on frame
    ``centre[j]`` = t + F//2 of ``item[j]``, so (i, i) is in sync. ``shift [N,N]``: same clip, ``min_shift`` <=
    |centre[i] - centre[j]| <= ``max_shift``. ``other [N,N]``: another utterance's audio (with ``same_talk``, of
    the same talk, ``talk_id/utt`` ids, where the batch holds one, so voice and face cannot tell the pair apart).
    Centres lie in ``centres`` (inclusive) and on real frames.
    """
    n_valid = mask.sum(1)
    start = torch.arange(mask.shape[1] - frames + 1)[None]
    mid = start + frames // 2
    ok = (start + frames <= n_valid[:, None]) & (mid >= centres[0]) & (mid <= centres[1]) & (mid < n_valid[:, None])
    item, window = ok.nonzero(as_tuple=True)
    centre = window + frames // 2
    dist = (centre[:, None] - centre[None]).abs()
    shift = (item[:, None] == item[None]) & (dist >= min_shift) & (dist <= max_shift)
    other = torch.tensor([[a != c for c in ids] for a in ids], dtype=torch.bool)[item][:, item]
    if same_talk:
        talks = [i.rpartition("/")[0] for i in ids]
        same = other & torch.tensor([[a == c for c in talks] for a in talks], dtype=torch.bool)[item][:, item]
        other = torch.where(same.any(1, keepdim=True), same, other)
    return {"item": item, "window": window, "centre": centre, "shift": shift, "other": other}


def augment_clips(
    frames: Tensor,
    flip: float = 0.5,
    color: float = 0.0,
    shuffle: bool = False,
    translate: float = 0.0,
    scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Appearance jitter of ``[B,T,3,H,W]`` frames, one draw per clip: horizontal flip (probability ``flip``),
    channel gain and offset (+-``color``), channel shuffle, shift (+-``translate`` of the half-size) and zoom (+-``scale``).
    """
    b, t, c, h, w = frames.shape

    def u(*shape: int) -> Tensor:  # uniform in [-1, 1]
        return (2 * torch.rand(*shape, generator=generator) - 1).to(frames.device)

    x = torch.where(u(b, 1, 1, 1, 1) < 2 * flip - 1, frames.flip(-1), frames)
    x = (x * (1 + color * u(b, 1, c, 1, 1)) + color * u(b, 1, c, 1, 1)).clamp(-1, 1)
    if shuffle:
        perm = torch.rand(b, c, generator=generator).argsort(1).to(frames.device)
        x = x.gather(2, perm[:, None, :, None, None].expand_as(x))
    if translate or scale:
        theta = torch.zeros(b, 2, 3, device=frames.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 + scale * u(b)
        theta[:, :, 2] = translate * u(b, 2)
        grid = F.affine_grid(theta, [b, t * c, h, w], align_corners=False)
        x = F.grid_sample(x.flatten(1, 2), grid, padding_mode="border", align_corners=False).view_as(x)
    return x


def augment_mel(mel: Tensor, shift: int = 0, gain: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Voice jitter of per-frame log-mel windows ``[B,T,n_mels,W]``, one draw per clip: a shift of up to
    +-``shift`` mel bins (edge bins repeated; roughly a pitch / formant change) and a gain of +-``gain`` (log units).
    """
    b, n_mels = mel.shape[0], mel.shape[2]
    k = torch.randint(-shift, shift + 1, (b, 1), generator=generator)
    idx = (torch.arange(n_mels) - k).clamp(0, n_mels - 1).to(mel.device)
    g = (gain * (2 * torch.rand(b, generator=generator) - 1)).to(mel.device)
    return mel.gather(2, idx[:, None, :, None].expand_as(mel)) + g[:, None, None, None]


def audio_at(mel_windows: Tensor, items: Tensor, centres: Tensor, width: int, mel_per_frame: int) -> Tensor:
    """``[N,n_mels,width]`` mel windows centred on frame ``centres[i]`` of clip ``items[i]`` of per-frame windows ``[B,T,n_mels,W]``.

    Same alignment as ``SyncNet.audio_windows`` on the whole utterance; the centres must keep the window inside
    the clip's mel context (``mel_context``).
    """
    w = mel_windows.shape[-1]
    idx = w // 2 + centres[:, None] * mel_per_frame - width // 2 + torch.arange(width, device=centres.device)
    return mel_context(mel_windows, mel_per_frame)[items[:, None], :, idx].transpose(1, 2)


def utterances(dataset: Dataset, max_items: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Whole utterances behind a ``ClipDataset`` (or a ``Subset`` of one): (frames ``[T,3,H,W]`` in [-1,1], mel ``[n_mels,M]``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    src = dataset.src
    n = len(src.num_frames)
    for u in sorted(set(np.linspace(0, n - 1, min(n, max_items)).round().astype(int).tolist())):
        frames, mel, _, _ = src.clip(u, 0, src.num_frames[u])
        video = torch.from_numpy(np.asarray(frames, dtype=np.float32)) / 127.5 - 1.0
        yield video, torch.from_numpy(np.asarray(mel, dtype=np.float32)).T


class SyncNetStage(StageModule):
    kind = "syncnet"
    export_names = {"best": "syncnet.pt"}

    def __init__(
        self,
        net: SyncNet,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        min_shift: int = 3,
        max_shift: int = 10,
        lse_vshift: int = 15,
        lse_min_overlap: int = 5,
        lse_max_utterances: int = 16,
        same_talk: bool = True,
        augment: dict[str, Any] | None = None,
        augment_audio: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        # plain dicts (Hydra passes DictConfigs): Lightning checkpoints must stay weights_only-loadable
        augment, augment_audio = (dict(a) if a else None for a in (augment, augment_audio))
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        if not 1 <= min_shift <= max_shift:
            raise UserError(f"model.min_shift={min_shift}, max_shift={max_shift}: need 1 <= min_shift <= max_shift")
        if net.mel_per_frame != int(net.mel_per_frame):
            raise UserError(f"SyncNet mel_per_frame={net.mel_per_frame}: the stage needs a whole number")
        self.net = net
        self.acc = torch.nn.ModuleDict({k: MeanMetric() for k in ("pos", "shift", "other")})

    def setup(self, stage: str) -> None:
        audio = getattr(getattr(self.trainer, "datamodule", None), "audio", None)
        if audio is not None and abs(audio.mel_per_frame - self.net.mel_per_frame) > 1e-6:
            raise UserError(
                f"model.net.mel_per_frame={self.net.mel_per_frame} but the data gives {audio.mel_per_frame} mel frames per video frame"
            )

    def pair_logits(self, batch: Batch) -> dict[str, Tensor]:
        """Sync logits of the batch's in-sync (``pos``), shifted (``shift``) and other-utterance (``other``) pairs.

        Every valid video window is scored against the in-sync audio of every window (``pair_masks``): one
        embedding per window and stream, all pairs from one similarity matrix.
        """
        net, hp = self.net, self.hparams
        mpf, w, mw = int(net.mel_per_frame), batch.mel.shape[-1], net.mel_window
        t = batch.mel.shape[1]
        lo = max(0, math.ceil((mw // 2 - w // 2) / mpf))
        hi = min(t - 1, (w - mw + mw // 2 - w // 2) // mpf + t - 1)
        p = pair_masks(batch.mask.cpu(), batch.ids, net.frames, (lo, hi), hp.min_shift, hp.max_shift, hp.same_talk)
        p = {k: v.to(self.device) for k, v in p.items()}
        mel = augment_mel(batch.mel, **hp.augment_audio) if self.training and hp.augment_audio else batch.mel
        frames = augment_clips(batch.frames, **hp.augment) if self.training and hp.augment else batch.frames
        ev = net.embed_video(net.video_windows(frames)[p["item"], p["window"]])
        ea = net.embed_audio(audio_at(mel, p["item"], p["centre"], mw, mpf))
        logits = net.score(ev[:, None], ea[None])  # [N,N]: video i with audio j
        return {"pos": logits.diagonal(), "shift": logits[p["shift"]], "other": logits[p["other"]]}

    def _loss(self, logits: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean of the in-sync BCE and the (equally weighted) shifted / other-utterance BCEs; per-pair hits."""
        neg = [
            F.binary_cross_entropy_with_logits(x, torch.zeros_like(x))
            for k in ("shift", "other")
            if len(x := logits[k])
        ]
        pos = logits["pos"]
        loss = 0.5 * (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + sum(neg) / max(1, len(neg)))
        hits = {"pos": pos > 0, "shift": logits["shift"] < 0, "other": logits["other"] < 0}
        return loss, {k: v.float() for k, v in hits.items()}

    @staticmethod
    def _balanced(acc: dict[str, Tensor]) -> Tensor:
        """In-sync vs off-sync accuracy, shifted and other-utterance negatives weighted equally."""
        neg = [acc[k] for k in ("shift", "other") if k in acc]
        return 0.5 * (acc["pos"] + sum(neg) / len(neg)) if neg else acc["pos"]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, hits = self._loss(self.pair_logits(batch))
        acc = self._balanced({k: v.mean() for k, v in hits.items() if len(v)})
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        split = "test" if self.trainer.testing else "val"
        loss, hits = self._loss(self.pair_logits(batch))
        self.log(f"{split}/loss", loss, batch_size=len(batch))
        for k, v in hits.items():
            if len(v):
                self.acc[k].update(v)

    test_step = validation_step

    def on_validation_epoch_start(self) -> None:
        # here, not at epoch end: StageEMA's epoch-end hook (run before the module's) swaps the averaged weights out
        if not self.trainer.sanity_checking:
            self._log_lse("val", self.trainer.val_dataloaders.dataset)

    def on_test_epoch_start(self) -> None:
        self._log_lse("test", self.trainer.test_dataloaders.dataset)

    def on_validation_epoch_end(self) -> None:
        split = "test" if self.trainer.testing else "val"
        acc = {k: m.compute() for k, m in self.acc.items() if m.update_called}
        for m in self.acc.values():
            m.reset()
        if "pos" in acc:
            self.log(f"{split}/acc", self._balanced(acc), prog_bar=True)
        self.log_dict({f"{split}/acc_{k}": v for k, v in acc.items()})

    on_test_epoch_end = on_validation_epoch_end

    @torch.no_grad()
    def _log_lse(self, split: str, dataset: Dataset) -> None:
        """LSE-C / LSE-D and offset-0 fraction with own audio, and LSE-C with another utterance's audio."""
        hp = self.hparams
        if not hp.lse_max_utterances:
            return
        emb = [
            embed_clip(self.net, f.to(self.device), m.to(self.device))
            for f, m in utterances(dataset, hp.lse_max_utterances)
        ]
        if len(emb) < 2:
            warnings.warn(f"{split}: LSE needs at least 2 utterances, got {len(emb)}", stacklevel=2)
            return
        out = audio_swap_control(lambda c, s: (c[0], s[1]), emb, vshift=hp.lse_vshift, min_overlap=hp.lse_min_overlap)
        own, swap = out["own"], out["swapped"]
        self.log_dict(
            {
                f"{split}/lse_c": own["lse_c"],
                f"{split}/lse_d": own["lse_d"],
                f"{split}/offset0": own["offset_zero_frac"],
                f"{split}/lse_c_swap": swap["lse_c"],
                f"{split}/lse_c_gap": own["lse_c"] - swap["lse_c"],
            },
            prog_bar=True,
        )
