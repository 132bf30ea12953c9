"""Encoder and decoder of the VQGAN (PAPER.md, stage one), laid out as the official checkpoints.

Both index their levels by resolution (0 = full resolution): the decoder runs from the last level
down to 0 but stores level ``i`` at ``up.{i}``, which is what makes official keys load as-is.
"""

from __future__ import annotations

import torch
from torch import nn

from vqgan_cli.models.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample, swish
from vqgan_cli.models.config import AutoencoderConfig


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """The bottleneck: ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, norm: str):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm)
        self.attn_1 = AttnBlock(channels, norm)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        in_mult = (1,) + mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        res = cfg.resolution
        levels = []
        block_in = ch
        for i, m in enumerate(mult):
            block_in, block_out = ch * in_mult[i], ch * m
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, cfg.norm))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, cfg.norm))
            level = _Level(blocks, attns)
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, cfg.dropout, cfg.norm)
        self.norm_out = Normalize(block_in, cfg.norm)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            h = level.run(h)
            if i != last:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> unbounded output (B, out_channels, h*f, w*f); no tanh."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        block_in = ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout, cfg.norm)
        levels: list[_Level | None] = [None] * len(mult)
        for i in reversed(range(len(mult))):
            block_out = ch * mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout, cfg.norm))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, cfg.norm))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, cfg.norm)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = level.run(h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_channels, H, W)
