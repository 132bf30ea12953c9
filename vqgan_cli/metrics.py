"""Reconstruction and codebook metrics for tokenizers.

Image metrics take model-space tensors in [-1, 1], clamp them to [-1, 1] (the decoder output is
unbounded and is clamped for display, PAPER.md) and map them to [0, 1] before measuring, so PSNR
and SSIM use data range 1 on the displayed image -- the convention of most published numbers.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

# PSNR of identical images is infinite; flooring the MSE keeps batch means finite (cap: 100 dB).
_MSE_FLOOR = 1e-10


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] display space (clamped), in fp32."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), of (B, C, H, W) images in [-1, 1] measured in [0, 1] space."""
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(_MSE_FLOOR))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B,), Gaussian 11x11 window, in [0, 1] space (images must be >= 11 px)."""
    out = structural_similarity_index_measure(to_unit(x), to_unit(y), data_range=1.0, reduction="none")
    return out.reshape(-1)


def code_counts(indices: torch.Tensor, n_embed: int) -> torch.Tensor:
    """How often each of the ``n_embed`` codes occurs in ``indices`` (any shape), (n_embed,)."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= n_embed):
        raise ValueError(f"indices must lie in [0, {n_embed}), got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=n_embed)


def codebook_perplexity(indices: torch.Tensor, n_embed: int) -> torch.Tensor:
    """``exp(entropy)`` of code frequencies: the effective number of codes in use (1..n_embed)."""
    counts = code_counts(indices, n_embed).double()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()  # 0 * log 0 counts as 0
    return torch.exp(entropy).float()


def codebook_usage(indices: torch.Tensor, n_embed: int) -> float:
    """Share of the codebook that appears at least once in ``indices`` (dead codes lower it)."""
    return float((code_counts(indices, n_embed) > 0).sum()) / n_embed
