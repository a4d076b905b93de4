"""Latent denoiser over a window of T frames (teacher and student): a per-frame conv UNet with temporal layers.

Conditioning: the reference latent (identity anchor) and the motion frames (clean latents of frames already
generated, with a known-mask channel) are concatenated to the noisy latents as input channels; the timestep,
the per-frame audio embedding and the viseme token form one vector per frame that modulates every residual
block (FiLM on the group norm); at ``cross_attention_levels`` each frame's pixels also attend to the window's
audio/viseme tokens (with a learned relative-frame embedding). Temporal attention (or a temporal conv) mixes
the T frames at every pixel at ``temporal_levels``. Null audio / viseme tokens serve classifier-free guidance.

With ``pose_mask`` (a box of frame fractions, e.g. the lower face), each frame also gets a pose source: the
latent of a frame whose pose and upper face the output should keep (the target frame itself in training, the
driving video's frame when re-voicing, the reference when animating a photo), with the box zeroed and a mask
channel marking it. The net then only has to draw the masked mouth and jaw from the audio (as Wav2Lip,
MuseTalk and LatentSync do), instead of the whole frame, which a minute of footage cannot teach.

With ``lip_dim`` (a per-frame lip shape: ``metrics.mouth.lip_shape``'s landmark openings and width), a small head
predicts the shape from the audio and viseme tokens, and the shape joins the tokens. Training gives the true shape
(measured on the target frame) part of the time, so the net learns to draw a given shape, which the truth explains
far better than audio; the head learns audio -> shape as a separate, low-dimensional regression. At inference the
head's prediction drives the mouth (a speech-to-motion step, then rendering, as landmark- and 3DMM-driven talking-head
methods split the problem). Shapes are standardised by ``lip_norm`` (the training data's mean and std); with
``lip_relative`` they are first taken relative to each person's own shapes (``mean``: minus their mean; ``scale``:
also over their std), as mouths differ more between people than one mouth moves while talking (on the seven dev
clips 49-78 % of the shapes' variance lies between people, and one person's mouth moves 3x another's), which a head
that hears only audio cannot know. A regression
head's predictions vary less than the truth (by about its correlation with it), which would draw a mouth that barely
moves: at inference they are scaled by ``lip_gain`` (per shape, the held-out truth's std over the predictions').
With ``lip_reader``, a small ``LipReader`` reads the shapes back from the lower face of latents: fitted to the true
latents and then frozen (``stages.lip_reader``), it scores the net's own x0 estimates against the shapes the net was
asked to draw (the stages' ``lip_read_weight``), since a diffusion loss alone lets the net draw them smaller.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from temposyncdiff.nets.audio_encoder import AudioEncoder
from temposyncdiff.regions import crop

LIP_RELATIVE = ("none", "mean", "scale")  # lip shapes as they are | minus the person's mean | also over their std


def relative_lips(lips: Any, mean: Any, std: Any, mode: str) -> Any:
    """Lip shapes (tensor or array) relative to a person whose ``mean`` and ``std`` broadcast with them, as a
    ``lip_relative=mode`` net reads them (``LIP_RELATIVE``)."""
    if mode == "none":
        return lips
    return (lips - mean) / std if mode == "scale" else lips - mean


def _groups(ch: int, max_groups: int = 32) -> int:
    return math.gcd(ch, max_groups)


def sinusoidal(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[N]`` positions or timesteps -> ``[N, dim]`` sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def box_mask(box: tuple[float, float, float, float], h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """``[h, w]`` float mask, 1 on every latent cell that the frame-fraction box ``(x0, y0, x1, y1)`` touches."""
    x0, y0, x1, y1 = box
    m = torch.zeros(h, w, device=device)
    m[math.floor(y0 * h) : math.ceil(y1 * h), math.floor(x0 * w) : math.ceil(x1 * w)] = 1.0
    return m


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Ctx(NamedTuple):
    film: Tensor  # [B*T, cond_dim] per-frame conditioning vector (after SiLU)
    tokens: Tensor  # [B*T, T, cond_dim] audio/viseme tokens each frame attends to
    frames: int  # T


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the per-frame condition as scale/shift on the second norm."""

    def __init__(self, cin: int, cout: int, cond_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.norm2, self.drop = nn.GroupNorm(_groups(cout), cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, film: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(film)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Attention(nn.Module):
    """Pre-norm multi-head attention over tokens ``[N,L,dim]`` (self, or to a context ``[N,S,context_dim]``)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(context_dim) if context_dim else None
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(context_dim or dim, 2 * dim)
        self.out = _zero(nn.Linear(dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.norm(x)
        ctx = h if self.norm_ctx is None else self.norm_ctx(context)
        q, (k, v) = self.q(h), self.kv(ctx).chunk(2, dim=-1)
        q, k, v = (rearrange(z, "n l (heads d) -> n heads l d", heads=self.heads) for z in (q, k, v))
        y = rearrange(F.scaled_dot_product_attention(q, k, v), "n heads l d -> n l (heads d)")
        return x + self.out(y)


class TemporalConv(nn.Module):
    """Residual conv along T (kernel 3) at every pixel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.conv = nn.LayerNorm(dim), _zero(nn.Conv1d(dim, dim, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:  # [N,T,dim]
        return x + self.conv(F.silu(self.norm(x)).transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """ResBlock, then optional spatial self-attention, cross-attention to audio tokens and a temporal layer."""

    def __init__(
        self,
        cin: int,
        cout: int,
        cond_dim: int,
        heads: int,
        spatial: bool,
        cross: bool,
        temporal: str | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.res = ResBlock(cin, cout, cond_dim, dropout)
        self.spatial = Attention(cout, heads) if spatial else None
        self.cross = Attention(cout, heads, cond_dim) if cross else None
        self.temporal = {"attention": lambda: Attention(cout, heads), "conv": lambda: TemporalConv(cout)}.get(
            temporal or "", lambda: None
        )()

    def forward(self, x: Tensor, ctx: _Ctx) -> Tensor:  # x [B*T, C, h, w]
        x = self.res(x, ctx.film)
        n, c, h, w = x.shape
        if self.spatial is not None or self.cross is not None:
            tok = rearrange(x, "n c h w -> n (h w) c")
            if self.spatial is not None:
                tok = self.spatial(tok)
            if self.cross is not None:
                tok = self.cross(tok, ctx.tokens)
            x = rearrange(tok, "n (h w) c -> n c h w", h=h)
        if self.temporal is not None:
            t = ctx.frames
            tok = rearrange(x, "(b t) c h w -> (b h w) t c", t=t)
            if isinstance(self.temporal, Attention):
                tok = tok + sinusoidal(torch.arange(t, device=x.device), c).to(tok.dtype)
            x = rearrange(self.temporal(tok), "(b h w) t c -> (b t) c h w", h=h, w=w)
        return x


class LipHead(nn.Module):
    """Per-frame lip shapes ``[B,T,lip_dim]`` from the window's audio + viseme tokens ``[B,T,cond_dim]``."""

    def __init__(self, cond_dim: int, lip_dim: int, width: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)  # on its input tokens: minutes of footage overfit the head first
        self.norm = nn.LayerNorm(cond_dim)
        self.net = nn.Sequential(
            nn.Conv1d(cond_dim, width, 5, padding=2), nn.GELU(), nn.Conv1d(width, lip_dim, 3, padding=1)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(self.norm(self.drop(tokens)).transpose(1, 2)).transpose(1, 2)


class LipReader(nn.Module):
    """Raw lip shapes ``[N, lip_dim]`` read from the lower face (``box``, frame fractions) of latents ``[N,C,h,w]``;
    ``norm`` (the training shapes' mean and std) sets the output's scale."""

    def __init__(self, latent_channels: int, lip_dim: int, box: tuple[float, ...], width: int = 64) -> None:
        super().__init__()
        self.box = box
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(3),  # any latent size (128 or 256 px frames)
            nn.Flatten(),
            nn.Linear(9 * width, lip_dim),
        )
        self.register_buffer("norm", torch.stack([torch.zeros(lip_dim), torch.ones(lip_dim)]))  # mean, std

    def forward(self, latents: Tensor) -> Tensor:
        return self.norm[0] + self.norm[1] * self.net(crop(latents, self.box))


class Denoiser(nn.Module):
    """``forward(x_t [B,T,C,h,w], t [B], ref_latent [B,C,h,w], audio_emb [B,T,D] | None, visemes [B,T] | None)``.

    Returns the prediction (epsilon, v or x0, as trained) ``[B,T,C,h,w]``. ``motion [B,T,C,h,w]`` with
    ``motion_mask [B,T]`` gives frames already known (long-audio continuation); ``drop_cond [B]`` replaces the
    audio and viseme condition of those samples by the null tokens (None audio/visemes: null for all).
    ``pose [B,T,C,h,w]`` (required when built with ``pose_mask``) is the per-frame pose source, unmasked.
    ``lips [B,T,lip_dim]`` (standardised; nets built with ``lip_dim``) gives the lip shapes to draw; None: the
    net's own prediction from the audio and visemes (as at inference).
    ``audio_encoder`` (AudioEncoder kwargs) makes ``self.audio`` part of this net (trained, averaged, exported).
    ``lip_reader`` (nets with ``lip_dim``) adds ``self.lip_reader`` (``read_lips``), used in training only (the stages
    add it when their ``lip_read_weight`` is set). ``lip_dropout``: dropout on the lip head's input tokens.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        channels: tuple[int, ...] = (64, 128, 192),
        num_res_blocks: int = 1,
        attention_levels: tuple[int, ...] = (2,),
        cross_attention_levels: tuple[int, ...] = (1, 2),
        temporal: str | None = "attention",
        temporal_levels: tuple[int, ...] = (0, 1, 2),
        heads: int = 4,
        cond_dim: int = 256,
        audio_dim: int = 128,
        num_visemes: int = 15,
        window: int = 8,
        motion_frames: bool = True,
        dropout: float = 0.0,
        audio_encoder: dict | None = None,
        pose_mask: tuple[float, float, float, float] | None = None,
        lip_dim: int = 0,
        lip_relative: str = "none",
        lip_reader: bool = False,
        lip_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if lip_relative not in LIP_RELATIVE:
            raise ValueError(f"lip_relative must be {' | '.join(LIP_RELATIVE)}, got {lip_relative!r}")
        if temporal not in (None, "none", "attention", "conv"):
            raise ValueError(f"temporal must be attention | conv | none, got {temporal!r}")
        channels = tuple(channels)
        self.config = dict(
            latent_channels=latent_channels,
            channels=list(channels),
            num_res_blocks=num_res_blocks,
            attention_levels=list(attention_levels),
            cross_attention_levels=list(cross_attention_levels),
            temporal=temporal,
            temporal_levels=list(temporal_levels),
            heads=heads,
            cond_dim=cond_dim,
            audio_dim=audio_dim,
            num_visemes=num_visemes,
            window=window,
            motion_frames=motion_frames,
            dropout=dropout,
            audio_encoder=dict(audio_encoder) if audio_encoder else None,
            pose_mask=list(pose_mask) if pose_mask else None,
            lip_dim=lip_dim,
            lip_relative=lip_relative,
            lip_reader=lip_reader,
            lip_dropout=lip_dropout,
        )
        self.latent_channels, self.window, self.num_visemes = latent_channels, window, num_visemes
        self.motion_frames = motion_frames
        if pose_mask is not None and not (
            0 <= pose_mask[0] < pose_mask[2] <= 1 and 0 <= pose_mask[1] < pose_mask[3] <= 1
        ):
            raise ValueError(f"pose_mask must be (x0, y0, x1, y1) fractions with x0 < x1 and y0 < y1, got {pose_mask}")
        self.pose_mask = tuple(pose_mask) if pose_mask is not None else None
        self.audio = AudioEncoder(**audio_encoder) if audio_encoder is not None else None
        if self.audio is not None and self.audio.config["dim"] != audio_dim:
            raise ValueError(f"audio_encoder dim {self.audio.config['dim']} != audio_dim {audio_dim}")
        self.cond_dim = cond_dim
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.audio_proj = nn.Sequential(nn.Linear(audio_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.null_audio = nn.Parameter(torch.randn(cond_dim) * 0.02)
        self.viseme_emb = nn.Embedding(num_visemes + 1, cond_dim)  # last row: null token
        self.rel_frame = nn.Parameter(torch.randn(2 * window - 1, cond_dim) * 0.02)
        self.lip_dim, self.lip_relative = lip_dim, lip_relative
        if lip_dim:
            self.lip_head, self.lip_proj = LipHead(cond_dim, lip_dim, dropout=lip_dropout), nn.Linear(lip_dim, cond_dim)
            self.register_buffer("lip_norm", torch.stack([torch.zeros(lip_dim), torch.ones(lip_dim)]))  # mean, std
            self.register_buffer("lip_gain", torch.ones(lip_dim))  # predicted shapes' scale at inference
        self.lip_reader: LipReader | None = None
        if lip_reader:
            self.add_lip_reader()

        def block(cin: int, cout: int, level: int, spatial: bool | None = None) -> Block:
            spatial = level in attention_levels if spatial is None else spatial
            tmp = temporal if level in temporal_levels else None
            return Block(cin, cout, cond_dim, heads, spatial, level in cross_attention_levels, tmp, dropout)

        in_ch = latent_channels * (3 if motion_frames else 2) + int(motion_frames)
        in_ch += (latent_channels + 1) * (pose_mask is not None)
        self.stem = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [channels[0]], channels[0]
        for i, c in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, c, i))
                ch = c
                skips.append(ch)
            if i < len(channels) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        last = len(channels) - 1
        self.mid = nn.ModuleList([block(ch, ch, last, spatial=bool(attention_levels)), block(ch, ch, last, False)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), channels[i], i))
                ch = channels[i]
            if i > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                )
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), _zero(nn.Conv2d(ch, latent_channels, 3, padding=1))
        )

    def embed_audio(self, mel: Tensor, mel_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mel windows ``[B,T,n_mels,W]`` -> (audio embeddings ``[B,T,D]``, viseme logits) with the own encoder
        (``mel_mean`` ``[B,n_mels]``: each sample's utterance mean log-mel, read by ``mel_norm=utterance`` encoders)."""
        if self.audio is None:
            raise RuntimeError("this Denoiser was built without an audio_encoder")
        return self.audio(mel, mel_mean)

    def standardize_lips(self, lips: Tensor, person: Tensor | None = None) -> Tensor:
        """Raw ``lip_shape`` values ``[..., T, lip_dim]`` -> the standardised units the net takes and predicts.

        A ``lip_relative`` net first takes them relative to ``person`` (``[..., 2, lip_dim]``: the mean and std of the
        person's shapes in their footage): minus the mean, and with ``scale`` over the std, so that they say how the
        mouth moves within that person's own range, not how it differs from other people's.
        """
        if self.lip_relative != "none":
            if person is None:
                raise ValueError("a lip_relative net standardises shapes by the person's own: give person")
            lips = relative_lips(lips, person[..., None, 0, :], person[..., None, 1, :], self.lip_relative)
        return (lips - self.lip_norm[0]) / self.lip_norm[1]

    def add_lip_reader(self) -> None:
        """Give the net a ``LipReader`` of its lower face (``pose_mask``, else the whole frame); kept in its config."""
        if not self.lip_dim:
            raise ValueError("a lip reader needs lip_dim: it reads back the lip shapes the net draws")
        box = self.pose_mask or (0.0, 0.0, 1.0, 1.0)
        self.lip_reader = LipReader(self.latent_channels, self.lip_dim, box).to(self.lip_norm)
        self.config["lip_reader"] = True

    def read_lips(self, latents: Tensor, person: Tensor | None = None) -> Tensor:
        """Standardised lip shapes ``[B,T,lip_dim]`` that ``lip_reader`` reads from latents ``[B,T,C,h,w]``
        (``person`` as for ``standardize_lips``)."""
        raw = self.lip_reader(latents.flatten(0, 1)).unflatten(0, latents.shape[:2])
        return self.standardize_lips(raw, person)

    def predict_lips(self, audio_emb: Tensor, visemes: Tensor) -> Tensor:
        """Standardised lip shapes ``[B,T,lip_dim]`` from audio embeddings ``[B,T,D]`` and viseme ids ``[B,T]``
        (the head's regression; ``condition`` scales it by ``lip_gain``)."""
        return self.lip_head(self.audio_proj(audio_emb) + self.viseme_emb(visemes))

    def condition(
        self,
        t: Tensor,
        audio_emb: Tensor | None,
        visemes: Tensor | None,
        shape: tuple[int, int],
        drop_cond: Tensor | None = None,
        lips: Tensor | None = None,
    ) -> _Ctx:
        """Per-frame FiLM vectors and cross-attention tokens from timestep, audio, visemes and lip shapes."""
        b, n = shape
        if n > self.window:
            raise ValueError(f"window of {n} frames exceeds the net's window={self.window}")
        emb = sinusoidal(t.expand(b) if t.ndim == 0 else t, self.cond_dim)  # float32: t up to 999 exactly
        temb = self.time_mlp(emb.to(self.null_audio.dtype))  # a bf16 / fp16 net: its own dtype from here
        null_a = self.null_audio.expand(b, n, -1)
        null_v = self.viseme_emb.weight[-1].expand(b, n, -1)
        a = null_a if audio_emb is None else self.audio_proj(audio_emb)
        v = null_v if visemes is None else self.viseme_emb(visemes)
        if drop_cond is not None:
            a, v = torch.where(drop_cond[:, None, None], null_a, a), torch.where(drop_cond[:, None, None], null_v, v)
        tokens = a + v  # [B,T,cd]
        if self.lip_dim and (audio_emb is not None or visemes is not None or lips is not None):
            lip = self.lip_proj(self.lip_head(tokens) * self.lip_gain if lips is None else lips)
            tokens = tokens + (lip if drop_cond is None else torch.where(drop_cond[:, None, None], 0, lip))
        film = F.silu(temb[:, None] + tokens).flatten(0, 1)
        idx = torch.arange(n, device=t.device)
        rel = self.rel_frame[idx[None, :] - idx[:, None] + self.window - 1]  # [T(query), T(key), cd]
        return _Ctx(film, (tokens[:, None] + rel[None]).flatten(0, 1), n)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        ref_latent: Tensor,
        audio_emb: Tensor | None = None,
        visemes: Tensor | None = None,
        motion: Tensor | None = None,
        motion_mask: Tensor | None = None,
        drop_cond: Tensor | None = None,
        pose: Tensor | None = None,
        lips: Tensor | None = None,
    ) -> Tensor:
        b, n, c, h, w = x_t.shape
        ctx = self.condition(t, audio_emb, visemes, (b, n), drop_cond, lips)
        inputs = [x_t, ref_latent[:, None].expand(-1, n, -1, -1, -1)]
        if self.motion_frames:
            mask = x_t.new_zeros(b, n) if motion_mask is None else motion_mask.to(x_t.dtype)
            m = mask[..., None, None, None]
            known = x_t.new_zeros(x_t.shape) if motion is None else motion * m
            # known frames: the net sees only their clean latents (their noisy input differs in training and sampling)
            inputs = [x_t * (1 - m), inputs[1], known, m.expand(-1, -1, 1, h, w)]
        if self.pose_mask is not None:
            if pose is None:
                raise ValueError("this Denoiser was built with pose_mask: pass pose (the pose source latents)")
            hole = box_mask(self.pose_mask, h, w, x_t.device).to(x_t.dtype)
            inputs += [pose * (1 - hole), hole.expand(b, n, 1, h, w)]
        x = self.stem(torch.cat(inputs, dim=2).flatten(0, 1))
        skips = [x]
        for layer in self.down:
            x = layer(x, ctx) if isinstance(layer, Block) else layer(x)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, ctx)
        for layer in self.up:
            x = layer(torch.cat([x, skips.pop()], dim=1), ctx) if isinstance(layer, Block) else layer(x)
        return self.out(x).view(b, n, c, h, w)
