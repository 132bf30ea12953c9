"""Where each token's window sits and when it can be computed: the reference's window rule
(PAPER.md), the random number of every grid position, and the dependency schedule that lets
the ``exact`` and ``fast`` schemes (:mod:`vqgan_cli.sample.window`) batch their windows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vqgan_cli.sample.tokens import SamplingError

# --------------------------------------------------------------------------------------------
# the reference's window rule

# Called after every step of a sampler with the grid (B, H, W) as drawn so far, the number of
# leading rows that are complete and the number of tokens drawn: lets a caller show partial
# images or stop the work (by raising) without the sampler knowing about either.
StepHook = Callable[[torch.Tensor, int, int], None]


def local_offset(i: int, size: int, crop: int) -> int:
    """The reference's ``li``: where position ``i`` sits inside its window (PAPER.md)."""
    half = crop // 2
    if i < half:
        return i
    if size - i < crop - half:
        return crop - (size - i)
    return half


def window_start(i: int, size: int, crop: int) -> int:
    """First row (column) of the reference's window for row (column) ``i``."""
    return i - local_offset(i, size, crop)


def check_grid(size: tuple[int, int], crop: tuple[int, int]) -> None:
    if size[0] < crop[0] or size[1] < crop[1]:
        raise SamplingError(f"`size`: a {size[1]}x{size[0]} token grid is smaller than the prior's "
                            f"{crop[1]}x{crop[0]} crop; sample at least the crop size")


def max_segment(crop: tuple[int, int]) -> int:
    """The widest segment whose last token keeps the reference's above-right context."""
    return crop[1] // 2 + 1


def max_rows(crop: tuple[int, int]) -> int:
    """The tallest band: ``ch - ch//2`` rows fit below the reference's row offset."""
    return crop[0] - crop[0] // 2


def position_uniforms(generators: list[torch.Generator], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) uniform numbers: sample b's generator, drawn in raster order. Position (i, j)
    of sample b is always drawn with ``u[b, i, j]``, whichever batch computes it."""
    H, W = size
    return torch.stack([torch.rand(H * W, generator=g) for g in generators]).view(-1, H, W)


def _known_np(known: torch.Tensor | None, size: tuple[int, int]) -> np.ndarray:
    if known is None:
        return np.zeros(size, dtype=bool)
    return known.detach().cpu().numpy().astype(bool)


# --------------------------------------------------------------------------------------------
# the plan: units of work, their windows, and the step at which each can run


@dataclass(frozen=True)
class Unit:
    """Tokens (row, c0..c1-1) drawn with the window whose top-left corner is (win_r, win_c);
    ``tile``: the window (and key/value cache) it shares with the other rows of its band."""

    row: int
    c0: int
    c1: int
    win_r: int
    win_c: int
    tile: int
    step: int


@dataclass
class WindowPlan:
    """Units in raster order of their first token, and the step of every grid position
    (``steps``; -1 where the token is known). A unit runs one step after the latest unit that
    holds a token of its window preceding its own first token (raster order)."""

    size: tuple[int, int]
    crop: tuple[int, int]
    units: list[Unit]
    steps: np.ndarray
    n_steps: int
    last_of_tile: dict[int, int] = field(default_factory=dict)  # tile -> index of its last unit

    def by_step(self) -> list[list[Unit]]:
        out: list[list[Unit]] = [[] for _ in range(self.n_steps)]
        for u in self.units:
            out[u.step].append(u)
        return out

    def max_live_tiles(self) -> int:
        """Most tiles whose cache must be kept at once (from a tile's first to last step)."""
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for u in self.units:
            first.setdefault(u.tile, u.step)
            last[u.tile] = u.step
        delta = np.zeros(self.n_steps + 1, dtype=np.int64)
        for t, s in first.items():
            delta[s] += 1
            delta[last[t] + 1] -= 1
        return int(np.cumsum(delta).max()) if first else 0

    def progress(self) -> tuple[np.ndarray, np.ndarray]:
        """Per step: (leading rows complete, tokens drawn) once that step has run."""
        n = max(self.n_steps, 1)
        row_last = np.maximum.accumulate(self.steps.max(axis=1))  # step finishing rows 0..i
        rows = np.searchsorted(row_last, np.arange(n), side="right")
        drawn = np.bincount(self.steps[self.steps >= 0].ravel(), minlength=n)
        return rows, np.cumsum(drawn)


def _bands(H: int, ch: int, rows: int) -> list[tuple[int, int, int]]:
    """(first row, end row, window row) of each band: the window of the band's first row, and
    as many of the following rows as fit in it (at most ``rows``)."""
    out, b0 = [], 0
    while b0 < H:
        li = local_offset(b0, H, ch)
        b1 = min(b0 + rows, b0 + ch - li, H)
        out.append((b0, b1, b0 - li))
        b0 = b1
    return out


def _segments(W: int, cw: int, segment: int) -> list[tuple[int, int, int]]:
    """(first column, end column, window column) of each segment: the window of the segment's
    last column, the segment as long as ``segment`` and as still fits in that window."""
    out, j0 = [], 0
    while j0 < W:
        j1 = min(j0 + segment, W)  # exclusive end
        while window_start(j1 - 1, W, cw) > j0:
            j1 -= 1
        out.append((j0, j1, window_start(j1 - 1, W, cw)))
        j0 = j1
    return out


def plan_windows(size: tuple[int, int], crop: tuple[int, int], known: torch.Tensor | None = None,
                 segment: int = 1, rows: int = 1) -> WindowPlan:
    """Units, windows and steps of a (H, W) grid. ``segment=1, rows=1``: the ``exact`` scheme
    (a unit per token, the reference's window); larger values: ``fast``'s tiles."""
    H, W = size
    ch, cw = crop
    check_grid(size, crop)
    if not 1 <= segment <= max_segment(crop):
        raise SamplingError(f"`segment` must be in [1, {max_segment(crop)}] for a prior whose crop "
                            f"is {cw} tokens wide (longer segments lose the above-right context), "
                            f"got {segment}")
    if not 1 <= rows <= ch:
        raise SamplingError(f"`band_rows` must be in [1, {ch}] (the crop height), got {rows}")
    kn = _known_np(known, size)
    steps = np.full((H, W), -1, dtype=np.int64)
    bands, segs = _bands(H, ch, rows), _segments(W, cw, segment)
    units: list[Unit] = []
    last_of_tile: dict[int, int] = {}
    for b, (b0, b1, wr) in enumerate(bands):
        for i in range(b0, b1):
            for s, (j0, j1, wc) in enumerate(segs):
                todo = ~kn[i, j0:j1]
                if not todo.any():
                    continue
                dep = max(steps[wr:i, wc:wc + cw].max(initial=-1), steps[i, wc:j0].max(initial=-1))
                step = int(dep) + 1
                steps[i, j0:j1][todo] = step
                tile = b * len(segs) + s
                last_of_tile[tile] = len(units)
                units.append(Unit(i, j0, j1, wr, wc, tile, step))
    n_steps = int(steps.max()) + 1 if units else 0
    return WindowPlan(size, crop, units, steps, n_steps, last_of_tile)

