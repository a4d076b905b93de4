"""A pretrained first stage from diffusers (``AutoencoderTiny``, ``AutoencoderKL``), frozen, behind FrameVAE's interface.

Weights come from a local diffusers folder or a hub id already in the user's Hugging Face cache: never downloaded,
and only from safetensors files (nothing is unpickled). An export (``vae_pretrained.pt``) stores the architecture
(the diffusers config) and the weights, so loading it needs neither diffusers' files nor the original folder.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from temposyncdiff.errors import UserError
from temposyncdiff.nets.vae import LOGVAR_RANGE, FrameVAE

KINDS = {"tiny": "AutoencoderTiny", "kl": "AutoencoderKL"}


def _plain(value: Any) -> Any:
    """A diffusers config value as plain types (tuples -> lists): exports stay weights-only loadable."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _from_pretrained(cls: type, path: str) -> nn.Module:
    """``cls`` with the weights at ``path`` (a local folder, or a hub id found in the cache), safetensors only."""
    local = Path(path).expanduser()
    source = str(local) if local.is_dir() else path
    whole_pipeline = not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file()
    subfolder = "vae" if local.is_dir() and whole_pipeline else None  # a whole Stable Diffusion folder: its vae/
    try:
        return cls.from_pretrained(
            source, subfolder=subfolder, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as err:  # EnvironmentError: not a folder, not cached; no .safetensors file
        if local.is_dir():
            where = f"not a diffusers {cls.__name__} folder with safetensors weights ({str(err).strip()[:200]})"
        else:
            where = "no such folder, and not a hub id in the Hugging Face cache (nothing is downloaded)"
        raise UserError(f"pretrained first stage unavailable: {path}: {where}") from None


class DiffusersVAE(FrameVAE):
    """A frozen diffusers autoencoder: ``kind`` tiny (TAESD's ``AutoencoderTiny``) or kl (``AutoencoderKL``).

    ``path``: its weights (a diffusers folder or a cached hub id). ``config``: the architecture alone, random init,
    for an export's rebuild (its weights follow) and for latency benchmarks; ``{}`` is the class's default.
    """

    def __init__(self, kind: str = "tiny", path: str | os.PathLike | None = None, config: dict | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise UserError(f"model.net.kind={kind!r}: a diffusers first stage is one of {', '.join(KINDS)}")
        import diffusers

        cls = getattr(diffusers, KINDS[kind])
        if path is not None:
            ae = _from_pretrained(cls, str(path))
        elif config is not None:
            ae = cls.from_config(dict(config))
        else:
            raise UserError(
                f"a pretrained first stage needs its weights: model.net.path=<a local diffusers {KINDS[kind]} folder "
                "or a hub id in the Hugging Face cache>"
            )
        self.kind, self.pretrained = kind, path is not None
        accepted = inspect.signature(cls.__init__).parameters  # not the private or derived keys diffusers adds
        self.config = {"kind": kind, "config": _plain({k: v for k, v in ae.config.items() if k in accepted})}
        self.latent_channels = int(ae.config.latent_channels)
        if kind == "tiny":
            self.encoder, self.decoder = ae.encoder, ae.decoder  # [-1,1] in and out, as diffusers wraps TAESD
            self.downsample = 2 ** (len(ae.config.encoder_block_out_channels) - 1)
        else:
            self.encoder = nn.Sequential(ae.encoder, ae.quant_conv or nn.Identity())
            self.decoder = nn.Sequential(ae.post_quant_conv or nn.Identity(), ae.decoder)
            self.downsample = 2 ** (len(ae.config.block_out_channels) - 1)
        self.requires_grad_(False)
        self.eval()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.kind == "tiny":  # a deterministic encoder: a point posterior
            return h, torch.full_like(h, LOGVAR_RANGE[0])
        return self.posterior(h)

    def train(self, mode: bool = True) -> DiffusersVAE:
        """Always in eval mode: the weights are frozen, so are their norms' and dropouts' modes."""
        return super().train(False)
