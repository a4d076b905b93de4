"""Audio encoder: per-frame log-mel windows -> per-frame embeddings with temporal context, plus a viseme head."""

from __future__ import annotations

from torch import Tensor, nn


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
    Log-mel input is normalised by a BatchNorm over mel bins, so no fixed dB offset is assumed.
    """

    def __init__(
        self,
        n_mels: int = 80,
        window: int = 16,
        dim: int = 128,
        context: int = 2,
        num_visemes: int = 15,
        width: int = 128,
    ) -> None:
        super().__init__()
        self.config = dict(n_mels=n_mels, window=window, dim=dim, context=context, num_visemes=num_visemes, width=width)
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
        """``[B,T,n_mels,W]`` -> ``[B,T,dim]`` per-frame audio embeddings."""
        b, t = mel.shape[:2]
        x = self.frame_net(self.norm_in(mel.flatten(0, 1)))
        return self.norm_out(self.context(x.view(b, t, -1)))

    def viseme_logits(self, emb: Tensor) -> Tensor:
        """``[B,T,dim]`` embeddings -> ``[B,T,num_visemes]`` viseme logits."""
        return self.head(emb)

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """``[B,T,n_mels,W]`` -> (embeddings ``[B,T,dim]``, viseme logits ``[B,T,num_visemes]``)."""
        emb = self.embed(mel)
        return emb, self.viseme_logits(emb)

    def visemes(self, mel: Tensor) -> Tensor:
        """``[B,T,n_mels,W]`` -> ``[B,T]`` predicted viseme ids (audio-only viseme tokens for inference)."""
        return self.forward(mel)[1].argmax(-1)
