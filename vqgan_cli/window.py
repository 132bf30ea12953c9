"""Sampling token grids larger than the prior's training crop with a sliding attention window.

Both schemes give every token a crop-sized window of context above and to its left (where the
image has it), with spatial conditioning tokens cut from the same window (PAPER.md):

- ``per-token``: the reference's exact placement. Position (i, j) is predicted by a full forward
  over the window starting at row ``i - li``, column ``j - lj`` with
  ``li = i if i < ch//2, ch - (H - i) if H - i < ch - ch//2, else ch//2`` (same for j): one
  window forward per output token.
- ``blockwise`` (default): the grid is cut into blocks, the first row/column of blocks a whole
  crop high/wide, the rest half a crop. Each block sits at the bottom-right corner of its own
  window, so everything the window holds before the block's tokens (in raster order) is already
  known: the window is prefilled once and the block's tokens are drawn with cached steps, the
  known tokens left of the block being fed between its rows. A block needs only the blocks up,
  left and up-left of it, so all blocks on one anti-diagonal (a wavefront) run as one batch,
  capped at ``max_rows`` rows so memory depends on the window, not on the image.

Raster order only: priors with another reading order are sampled at their crop size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vqgan_cli.models.gpt import GPT
from vqgan_cli.sampling import Guided, SamplingError, SamplingOptions, pick_tokens

WINDOW_MODES = ("blockwise", "per-token")
PRECISIONS = ("fp32", "bf16")
CACHE_BUDGET = 256 << 20  # bytes of key/value cache per wavefront batch (rows are capped by it)


def auto_rows(gpt: GPT, budget: int = CACHE_BUDGET) -> int:
    """Model rows per wavefront batch whose key/value caches fit in ``budget`` bytes."""
    c = gpt.cfg
    per_row = 2 * c.n_layer * c.block_size * c.n_embd * 4
    return max(1, budget // per_row)


def precision_context(gpt: GPT, precision: str) -> torch.autocast:
    """bf16 autocast (2-3x faster prefill on CPUs with avx512_bf16; tokens then differ from
    float32's) or plain float32."""
    if precision not in PRECISIONS:
        raise SamplingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = gpt.head.weight.device.type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Conditioning:
    """Conditioning tokens of a whole image: a spatial grid (B, H, W) that moves with the window,
    or fixed tokens (B, Lc) (start token, class); ``null_*``: the unconditional counterpart."""

    grid: torch.Tensor | None = None
    fixed: torch.Tensor | None = None
    null_grid: torch.Tensor | None = None
    null_fixed: torch.Tensor | None = None

    def _cut(self, grid: torch.Tensor | None, fixed: torch.Tensor | None,
             wins: list[tuple[int, int]], crop: tuple[int, int]) -> torch.Tensor | None:
        ch, cw = crop
        if grid is not None:
            parts = [grid[:, r:r + ch, c:c + cw] for r, c in wins]
            return torch.stack(parts, 1).reshape(grid.shape[0] * len(wins), ch * cw)
        if fixed is None:
            return None
        return fixed.repeat_interleave(len(wins), 0)

    def windows(self, wins: list[tuple[int, int]], crop: tuple[int, int]) -> torch.Tensor:
        """(B * len(wins), Lc) conditioning of each window, sample-major."""
        out = self._cut(self.grid, self.fixed, wins, crop)
        if out is None:
            raise SamplingError("no conditioning tokens given")
        return out

    def null_windows(self, wins: list[tuple[int, int]], crop: tuple[int, int]) -> torch.Tensor | None:
        return self._cut(self.null_grid, self.null_fixed, wins, crop)


class Block(NamedTuple):
    """Rows [r0, r1) x columns [c0, c1) of the grid, and the top-left corner of its window."""

    r0: int
    r1: int
    c0: int
    c1: int
    win_r: int
    win_c: int


def local_offset(i: int, size: int, crop: int) -> int:
    """The reference's ``li``: where position ``i`` sits inside its window (PAPER.md)."""
    half = crop // 2
    if i < half:
        return i
    if size - i < crop - half:
        return crop - (size - i)
    return half


def _edges(size: int, crop: int, step: int) -> list[tuple[int, int]]:
    return [(0, crop)] + [(e, min(e + step, size)) for e in range(crop, size, step)]


def plan_blocks(size: tuple[int, int], crop: tuple[int, int],
                step: tuple[int, int] | None = None) -> list[list[Block]]:
    """Blocks of a (H, W) grid grouped by anti-diagonal (each group can run as one batch)."""
    (H, W), (ch, cw) = size, crop
    sh, sw = step if step is not None else (max(1, ch // 2), max(1, cw // 2))
    rows, cols = _edges(H, ch, sh), _edges(W, cw, sw)
    diagonals: list[list[Block]] = [[] for _ in range(len(rows) + len(cols) - 1)]
    for p, (r0, r1) in enumerate(rows):
        for q, (c0, c1) in enumerate(cols):
            diagonals[p + q].append(Block(r0, r1, c0, c1, r1 - ch, c1 - cw))
    return diagonals


def check_grid(size: tuple[int, int], crop: tuple[int, int]) -> None:
    if size[0] < crop[0] or size[1] < crop[1]:
        raise SamplingError(f"a {size[1]}x{size[0]} token grid is smaller than the prior's "
                            f"{crop[1]}x{crop[0]} crop; sample at least the crop size")


def _known_mask(known: torch.Tensor | None, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    if known is None:
        return torch.zeros(size, dtype=torch.bool, device=device)
    return known.to(device=device, dtype=torch.bool)


@torch.no_grad()
def sample_per_token(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                     opts: SamplingOptions, generators: list[torch.Generator],
                     known: torch.Tensor | None = None, limit: int | None = None) -> torch.Tensor:
    """The reference's loop: one full window forward per token. ``init`` (B, H, W) holds the
    known tokens (where ``known`` (H, W) is true); ``limit`` stops after that many positions
    (for timing a subset)."""
    B, H, W = init.shape
    ch, cw = crop
    check_grid((H, W), crop)
    grid = init.clone().long()
    mask = _known_mask(known, (H, W), grid.device)
    g = Guided(gpt, opts.cfg_scale)
    done = 0
    for i in range(H):
        for j in range(W):
            if mask[i, j]:
                continue
            if limit is not None and done >= limit:
                return grid
            li, lj = local_offset(i, H, ch), local_offset(j, W, cw)
            win = [(i - li, j - lj)]
            patch = grid[:, i - li:i - li + ch, j - lj:j - lj + cw].reshape(B, ch * cw)
            c = cond.windows(win, crop)
            nc = cond.null_windows(win, crop)
            seq = g.join(torch.cat((c, patch), 1)[:, :-1],
                         None if nc is None else torch.cat((nc, patch), 1)[:, :-1])
            at = c.shape[1] - 1 + li * cw + lj  # the output that predicts local (li, lj)
            logits = g.mix(gpt(seq)[:, at])
            grid[:, i, j] = pick_tokens(logits, opts, generators)
            done += 1
    return grid


def block_generator(seed: int, block: Block, width: int) -> torch.Generator:
    """The random stream of one sample's block: seeded by the sample's seed and the block's
    place, so how blocks are batched (``max_rows``) never changes a token. The first block
    uses the sample's seed itself, so a crop-sized grid draws exactly what plain sampling does."""
    place = block.r0 * width + block.c0
    mixed = seed if place == 0 else (seed * 0x9E3779B97F4A7C15 + place) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def _group_by_shape(blocks: list[Block], max_windows: int) -> list[list[Block]]:
    """Blocks of one diagonal with the same shape share a step schedule; cap the batch."""
    shapes: dict[tuple[int, int], list[Block]] = {}
    for b in blocks:
        shapes.setdefault((b.r1 - b.r0, b.c1 - b.c0), []).append(b)
    out = []
    for group in shapes.values():
        out += [group[k:k + max_windows] for k in range(0, len(group), max_windows)]
    return out


@torch.no_grad()
def sample_blockwise(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                     opts: SamplingOptions, generators: list[torch.Generator],
                     known: torch.Tensor | None = None, max_rows: int | None = None,
                     step: tuple[int, int] | None = None, precision: str = "fp32") -> torch.Tensor:
    """Blockwise cached window sampling of a (B, H, W) grid; arguments as in sample_per_token.

    ``max_rows``: model rows per batch (windows x samples x 2 with guidance), by default what
    :data:`CACHE_BUDGET` holds; it bounds memory whatever the image size.
    """
    B, H, W = init.shape
    ch, cw = crop
    check_grid((H, W), crop)
    grid = init.clone().long()
    mask = _known_mask(known, (H, W), grid.device)
    rows = max_rows if max_rows is not None else auto_rows(gpt)
    max_windows = max(1, rows // (B * Guided(gpt, opts.cfg_scale).rows(1)))
    with precision_context(gpt, precision):
        for diagonal in plan_blocks((H, W), crop, step):
            for group in _group_by_shape(diagonal, max_windows):
                group = [b for b in group if not bool(mask[b.r0:b.r1, b.c0:b.c1].all())]
                if group:
                    _sample_group(gpt, cond, grid, mask, group, crop, opts, generators)
    return grid


def _sample_group(gpt: GPT, cond: Conditioning, grid: torch.Tensor, mask: torch.Tensor,
                  blocks: list[Block], crop: tuple[int, int], opts: SamplingOptions,
                  generators: list[torch.Generator]) -> None:
    """Fill same-shaped blocks in place: prefill their windows, then cached steps in raster order."""
    B = grid.shape[0]
    ch, cw = crop
    nw = len(blocks)
    wins = [(b.win_r, b.win_c) for b in blocks]
    patch = torch.stack([grid[:, r:r + ch, c:c + cw] for r, c in wins], 1)  # (B, nw, ch, cw)
    patch = patch.reshape(B * nw, ch * cw)  # sample-major rows, as pick_tokens groups them
    forced = torch.stack([mask[r:r + ch, c:c + cw] for r, c in wins]).reshape(nw, ch * cw)
    forced = forced.repeat(B, 1)  # (B * nw, ch * cw)
    top, left = blocks[0].r0 - blocks[0].win_r, blocks[0].c0 - blocks[0].win_c
    targets = [a * cw + b for a in range(top, ch) for b in range(left, cw)]
    gens = [block_generator(gen.initial_seed(), b, grid.shape[2]) for gen in generators for b in blocks]
    c = cond.windows(wins, crop)
    nc = cond.null_windows(wins, crop)
    g = Guided(gpt, opts.cfg_scale)
    cache = g.new_cache(B * nw, c.shape[1] + targets[-1])
    k0 = targets[0]
    logits = g.cached(g.join(torch.cat((c, patch[:, :k0]), 1),
                             None if nc is None else torch.cat((nc, patch[:, :k0]), 1)), cache)
    for t, k in enumerate(targets):
        tok = pick_tokens(logits, opts, gens)
        patch[:, k] = torch.where(forced[:, k], patch[:, k], tok)
        if t + 1 < len(targets):
            logits = g.cached(g.double(patch[:, k:targets[t + 1]]), cache)
    local = patch.view(B, nw, ch, cw)
    for w, b in enumerate(blocks):
        grid[:, b.r0:b.r1, b.c0:b.c1] = local[:, w, b.r0 - b.win_r:, b.c0 - b.win_c:]


def sample_window(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                  opts: SamplingOptions, generators: list[torch.Generator],
                  known: torch.Tensor | None = None, mode: str = "blockwise",
                  max_rows: int | None = None, precision: str = "fp32") -> torch.Tensor:
    """Dispatch to the chosen window scheme; (B, H, W) tokens out."""
    if mode == "blockwise":
        return sample_blockwise(gpt, cond, init, crop, opts, generators, known, max_rows,
                                precision=precision)
    if mode == "per-token":
        with precision_context(gpt, precision):
            return sample_per_token(gpt, cond, init, crop, opts, generators, known)
    raise SamplingError(f"--window must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")
