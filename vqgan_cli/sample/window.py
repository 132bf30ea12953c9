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
  window, the last layer's unused rows, and the conditioning part of windows whose conditioning
  crop another window of the step has (computed once); batching buys the rest.
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

from collections import defaultdict

import torch

from vqgan_cli.models.gpt import GPT
from vqgan_cli.sample.choices import DEFAULT_MEMORY_MIB, DEFAULT_WINDOW, WINDOW_MODES
from vqgan_cli.sample.conditioning import Conditioning, cut
from vqgan_cli.sample.schedule import (
    StepHook,
    Unit,
    WindowPlan,
    check_grid,
    local_offset,
    max_rows,
    max_segment,
    plan_windows,
    position_uniforms,
)
from vqgan_cli.sample.tokens import Guided, SamplingError, SamplingOptions, draw_tokens, mix
from vqgan_cli.sample.window_forward import (
    PrefixStore,
    as_mib,
    cache_bytes,
    element_size,
    forward_bytes,
    forward_rows,
    forward_windows,
    new_caches,
    precision_context,
    prefill_shared,
    put_rows,
    take_rows,
)

DEFAULT_SEGMENT: int | None = None  # None: the widest segment that keeps the context, cw//2 + 1


def check_window(gpt: GPT, lc: int, size: tuple[int, int], crop: tuple[int, int], mode: str,
                 batch: int, guided: bool, memory_mib: float | None = None,
                 segment: int | None = None, rows: int | None = None,
                 known: torch.Tensor | None = None) -> WindowPlan:
    """Every check of a window run, before any sampling; returns the plan. Raises SamplingError
    naming the option to change."""
    if mode not in WINDOW_MODES:
        raise SamplingError(f"`window` must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")
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
                f"`window_memory` {budget / 2**20:g} MiB cannot hold one window forward "
                f"({per_window} rows of {window} tokens need {as_mib(need)}); raise `window_memory` "
                f"to at least {need / 2**20:.1f} or lower `batch_size`")
        return plan_windows(size, crop, known)
    seg = max_segment(crop) if segment is None else segment
    plan = plan_windows(size, crop, known, seg, max_rows(crop) if rows is None else rows)
    per_row = cache_bytes(gpt, window + 1, element_size(gpt))
    pool = plan.max_live_tiles() * per_window * per_row
    need = pool + per_window * (per_row + forward_bytes(gpt, window))
    if need > budget:
        raise SamplingError(
            f"`window_memory` {budget / 2**20:g} MiB cannot hold the fast window's caches "
            f"({plan.max_live_tiles()} tiles live at once x {per_window} rows need {as_mib(need)}); "
            f"raise `window_memory` to at least {need / 2**20:.1f}, lower `batch_size`, "
            "or use `window` exact")
    return plan


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
        patch = cut(self.grid, r, c, self.crop)  # (n, B, ch*cw)
        parts = [torch.cat((self.cond.windows(r, c, self.crop), patch), 2)]
        if self.halves == 2:
            null = self.cond.windows(r, c, self.crop, null=True)
            if null is None:
                raise SamplingError("`cfg_scale` needs unconditional (null) conditioning tokens")
            parts.append(torch.cat((null, patch), 2))
        seq = torch.stack(parts, 1)  # (n, halves, B, L)
        return seq.reshape(-1, seq.shape[-1])

    def draw(self, logits: torch.Tensor, units: list[Unit], offset: int) -> torch.Tensor:
        """Draw token ``offset`` of every unit (units shorter than that draw nothing) from
        logits (n * halves * B, V); write them into the grid; return them (n * halves * B,)."""
        n, B = len(units), self.B
        # rows (unit, half, sample) -> (half, unit, sample): every conditional row first
        halves_first = logits.view(n, self.halves, B, -1).transpose(0, 1).reshape(self.halves * n * B, -1)
        mixed = mix(halves_first, self.g.scale).view(n, B, -1)
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
                 plan: WindowPlan | None = None, on_step: StepHook | None = None) -> torch.Tensor:
    """The reference's windows and outputs, batched by step (module docstring). Draws exactly
    what :func:`sample_sequential` draws (float32; up to float rounding between batch sizes).
    ``on_step``: called after every step (:data:`StepHook`)."""
    ch, cw = crop
    grid, u, kn = _prepare(init, known, generators, crop)
    batch = _Batch(gpt, cond, grid, u, kn, crop, opts)
    plan = plan or plan_windows(grid.shape[1:], crop, known)
    window = batch.lc + ch * cw - 1
    per_unit = batch.per_unit * forward_bytes(gpt, window)
    max_units = int(_budget(memory_mib) // per_unit)
    if max_units < 1:
        raise SamplingError(f"`window_memory` cannot hold one window forward ({as_mib(per_unit)}); "
                            "raise it or lower `batch_size`")
    rows_done, drawn = plan.progress()
    fused = gpt.fused()  # once per run, from the weights of the precision the run computes in
    for step, units in enumerate(plan.by_step()):
        groups: dict[int, list[Unit]] = defaultdict(list)
        for un in units:  # same output position = same length: no padding, no mask
            groups[(un.row - un.win_r) * cw + un.c0 - un.win_c].append(un)
        for k, same in groups.items():
            for part in _chunks(same, max_units):
                seq = batch.sequences(part)[:, :batch.lc + k]  # up to the output position
                batch.draw(forward_windows(gpt, seq, batch.lc, fused), part, 0)
        if on_step is not None:
            on_step(grid, int(rows_done[step]), int(drawn[step]))
    return grid


@torch.no_grad()
def sample_fast(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                opts: SamplingOptions, generators: list[torch.Generator],
                known: torch.Tensor | None = None, segment: int | None = None,
                rows: int | None = None, memory_mib: float | None = None,
                plan: WindowPlan | None = None, on_step: StepHook | None = None) -> torch.Tensor:
    """Tiles of ``rows`` x ``segment`` tokens, one cached window each (module docstring).
    ``segment`` defaults to the widest that keeps the context (``cw//2 + 1``), ``rows`` to the
    tallest band (``ch - ch//2``). ``on_step``: called after every step (:data:`StepHook`)."""
    ch, cw = crop
    grid, u, kn = _prepare(init, known, generators, crop)
    batch = _Batch(gpt, cond, grid, u, kn, crop, opts)
    seg = max_segment(crop) if segment is None else segment
    plan = plan or plan_windows(grid.shape[1:], crop, known, seg, max_rows(crop) if rows is None else rows)
    R, lc = batch.per_unit, batch.lc
    P = lc + ch * cw  # window positions (lc + ch*cw - 1) and a scratch slot
    dev = grid.device
    n_slots = max(plan.max_live_tiles(), 1)
    pool = new_caches(gpt, n_slots * R, P)
    per_unit = R * (cache_bytes(gpt, P, element_size(gpt)) + forward_bytes(gpt, P))
    pool_bytes = n_slots * R * cache_bytes(gpt, P, element_size(gpt))
    max_units = int((_budget(memory_mib) - pool_bytes) // per_unit)
    if max_units < 1:
        raise SamplingError(f"`window_memory` cannot hold the fast window's caches "
                            f"({as_mib(pool_bytes + per_unit)}); raise it, lower `batch_size`, "
                            "or use `window` exact")
    firsts = {un.tile: un for un in reversed(plan.units)}  # tile -> its first unit (same window)
    row_of = {t: k for k, t in enumerate(firsts)}
    room = _budget(memory_mib) - pool_bytes - 16 * per_unit  # what the caches and 16 units leave
    fused = gpt.fused()  # once per run, from the weights of the precision the run computes in
    store = None if lc < 2 else PrefixStore.build(
        gpt, batch.sequences(list(firsts.values()))[:, :lc - 1], room, min(max_units, 64), fused)
    free = list(range(n_slots))[::-1]
    slot: dict[int, int] = {}
    filled: dict[int, int] = {}  # tile -> positions of its window already in its cache
    index = {id(un): n for n, un in enumerate(plan.units)}
    rows_done, drawn = plan.progress()
    for step, units in enumerate(plan.by_step()):
        for part in _chunks(units, max_units):
            for un in part:
                if un.tile not in slot:
                    slot[un.tile] = free.pop()
                    filled[un.tile] = 0
            sel = torch.tensor([slot[un.tile] * R + k for un in part for k in range(R)], device=dev)
            first = torch.tensor([lc + (un.row - un.win_r) * cw + un.c0 - un.win_c for un in part])
            start = torch.tensor([filled[un.tile] for un in part])
            first_r, start_r = first.repeat_interleave(R), start.repeat_interleave(R)
            seq = batch.sequences(part)  # (n * R, P)
            kv = take_rows(pool, sel)  # this part's caches
            new = (start_r == 0).nonzero()[:, 0].to(dev)
            if lc > 1 and len(new):  # new tiles: conditioning keys/values computed once per crop
                if store is not None:
                    which = torch.tensor([row_of[un.tile] * R + k for un in part for k in range(R)])
                    store.copy_to(kv, new, which[new.cpu()].to(dev))
                else:
                    prefill_shared(gpt, seq[new, :lc - 1], kv, new, fused)
                start_r[new.cpu()] = lc - 1
            length = first_r - start_r  # tokens to feed before each unit's first output
            logits = None
            for L in sorted(set(length.tolist())):  # equal lengths together: no padding
                rows_l = (length == L).nonzero()[:, 0]
                take = start_r[rows_l, None] + torch.arange(L)
                out = forward_rows(gpt, seq[rows_l.to(dev)].gather(1, take.to(dev)),
                                   start_r[rows_l].to(dev), L - 1, kv, rows_l.to(dev), fused)
                if logits is None:
                    logits = out.new_empty(len(sel), out.shape[1])
                logits[rows_l.to(dev)] = out
            n_tok = max(un.c1 - un.c0 for un in part)
            for t in range(n_tok):
                tok = batch.draw(logits, part, t)
                if t + 1 < n_tok:
                    logits = forward_rows(gpt, tok[:, None], (first_r + t).to(dev), 0, kv, fused=fused)
            put_rows(pool, sel, kv)
            for un, f in zip(part, first.tolist(), strict=True):
                filled[un.tile] = f + un.c1 - un.c0 - 1  # the last drawn token is not fed yet
                if plan.last_of_tile[un.tile] == index[id(un)]:
                    free.append(slot.pop(un.tile))
        if on_step is not None:
            on_step(grid, int(rows_done[step]), int(drawn[step]))
    return grid


def sample_window(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                  opts: SamplingOptions, generators: list[torch.Generator],
                  known: torch.Tensor | None = None, mode: str = DEFAULT_WINDOW,
                  segment: int | None = DEFAULT_SEGMENT, rows: int | None = None,
                  precision: str = "fp32", memory_mib: float | None = None,
                  on_step: StepHook | None = None) -> torch.Tensor:
    """Sample a (B, H, W) grid with the chosen window scheme; (B, H, W) tokens out.

    ``segment``/``rows``: ``fast``'s tile (ignored by ``exact``). ``memory_mib``: bound on the
    window batches (and fast's caches), :data:`DEFAULT_MEMORY_MIB` by default. ``on_step``:
    called after every step with the partial grid (:data:`StepHook`)."""
    B, H, W = init.shape
    with precision_context(gpt, precision):
        plan = check_window(gpt, cond.length(crop), (H, W), crop, mode, B, opts.guided, memory_mib,
                            segment, rows, known)
        if mode == "exact":
            return sample_exact(gpt, cond, init, crop, opts, generators, known, memory_mib, plan, on_step)
        return sample_fast(gpt, cond, init, crop, opts, generators, known, segment, rows,
                           memory_mib, plan, on_step)
