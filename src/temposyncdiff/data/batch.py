"""The training batch: a typed dataclass that Lightning moves to the device through its ``to`` method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """Clips of ``B`` samples x ``T`` frames; padded frames (clip past the utterance end) have ``mask`` False."""

    frames: Tensor  # [B,T,3,H,W] float in [-1,1]
    reference: Tensor  # [B,3,H,W] float in [-1,1]
    mel: Tensor  # [B,T,n_mels,W] log-mel window per frame
    visemes: Tensor  # [B,T] int64
    mask: Tensor  # [B,T] bool, True for real frames
    ids: list[str]  # utterance ids
    start: Tensor  # [B] int64, first frame index of the clip in its utterance
    latents: Tensor | None = None  # [B,T,C,h,w] cached VAE latents of the frames
    ref_latent: Tensor | None = None  # [B,C,h,w]
    lips: Tensor | None = None  # [B,T,3] landmark lip shapes (metrics.mouth.lip_shape) when the cache has them
    lip_person: Tensor | None = None  # [B,2,3] with lips: the clip's talk's (person's) mean and std lip shape
    mel_mean: Tensor | None = None  # [B,n_mels] the clip's utterance's mean log-mel (audio encoders' mel_norm)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """A new batch with ``fn`` applied to every tensor field."""
        return replace(self, **{f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device`` (Lightning's ``transfer_batch_to_device`` calls this)."""
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Pinned copy (the DataLoader calls this when ``pin_memory=True``)."""
        return self.apply(Tensor.pin_memory)

    def __len__(self) -> int:
        return len(self.ids)


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Stack dataset items (dicts with the Batch fields, ``id`` for ``ids``) into a Batch."""

    def stack(key: str) -> Tensor | None:
        values = [s.get(key) for s in samples]
        return None if any(v is None for v in values) else torch.stack(values)

    return Batch(
        frames=stack("frames"),
        reference=stack("reference"),
        mel=stack("mel"),
        visemes=stack("visemes"),
        mask=stack("mask"),
        ids=[s["id"] for s in samples],
        start=torch.as_tensor([s["start"] for s in samples], dtype=torch.int64),
        latents=stack("latents"),
        ref_latent=stack("ref_latent"),
        lips=stack("lips"),
        lip_person=stack("lip_person"),
        mel_mean=stack("mel_mean"),
    )
