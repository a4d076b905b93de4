"""Audio encoder: per-frame log-mel windows -> per-frame embeddings with temporal context, plus a viseme head."""

from __future__ import annotations

from torch import Tensor, nn

MEL_NORMS = ("none", "utterance")


def window_centres(mel: Tensor, mel_per_frame: int = 4) -> Tensor:
    """Per-frame windows ``[B,T,n_mels,W]`` -> ``[B,n_mels]`` mean log-mel of the frames' own columns (each window's
    ``mel_per_frame`` columns from its centre): the mean of the utterance's log-mel when the windows span it."""
    w = mel.shape[-1]
    return mel[..., w // 2 : w // 2 + mel_per_frame].mean(dim=(1, 3))


def normalize_mel(mel: Tensor, mel_norm: str, mel_mean: Tensor | None = None) -> Tensor:
    """Windows ``[B,T,n_mels,W]`` as an encoder built with ``mel_norm`` reads them.

    ``utterance``: minus each sample's utterance mean log-mel ``mel_mean`` ``[B,n_mels]`` (None: the windows are
    taken to span the whole utterance, ``window_centres``). A constant gain or channel colouring of the recording
    then no longer shifts the input: what is left is how the spectrum moves within the utterance.
    """
    if mel_norm == "none":
        return mel
    mean = window_centres(mel) if mel_mean is None else mel_mean.to(mel.dtype)
    return mel - mean[:, None, :, None]


class _TemporalBlock(nn.Module):
    """Pre-norm residual block: dilated non-causal conv along T, then a pointwise MLP."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=dilation, dilation=dilation)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B,T,D]
        y = self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.proj(self.act(y))


class AudioEncoder(nn.Module):
    """``[B,T,n_mels,W]`` mel windows -> ``[B,T,dim]`` embeddings; ``viseme_logits`` maps them to ``[B,T,num_visemes]``.

    Each window goes through a 1D conv stack over its W mel frames (mel bins as channels); then
    ``context`` residual blocks of dilated convs (dilation 1, 2, 4, ...) along T mix neighbouring
    frames, so each embedding sees +-(2**context - 1) frames (non-causal; 0 disables context).
    Log-mel input is normalised by a BatchNorm over mel bins, so no fixed dB offset is assumed; ``mel_norm=utterance``
    first removes each utterance's own mean log-mel (``normalize_mel``; the callers pass it as ``mel_mean``).
    """

    def __init__(
        self,
        n_mels: int = 80,
        window: int = 16,
        dim: int = 128,
        context: int = 2,
        num_visemes: int = 15,
        width: int = 128,
        mel_norm: str = "none",
    ) -> None:
        super().__init__()
        if mel_norm not in MEL_NORMS:
            raise ValueError(f"mel_norm must be {' | '.join(MEL_NORMS)}, got {mel_norm!r}")
        self.config = dict(
            n_mels=n_mels,
            window=window,
            dim=dim,
            context=context,
            num_visemes=num_visemes,
            width=width,
            mel_norm=mel_norm,
        )
        self.mel_norm = mel_norm
        self.norm_in = nn.BatchNorm1d(n_mels)
        self.frame_net = nn.Sequential(
            nn.Conv1d(n_mels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(width * ((window + 3) // 4), dim),
        )
        self.context = nn.Sequential(*(_TemporalBlock(dim, 2**i) for i in range(context)))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_visemes)

    def embed(self, mel: Tensor) -> Tensor:
        """``[B,T,n_mels,W]`` windows, already ``normalize_mel``-ed -> ``[B,T,dim]`` per-frame audio embeddings."""
        b, t = mel.shape[:2]
        x = self.frame_net(self.norm_in(mel.flatten(0, 1)))
        return self.norm_out(self.context(x.view(b, t, -1)))

    def viseme_logits(self, emb: Tensor) -> Tensor:
        """``[B,T,dim]`` embeddings -> ``[B,T,num_visemes]`` viseme logits."""
        return self.head(emb)

    def encode(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised windows -> (embeddings ``[B,T,dim]``, viseme logits ``[B,T,num_visemes]``) (the ONNX graph)."""
        emb = self.embed(mel)
        return emb, self.viseme_logits(emb)

    def forward(self, mel: Tensor, mel_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[B,T,n_mels,W]`` windows (``mel_mean``: ``normalize_mel``'s) -> (embeddings, viseme logits)."""
        return self.encode(normalize_mel(mel, self.mel_norm, mel_mean))

    def visemes(self, mel: Tensor, mel_mean: Tensor | None = None) -> Tensor:
        """``[B,T,n_mels,W]`` -> ``[B,T]`` predicted viseme ids (audio-only viseme tokens for inference)."""
        return self.forward(mel, mel_mean)[1].argmax(-1)
