"""Convolutional building blocks shared by the encoder and decoder (PAPER.md, stage one).

Submodule names match the reference release exactly (``norm1``, ``conv1``, ``nin_shortcut``,
``q``/``k``/``v``/``proj_out``, ``conv``) so that official checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("group", "pixel")


class PixelNorm(nn.Module):
    """Normalisation over the channels at each pixel (a LayerNorm of the channel vector), eps 1e-6,
    per-channel affine, computed in float32.

    Why it exists: GroupNorm removes each group's spatial mean, so a tokenizer trained on crops of
    large scenes codes a flat crop almost independently of its colour and meets other statistics
    on whole images (DESIGN.md). With no spatial statistics the network is local: a training crop
    computes exactly what the same region computes inside a large image. Its parameters are named
    and shaped like GroupNorm's (``weight``, ``bias``: (C,)).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        # layer_norm over the last dim of an NHWC view: 2.8x faster than reducing over dim 1 of
        # NCHW on the CPU; the result stays NHWC-strided, which the next convolution takes as is.
        h = F.layer_norm(x.float().permute(0, 2, 3, 1), self.weight.shape, self.weight.float(),
                         self.bias.float(), self.eps)
        return h.permute(0, 3, 1, 2).to(x.dtype)


def Normalize(channels: int, kind: str = "group") -> nn.Module:  # noqa: N802 - the reference's name
    """``group``: GroupNorm with the reference's 32 groups and eps 1e-6 (the eps matters for exact
    outputs; official checkpoints use it); ``pixel``: :class:`PixelNorm`."""
    if kind == "pixel":
        return PixelNorm(channels)
    if kind != "group":
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``; F.silu is the same function, fused."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` exists only when widths differ."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 norm: str = "group"):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels, norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            # Created only when needed: an identity skip has no key in the official checkpoints.
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, norm: str = "group"):
        super().__init__()
        self.norm = Normalize(channels, norm)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head whose sequence is the raster of positions. flatten+transpose
        # copes with channels_last memory (a view would not).
        q, k, v = (t(h).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))
        # SDPA's default scale is head_dim^-0.5 = C^-0.5, the reference's scale; it avoids
        # materialising the (HW, HW) matrix where a fused kernel exists.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution; the asymmetric right/bottom pad reproduces the reference exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv to smooth the blockiness."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
