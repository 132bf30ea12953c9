"""Sampling token grids larger than the prior's training crop with a sliding attention window.

The reference (PAPER.md) predicts position (i, j) of an (H, W) grid with the model applied to the
crop-sized (ch, cw) window whose rows start at ``i - li`` and columns at ``j - lj``, where
``li = i if i < ch//2, ch - (H - i) if H - i < ch - ch//2, else ch//2`` (:func:`local_offset`;
same for j). Spatial conditioning tokens are cut from the same window; the prediction is the
model's output at position ``Lc - 1 + li*cw + lj`` (``Lc`` conditioning tokens). Two schemes:

- ``exact``: exactly that window and output position for every token, computed in batches.
  A token needs only the tokens of its window that precede it in raster order, so each token is
  scheduled one step after the latest of those (:func:`plan_windows`, a dynamic programme over
  the grid); all tokens of one step run as one batch of window forwards, each window fed only up
  to its output position (causal attention: later positions cannot change that output). The
  work is one window forward per token, as in the reference, minus the unused tail of each
  window and the last layer's unused rows; batching buys the rest.
- ``fast``: the same windows reused for several tokens through the key/value cache. The grid is
  cut into tiles: a tile is ``rows`` consecutive rows (a band) times ``segment`` consecutive
  columns. The tile's window is the reference's window of the band's first row and of the
  segment's *last* column (rows start ``b0 - li(b0)``, columns ``j_end - lj(j_end)``); it is
  prefilled once and then draws the tile's tokens row by row with cached steps, feeding the
  tokens of neighbouring tiles that fall inside the window between its rows. Against the
  reference's window, a token (i, c) of the tile sees:

  * above and to the right: at least the reference's columns (``cw - 1 - lj(c)`` right of it),
    plus ``d = lj(c) - (c - win_c)`` more (``d = j_end - c`` away from the borders);
  * to the left: ``d`` columns fewer than the reference (on its own row and the rows above):
    the first token of a segment of length s loses s - 1 columns in the interior, the last
    none;
  * above: rows from the band's window start, i.e. ``(i - li(i)) - (b0 - li(b0))`` more rows
    than the reference (``i - b0`` away from the borders), never fewer.

  Both are situations the prior was trained on (a token near the left edge, or low in its crop).
  With ``segment=1, rows=1`` every tile is one token with the reference's window, and ``fast``
  draws exactly what ``exact`` draws. Cost per token: one window of ``Lc + ch*cw`` positions per
  tile of up to ``(cw//2 + 1) * (ch - ch//2)`` tokens, against a window per token.

Random numbers: every sample owns one uniform number per grid position, drawn from its generator
in raster order before sampling (:func:`position_uniforms`), and a token is the inverse-CDF
lookup of its position's number. How tokens are batched therefore never changes a token: the
batched schemes draw exactly what the plain sequential loop (:func:`sample_sequential`) draws
with the same window. (At the crop size this is also exactly what :func:`sample_sequence` draws.)

Raster order only: priors with another reading order are sampled at their crop size.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from vqgan_cli.models.gpt import GPT, LayerKV
from vqgan_cli.sample.choices import DEFAULT_MEMORY_MIB, DEFAULT_WINDOW, WINDOW_MODES  # noqa: F401
from vqgan_cli.sample.tokens import Guided, SamplingError, SamplingOptions, draw_tokens

DEFAULT_SEGMENT: int | None = None  # None: the widest segment that keeps the context, cw//2 + 1
PRECISIONS = ("fp32", "bf16")


@contextmanager
def precision_context(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """fp32: nothing changes. bf16: autocast, with every Linear weight of ``model`` cast to bf16
    once for the duration (restored on exit). Sampling runs without gradients, and autocast then
    re-casts each weight at every call (its cast cache only serves tensors that record
    gradients); casting once gives the same numbers without that cost. bf16 is 2-3x faster on
    CPUs with avx512_bf16; its tokens differ from float32's."""
    if precision not in PRECISIONS:
        raise SamplingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    dev = next(model.parameters()).device.type
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    saved = [(m.weight.data, None if m.bias is None else m.bias.data) for m in linears]
    try:
        for m in linears:
            m.weight.data = m.weight.data.to(torch.bfloat16)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(torch.bfloat16)
        with torch.autocast(dev, dtype=torch.bfloat16):
            yield
    finally:
        for m, (w, b) in zip(linears, saved, strict=True):
            m.weight.data = w
            if b is not None:
                m.bias.data = b


# --------------------------------------------------------------------------------------------
# the reference's window rule


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
        raise SamplingError(f"--size: a {size[1]}x{size[0]} token grid is smaller than the prior's "
                            f"{crop[1]}x{crop[0]} crop; sample at least the crop size")


def max_segment(crop: tuple[int, int]) -> int:
    """The widest segment whose last token keeps the reference's above-right context."""
    return crop[1] // 2 + 1


def max_rows(crop: tuple[int, int]) -> int:
    """The tallest band: ``ch - ch//2`` rows fit below the reference's row offset."""
    return crop[0] - crop[0] // 2


# --------------------------------------------------------------------------------------------
# conditioning and random numbers


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
            return _cut(grid, rows, cols, crop)
        if fixed is None:
            return None
        return fixed[None].expand(len(rows), -1, -1)


def _cut(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
         crop: tuple[int, int]) -> torch.Tensor:
    """(n, B, ch*cw) crops of ``grid`` (B, H, W) whose top-left corners are rows/cols (n,)."""
    ch, cw = crop
    dev = grid.device
    r = rows.to(dev)[:, None] + torch.arange(ch, device=dev)  # (n, ch)
    c = cols.to(dev)[:, None] + torch.arange(cw, device=dev)  # (n, cw)
    crops = grid[:, r[:, :, None], c[:, None, :]]  # (B, n, ch, cw)
    return crops.permute(1, 0, 2, 3).reshape(len(rows), grid.shape[0], ch * cw)


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
        raise SamplingError(f"--segment must be in [1, {max_segment(crop)}] for a prior whose crop "
                            f"is {cw} tokens wide (longer segments lose the above-right context), "
                            f"got {segment}")
    if not 1 <= rows <= ch:
        raise SamplingError(f"rows must be in [1, {ch}], got {rows}")
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


# --------------------------------------------------------------------------------------------
# memory


def _elem(gpt: GPT) -> int:
    dev = gpt.head.weight.device.type
    return 2 if torch.is_autocast_enabled(dev) else gpt.head.weight.element_size()


def forward_bytes(gpt: GPT, length: int) -> int:
    """Activation memory of one window forward of ``length`` tokens (one batch row)."""
    c = gpt.cfg
    return 4 * length * (12 * c.n_embd + 2 * c.n_head * min(length, 256))


def cache_bytes(gpt: GPT, length: int, elem: int = 4) -> int:
    """Keys and values of ``length`` positions, every layer (one batch row)."""
    c = gpt.cfg
    return 2 * c.n_layer * length * c.n_embd * elem


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_window(gpt: GPT, lc: int, size: tuple[int, int], crop: tuple[int, int], mode: str,
                 batch: int, guided: bool, memory_mib: float | None = None,
                 segment: int | None = None, rows: int | None = None,
                 known: torch.Tensor | None = None) -> WindowPlan:
    """Every check of a window run, before any sampling; returns the plan. Raises SamplingError
    naming the option to change."""
    if mode not in WINDOW_MODES:
        raise SamplingError(f"--window must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")
    check_grid(size, crop)
    window = lc + crop[0] * crop[1] - 1
    if window > gpt.block_size:
        raise SamplingError(f"a {crop[1]}x{crop[0]} window with {lc} conditioning tokens needs "
                            f"{window} positions; the prior's block size is {gpt.block_size}")
    budget = (DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib) * 2**20
    per_window = (2 if guided else 1) * batch
    if mode == "exact":
        need = per_window * forward_bytes(gpt, window)
        if need > budget:
            raise SamplingError(
                f"--window-memory {budget / 2**20:g} MiB cannot hold one window forward "
                f"({per_window} rows of {window} tokens need {_mib(need)}); raise --window-memory "
                f"to at least {need / 2**20:.1f} or lower --batch-size")
        return plan_windows(size, crop, known)
    seg = max_segment(crop) if segment is None else segment
    plan = plan_windows(size, crop, known, seg, max_rows(crop) if rows is None else rows)
    per_row = cache_bytes(gpt, window + 1, _elem(gpt))
    pool = plan.max_live_tiles() * per_window * per_row
    need = pool + per_window * (per_row + forward_bytes(gpt, window))
    if need > budget:
        raise SamplingError(
            f"--window-memory {budget / 2**20:g} MiB cannot hold the fast window's caches "
            f"({plan.max_live_tiles()} tiles live at once x {per_window} rows need {_mib(need)}); "
            f"raise --window-memory to at least {need / 2**20:.1f}, lower --batch-size, "
            "or use --window exact")
    return plan


# --------------------------------------------------------------------------------------------
# forwards that compute only what a window's output needs


def _last_block(blk: torch.nn.Module, x: torch.Tensor, hq: torch.Tensor, xq: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The last block for one query row per sequence: ``hq``/``xq`` (N, 1, C) its normed input
    and residual, ``k``/``v`` (N, nh, L, hs) the keys/values it attends to."""
    a = blk.attn
    q = a._heads(a.query(hq))  # (N, nh, 1, hs)
    y = _attend(q, k, v, mask)  # (N, nh, 1, hs)
    y = y.transpose(1, 2).reshape(xq.shape)  # (N, 1, C)
    xq = xq + a.proj(y)
    return xq + blk.mlp(blk.ln2(xq))


def forward_last(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) of the last position of ``idx`` (N, T): the plain forward, except that the
    last block computes its query, attention output and MLP for that position only."""
    N, T = idx.shape
    x = gpt.drop(gpt.tok_emb(idx) + gpt.pos_emb[:, :T])  # (N, T, C)
    for blk in gpt.blocks[:-1]:
        x = blk(x)
    blk = gpt.blocks[-1]
    h = blk.ln1(x)
    k, v = blk.attn._heads(blk.attn.key(h)), blk.attn._heads(blk.attn.value(h))  # (N, nh, T, hs)
    x = _last_block(blk, x, h[:, -1:], x[:, -1:], k, v, None)  # the last query sees everything
    return gpt.head(gpt.ln_f(x[:, 0]))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``q`` (N, nh, T, hs) over ``k``/``v`` (N, nh, L, hs) where ``mask`` (N, 1,
    T, L) allows. One query row: plain matmuls (the fused kernel's set-up costs more than the
    maths); several: the fused kernel."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    if q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, nh, 1, L)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


def forward_rows(gpt: GPT, idx: torch.Tensor, start: torch.Tensor, last: int | torch.Tensor,
                 kv: list[LayerKV], sel: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, V) at position ``last`` of each row of ``idx`` (N, T), fed through the caches
    ``kv`` (each layer (S, nh, P, hs); position P - 1 is a scratch slot) at their rows ``sel``
    (N,; all S rows in order when None). Row n's tokens sit at positions ``start[n] + t``,
    after its cached positions, and are written into its cache; rows may start at different
    positions. Tokens past a row's ``last`` write keys/values beyond it, which that row's next
    feed overwrites before anything attends to them."""
    N, T = idx.shape
    P = kv[0].k.shape[2]
    dev = idx.device
    pos = start[:, None] + torch.arange(T, device=dev)  # (N, T)
    x = gpt.tok_emb(idx) + gpt.pos_emb[0, pos.clamp(max=gpt.block_size - 1)]  # (N, T, C)
    # whole (contiguous) cache rows: a slice of them would be copied by every matmul; the mask
    # hides the positions not yet written, and the scratch slot (queries sit below P - 1)
    allowed = torch.arange(P, device=dev)[None, None, :] <= pos[:, :, None]  # (N, T, P)
    rows = torch.arange(N, device=dev)
    at = sel if sel is not None else rows
    last = torch.as_tensor(last, device=dev).expand(N)
    write = pos.clamp(max=P - 1)
    for n, blk in enumerate(gpt.blocks):
        a = blk.attn
        h = blk.ln1(x)
        k, v = a._heads(a.key(h)), a._heads(a.value(h))  # (N, nh, T, hs)
        layer = kv[n]
        layer.k[at[:, None], :, write] = k.transpose(1, 2).to(layer.k.dtype)
        layer.v[at[:, None], :, write] = v.transpose(1, 2).to(layer.v.dtype)
        ks, vs = (layer.k, layer.v) if sel is None else (layer.k[sel], layer.v[sel])  # (N, nh, P, hs)
        if n + 1 < len(gpt.blocks):
            q = a._heads(a.query(h))
            y = _attend(q, ks, vs, allowed[:, None])
            x = x + a.proj(y.transpose(1, 2).reshape(x.shape))
            x = x + blk.mlp(blk.ln2(x))
        else:
            hq, xq = h[rows, last][:, None], x[rows, last][:, None]  # (N, 1, C)
            x = _last_block(blk, x, hq, xq, ks, vs, allowed[rows, last][:, None, None])
    return gpt.head(gpt.ln_f(x[:, 0]))


# --------------------------------------------------------------------------------------------
# samplers


class _Batch:
    """Rows of a batch of units: (unit, half, sample) with half 0 the conditional sequence and
    1 the unconditional one (guidance). Builds window sequences and draws tokens."""

    def __init__(self, gpt: GPT, cond: Conditioning, grid: torch.Tensor, u: torch.Tensor,
                 known: torch.Tensor | None, crop: tuple[int, int], opts: SamplingOptions):
        self.gpt, self.cond, self.grid, self.u, self.crop, self.opts = gpt, cond, grid, u, crop, opts
        self.known = known
        self.g = Guided(gpt, opts.cfg_scale)
        self.halves = 2 if self.g.doubled else 1
        self.B = grid.shape[0]
        self.lc = cond.length(crop)

    @property
    def per_unit(self) -> int:
        return self.halves * self.B

    def sequences(self, units: list[Unit]) -> torch.Tensor:
        """(n * halves * B, Lc + ch*cw): each unit's window, conditioning then image tokens."""
        r = torch.tensor([u.win_r for u in units])
        c = torch.tensor([u.win_c for u in units])
        patch = _cut(self.grid, r, c, self.crop)  # (n, B, ch*cw)
        parts = [torch.cat((self.cond.windows(r, c, self.crop), patch), 2)]
        if self.halves == 2:
            null = self.cond.windows(r, c, self.crop, null=True)
            if null is None:
                raise SamplingError("--cfg-scale needs unconditional (null) conditioning tokens")
            parts.append(torch.cat((null, patch), 2))
        seq = torch.stack(parts, 1)  # (n, halves, B, L)
        return seq.reshape(-1, seq.shape[-1])

    def draw(self, logits: torch.Tensor, units: list[Unit], offset: int) -> torch.Tensor:
        """Draw token ``offset`` of every unit (units shorter than that draw nothing) from
        logits (n * halves * B, V); write them into the grid; return them (n * halves * B,)."""
        n, B = len(units), self.B
        logits = logits.view(n, self.halves, B, -1)
        if self.halves == 2:
            c, u = logits.float().unbind(1)
            mixed = u + self.g.scale * (c - u)
        else:
            mixed = logits[:, 0]
        live = [k for k, un in enumerate(units) if un.c0 + offset < un.c1]
        rows = torch.tensor([units[k].row for k in live])
        cols = torch.tensor([units[k].c0 + offset for k in live])
        uu = self.u[:, rows, cols].T  # (len(live), B)
        tok = draw_tokens(mixed[live].reshape(len(live) * B, -1), self.opts, uu.reshape(-1))
        tok = tok.view(len(live), B).to(self.grid.device)
        if self.known is not None:
            keep = self.known[rows, cols].to(self.grid.device)[:, None]
            tok = torch.where(keep, self.grid[:, rows, cols].T, tok)
        self.grid[:, rows, cols] = tok.T
        out = torch.zeros(n, B, dtype=torch.long, device=self.grid.device)
        out[live] = tok
        return out[:, None].expand(n, self.halves, B).reshape(-1)


def _chunks(units: list[Unit], size: int) -> list[list[Unit]]:
    return [units[k:k + size] for k in range(0, len(units), size)]


def _prepare(init: torch.Tensor, known: torch.Tensor | None, generators: list[torch.Generator],
             crop: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    B, H, W = init.shape
    check_grid((H, W), crop)
    if len(generators) != B:
        raise SamplingError(f"{len(generators)} generators for a batch of {B}")
    grid = init.clone().long()
    kn = None if known is None else known.to(device=grid.device, dtype=torch.bool)
    return grid, position_uniforms(generators, (H, W)), kn


@torch.no_grad()
def sample_sequential(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                      opts: SamplingOptions, generators: list[torch.Generator],
                      known: torch.Tensor | None = None, limit: int | None = None) -> torch.Tensor:
    """The reference's loop, as the reference runs it: positions in raster order, each predicted
    by a full forward over its whole window (``cat(c, patch)[:, :-1]``) at batch size one per
    sample. ``init`` (B, H, W) holds the known tokens (where ``known`` (H, W) is true);
    ``limit`` stops after that many positions (to time a part)."""
    B, H, W = init.shape
    ch, cw = crop
    grid, u, kn = _prepare(init, known, generators, crop)
    g = Guided(gpt, opts.cfg_scale)
    done = 0
    for i in range(H):
        for j in range(W):
            if kn is not None and kn[i, j]:
                continue
            if limit is not None and done >= limit:
                return grid
            li, lj = local_offset(i, H, ch), local_offset(j, W, cw)
            r, c = torch.tensor([i - li]), torch.tensor([j - lj])
            patch = grid[:, i - li:i - li + ch, j - lj:j - lj + cw].reshape(B, ch * cw)
            cw_ = cond.windows(r, c, crop)[0]
            nw_ = cond.windows(r, c, crop, null=True) if g.doubled else None
            seq = g.join(torch.cat((cw_, patch), 1)[:, :-1],
                         None if nw_ is None else torch.cat((nw_[0], patch), 1)[:, :-1])
            at = cw_.shape[1] - 1 + li * cw + lj  # the output that predicts local (li, lj)
            logits = g.mix(gpt(seq)[:, at])
            grid[:, i, j] = draw_tokens(logits, opts, u[:, i, j]).to(grid.device)
            done += 1
    return grid


def _budget(memory_mib: float | None) -> float:
    return (DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib) * 2**20


@torch.no_grad()
def sample_exact(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                 opts: SamplingOptions, generators: list[torch.Generator],
                 known: torch.Tensor | None = None, memory_mib: float | None = None,
                 plan: WindowPlan | None = None) -> torch.Tensor:
    """The reference's windows and outputs, batched by step (module docstring). Draws exactly
    what :func:`sample_sequential` draws (float32; up to float rounding between batch sizes)."""
    ch, cw = crop
    grid, u, kn = _prepare(init, known, generators, crop)
    batch = _Batch(gpt, cond, grid, u, kn, crop, opts)
    plan = plan or plan_windows(grid.shape[1:], crop, known)
    window = batch.lc + ch * cw - 1
    per_unit = batch.per_unit * forward_bytes(gpt, window)
    max_units = int(_budget(memory_mib) // per_unit)
    if max_units < 1:
        raise SamplingError(f"--window-memory cannot hold one window forward ({_mib(per_unit)}); "
                            "raise it or lower --batch-size")
    for units in plan.by_step():
        groups: dict[int, list[Unit]] = defaultdict(list)
        for un in units:  # same output position = same length: no padding, no mask
            groups[(un.row - un.win_r) * cw + un.c0 - un.win_c].append(un)
        for k, same in groups.items():
            for part in _chunks(same, max_units):
                seq = batch.sequences(part)[:, :batch.lc + k]  # up to the output position
                batch.draw(forward_last(gpt, seq), part, 0)
    return grid


@torch.no_grad()
def sample_fast(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                opts: SamplingOptions, generators: list[torch.Generator],
                known: torch.Tensor | None = None, segment: int | None = None,
                rows: int | None = None, memory_mib: float | None = None,
                plan: WindowPlan | None = None) -> torch.Tensor:
    """Tiles of ``rows`` x ``segment`` tokens, one cached window each (module docstring).
    ``segment`` defaults to the widest that keeps the context (``cw//2 + 1``), ``rows`` to the
    tallest band (``ch - ch//2``)."""
    ch, cw = crop
    grid, u, kn = _prepare(init, known, generators, crop)
    batch = _Batch(gpt, cond, grid, u, kn, crop, opts)
    seg = max_segment(crop) if segment is None else segment
    plan = plan or plan_windows(grid.shape[1:], crop, known, seg, max_rows(crop) if rows is None else rows)
    R, lc = batch.per_unit, batch.lc
    P = lc + ch * cw  # window positions (lc + ch*cw - 1) and a scratch slot
    dev = grid.device
    dtype = torch.bfloat16 if torch.is_autocast_enabled(dev.type) else gpt.head.weight.dtype
    c = gpt.cfg
    n_slots = max(plan.max_live_tiles(), 1)
    shape = (n_slots * R, c.n_head, P, c.head_dim)
    pool = [LayerKV(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
            for _ in range(c.n_layer)]
    per_unit = R * (cache_bytes(gpt, P, _elem(gpt)) + forward_bytes(gpt, P))
    pool_bytes = n_slots * R * cache_bytes(gpt, P, _elem(gpt))
    max_units = int((_budget(memory_mib) - pool_bytes) // per_unit)
    if max_units < 1:
        raise SamplingError(f"--window-memory cannot hold the fast window's caches "
                            f"({_mib(pool_bytes + per_unit)}); raise it, lower --batch-size, "
                            "or use --window exact")
    free = list(range(n_slots))[::-1]
    slot: dict[int, int] = {}
    filled: dict[int, int] = {}  # tile -> positions of its window already in its cache
    index = {id(un): n for n, un in enumerate(plan.units)}
    for units in plan.by_step():
        for part in _chunks(units, max_units):
            for un in part:
                if un.tile not in slot:
                    slot[un.tile] = free.pop()
                    filled[un.tile] = 0
            sel = torch.tensor([slot[un.tile] * R + k for un in part for k in range(R)], device=dev)
            first = torch.tensor([lc + (un.row - un.win_r) * cw + un.c0 - un.win_c for un in part])
            start = torch.tensor([filled[un.tile] for un in part])
            first_r, start_r = first.repeat_interleave(R), start.repeat_interleave(R)
            length = first_r - start_r  # tokens to feed before each unit's first output
            seq = batch.sequences(part)  # (n * R, P)
            kv = [LayerKV(layer.k[sel], layer.v[sel]) for layer in pool]  # this part's caches
            logits = None
            for L in sorted(set(length.tolist())):  # equal lengths together: no padding
                rows_l = (length == L).nonzero()[:, 0]
                take = start_r[rows_l, None] + torch.arange(L)
                out = forward_rows(gpt, seq[rows_l.to(dev)].gather(1, take.to(dev)),
                                   start_r[rows_l].to(dev), L - 1, kv, rows_l.to(dev))
                if logits is None:
                    logits = out.new_empty(len(sel), out.shape[1])
                logits[rows_l.to(dev)] = out
            n_tok = max(un.c1 - un.c0 for un in part)
            for t in range(n_tok):
                tok = batch.draw(logits, part, t)
                if t + 1 < n_tok:
                    logits = forward_rows(gpt, tok[:, None], (first_r + t).to(dev), 0, kv)
            for layer, mine in zip(pool, kv, strict=True):
                layer.k[sel] = mine.k
                layer.v[sel] = mine.v
            for un, f in zip(part, first.tolist(), strict=True):
                filled[un.tile] = f + un.c1 - un.c0 - 1  # the last drawn token is not fed yet
                if plan.last_of_tile[un.tile] == index[id(un)]:
                    free.append(slot.pop(un.tile))
    return grid


def sample_window(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                  opts: SamplingOptions, generators: list[torch.Generator],
                  known: torch.Tensor | None = None, mode: str = DEFAULT_WINDOW,
                  segment: int | None = DEFAULT_SEGMENT, rows: int | None = None,
                  precision: str = "fp32", memory_mib: float | None = None) -> torch.Tensor:
    """Sample a (B, H, W) grid with the chosen window scheme; (B, H, W) tokens out.

    ``segment``/``rows``: ``fast``'s tile (ignored by ``exact``). ``memory_mib``: bound on the
    window batches (and fast's caches), :data:`DEFAULT_MEMORY_MIB` by default."""
    B, H, W = init.shape
    with precision_context(gpt, precision):
        plan = check_window(gpt, cond.length(crop), (H, W), crop, mode, B, opts.guided, memory_mib,
                            segment, rows, known)
        if mode == "exact":
            return sample_exact(gpt, cond, init, crop, opts, generators, known, memory_mib, plan)
        return sample_fast(gpt, cond, init, crop, opts, generators, known, segment, rows,
                           memory_mib, plan)
