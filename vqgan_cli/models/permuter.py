"""Orders in which the prior reads a token grid, as in the reference release.

Each permuter maps a row-major (B, H*W) token sequence to its reading order and back:
``forward(x)[:, k] = x[:, forward_shuffle_idx[k]]``, and ``forward(y, reverse=True)`` undoes it.
The index tensors are registered as (persistent) buffers named ``forward_shuffle_idx`` and
``backward_shuffle_idx``, the reference's names, so official ``permuter.*`` keys load strictly.
The released models all use the identity (row-major) order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class Identity(nn.Module):
    """Row-major order: nothing to store, nothing to move."""

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        return x


class _IndexPermuter(nn.Module):
    """A fixed permutation of the H*W positions, kept as buffers so checkpoints carry it."""

    forward_shuffle_idx: torch.Tensor
    backward_shuffle_idx: torch.Tensor

    def __init__(self, order: torch.Tensor, inverse: torch.Tensor | None = None):
        super().__init__()
        order = torch.as_tensor(order, dtype=torch.int64)
        if not torch.equal(order.sort().values, torch.arange(order.numel())):
            raise ValueError("an ordering must visit every grid position exactly once")
        self.register_buffer("forward_shuffle_idx", order)
        self.register_buffer("backward_shuffle_idx", torch.argsort(order) if inverse is None
                             else torch.as_tensor(inverse, dtype=torch.int64))

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``x`` (B, H*W) -> (B, H*W) in reading order (or back to row-major with ``reverse``)."""
        return x[:, self.backward_shuffle_idx if reverse else self.forward_shuffle_idx]


class AlternateParsing(_IndexPermuter):
    """Boustrophedon: even rows left to right, odd rows right to left."""

    def __init__(self, height: int, width: int):
        grid = torch.arange(height * width).view(height, width)  # (H, W) row-major ids
        grid[1::2] = grid[1::2].flip(-1)
        super().__init__(grid.flatten())


def _morton_code(i: int, j: int) -> int:
    """Interleave bits: column bit b goes to 2b, row bit b to 2b + 1 (the reference's layout)."""
    z = 0
    for b in range(max(i.bit_length(), j.bit_length())):
        z |= ((j >> b) & 1) << (2 * b) | ((i >> b) & 1) << (2 * b + 1)
    return z


class ZCurve(_IndexPermuter):
    """Z-order (Morton) curve: recursively visits the four quadrants TL, TR, BL, BR.

    The reference stores the Morton codes themselves as the backward index, which is a
    permutation only on square power-of-two grids; other grids are refused.
    """

    def __init__(self, height: int, width: int):
        if height != width or not _is_power_of_two(height):
            raise ValueError(f"zcurve needs a square power-of-two grid, got {height}x{width}")
        codes = torch.tensor([_morton_code(i, j) for i in range(height) for j in range(width)])
        super().__init__(torch.argsort(codes), inverse=codes)


class Subsample(_IndexPermuter):
    """Coarse to fine: repeatedly split the grid into its four 2x2-strided sub-grids, so the
    first tokens read form a sparse lattice over the whole image. Needs a square power-of-two
    grid, as the reference halves until 1x1."""

    def __init__(self, height: int, width: int):
        if height != width or not _is_power_of_two(height):
            raise ValueError(f"subsample needs a square power-of-two grid, got {height}x{width}")
        ids = np.arange(height * width).reshape(1, height, width)  # (groups, h, w)
        g, h, w = ids.shape
        while h > 1:
            # (g, h/2, dy, w/2, dx) -> (g, dy, dx, h/2, w/2): each offset becomes its own group
            ids = ids.reshape(g, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3)
            g, h, w = g * 4, h // 2, w // 2
            ids = ids.reshape(g, h, w)
        super().__init__(torch.from_numpy(ids.ravel().copy()))


def _spiral_out_order(size: int) -> list[int]:
    """Row-major ids of a square walked from the centre outwards (the reference's spiral).

    Starts at (size/2, size/2 - 1) and turns clockwise (up, right, down, left) with arm
    lengths 1, 1, 2, 2, 3, 3, ...; the last arm is cut short when the grid is full, ending at
    the bottom-right corner.
    """
    moves = ((-1, 0), (0, 1), (1, 0), (0, -1))  # up, right, down, left
    i, j = size // 2, size // 2 - 1
    order = [i * size + j]
    arm = 0
    while len(order) < size * size:
        di, dj = moves[arm % 4]
        for _ in range(arm // 2 + 1):
            if len(order) == size * size:
                break
            i, j = i + di, j + dj
            order.append(i * size + j)
        arm += 1
    return order


def _check_spiral(name: str, height: int, width: int) -> None:
    # the reference's walk only covers even squares (on odd ones it leaves the grid)
    if height != width or height % 2:
        raise ValueError(f"{name} needs a square grid with an even side, got {height}x{width}")


class SpiralOut(_IndexPermuter):
    """From the centre outwards, clockwise."""

    def __init__(self, height: int, width: int):
        _check_spiral("spiral_out", height, width)
        super().__init__(torch.tensor(_spiral_out_order(height)))


class SpiralIn(_IndexPermuter):
    """From the bottom-right corner inwards: the outward spiral read backwards."""

    def __init__(self, height: int, width: int):
        _check_spiral("spiral_in", height, width)
        super().__init__(torch.tensor(_spiral_out_order(height)[::-1]))


class Random(_IndexPermuter):
    """A fixed random order; seed 1 with NumPy's RandomState reproduces the reference's."""

    def __init__(self, height: int, width: int, seed: int = 1):
        super().__init__(torch.from_numpy(np.random.RandomState(seed).permutation(height * width)))


PERMUTERS: dict[str, type[nn.Module]] = {
    "identity": Identity,
    "alternate": AlternateParsing,
    "zcurve": ZCurve,
    "subsample": Subsample,
    "spiral_in": SpiralIn,
    "spiral_out": SpiralOut,
    "random": Random,
}


def build_permuter(name: str, height: int, width: int) -> nn.Module:
    """The ordering called ``name`` for an ``height`` x ``width`` token grid."""
    if name not in PERMUTERS:
        raise ValueError(f"unknown permuter {name!r}; choose one of {sorted(PERMUTERS)}")
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    if name == "identity":
        return Identity()
    return PERMUTERS[name](height, width)
