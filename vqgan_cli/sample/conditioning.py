"""The conditioning tokens of sliding windows: a spatial map cut with each window, or fixed tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqgan_cli.sample.tokens import SamplingError


@dataclass
class Conditioning:
    """Conditioning tokens of a whole image: a spatial grid (B, H, W) that moves with the window,
    or fixed tokens (B, Lc) (start token, class); ``null_*``: the unconditional counterpart."""

    grid: torch.Tensor | None = None
    fixed: torch.Tensor | None = None
    null_grid: torch.Tensor | None = None
    null_fixed: torch.Tensor | None = None

    def length(self, crop: tuple[int, int]) -> int:
        """Conditioning tokens per window (Lc)."""
        if self.grid is not None:
            return crop[0] * crop[1]
        if self.fixed is not None:
            return int(self.fixed.shape[1])
        raise SamplingError("no conditioning tokens given")

    def windows(self, rows: torch.Tensor, cols: torch.Tensor, crop: tuple[int, int],
                null: bool = False) -> torch.Tensor | None:
        """(n, B, Lc) conditioning of the windows starting at ``rows``/``cols`` (n,)."""
        grid, fixed = (self.null_grid, self.null_fixed) if null else (self.grid, self.fixed)
        if grid is not None:
            return cut(grid, rows, cols, crop)
        if fixed is None:
            return None
        return fixed[None].expand(len(rows), -1, -1)


def cut(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
        crop: tuple[int, int]) -> torch.Tensor:
    """(n, B, ch*cw) crops of ``grid`` (B, H, W) whose top-left corners are rows/cols (n,)."""
    ch, cw = crop
    dev = grid.device
    r = rows.to(dev)[:, None] + torch.arange(ch, device=dev)  # (n, ch)
    c = cols.to(dev)[:, None] + torch.arange(cw, device=dev)  # (n, cw)
    crops = grid[:, r[:, :, None], c[:, None, :]]  # (B, n, ch, cw)
    return crops.permute(1, 0, 2, 3).reshape(len(rows), grid.shape[0], ch * cw)
