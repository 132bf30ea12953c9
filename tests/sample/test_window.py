"""Sliding-window sampling against oracles written here from PAPER.md's rule (tiny GPT, CPU fp32).

The oracles are plain double loops over the grid: one full forward of the whole window per token,
with the window offsets computed in this file (not with vqgan_cli.sample.window's helpers), and the
token drawn from the position's own uniform number (sample seed's generator, raster order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factory import gpt

from vqgan_cli.models.gpt import GPT, LayerKV
from vqgan_cli.sample.tokens import SamplingError, SamplingOptions, draw_tokens, make_generators, sample_sequence
from vqgan_cli.sample.window import (
    Conditioning,
    local_offset,
    plan_windows,
    sample_exact,
    sample_fast,
    sample_sequential,
    sample_window,
)
from vqgan_cli.sample.window_forward import forward_last, forward_rows, forward_windows, prefill_shared

V = 20


def tiny_gpt(crop: tuple[int, int], lc: int) -> GPT:
    """Large weights: peaked, far-from-uniform next-token distributions."""
    return gpt(vocab_size=V, block_size=lc + crop[0] * crop[1] - 1, n_layer=2, spread=0.5)


def paper_li(i: int, size: int, crop: int) -> int:
    """PAPER.md: li = i if i < crop/2, crop - (size - i) if size - i < crop/2, else crop/2
    (crop//2 and crop - crop//2 for odd crops)."""
    if i < crop // 2:
        return i
    if size - i < crop - crop // 2:
        return crop - (size - i)
    return crop // 2


def uniforms(seeds: list[int], H: int, W: int) -> torch.Tensor:
    return torch.stack([torch.rand(H * W, generator=torch.Generator().manual_seed(s)) for s in seeds]
                       ).view(len(seeds), H, W)


@torch.no_grad()
def oracle(gpt: GPT, H: int, W: int, crop: tuple[int, int], opts: SamplingOptions, seeds: list[int],
           window, cond: torch.Tensor | None = None, fixed: torch.Tensor | None = None,  # noqa: ANN001
           null: torch.Tensor | None = None, init: torch.Tensor | None = None,
           known: torch.Tensor | None = None) -> torch.Tensor:
    """Raster order; token (i, j) of sample b from a full forward over the window whose top-left
    corner is ``window(i, j)``, at the output that predicts (i, j); guidance u + s (c - u)."""
    B = len(seeds)
    ch, cw = crop
    grid = torch.zeros(B, H, W, dtype=torch.long) if init is None else init.clone()
    u = uniforms(seeds, H, W)
    for i in range(H):
        for j in range(W):
            if known is not None and known[i, j]:
                continue
            r, c = window(i, j)
            assert 0 <= r <= H - ch and 0 <= c <= W - cw
            patch = grid[:, r:r + ch, c:c + cw].reshape(B, -1)
            ctx = cond[:, r:r + ch, c:c + cw].reshape(B, -1) if cond is not None else fixed
            at = ctx.shape[1] - 1 + (i - r) * cw + (j - c)
            logits = gpt(torch.cat((ctx, patch), 1)[:, :-1])[:, at]
            if null is not None:
                unc = gpt(torch.cat((null[:, r:r + ch, c:c + cw].reshape(B, -1), patch), 1)[:, :-1])[:, at]
                logits = unc + opts.cfg_scale * (logits - unc)
            grid[:, i, j] = draw_tokens(logits, opts, u[:, i, j])
    return grid


def reference_window(H: int, W: int, crop: tuple[int, int]):  # noqa: ANN201
    return lambda i, j: (i - paper_li(i, H, crop[0]), j - paper_li(j, W, crop[1]))


def fast_window(H: int, W: int, crop: tuple[int, int], segment: int, rows: int):  # noqa: ANN201
    """The ``fast`` tiles as its docstring states them: bands of up to ``rows`` rows in the
    reference's window of the band's first row; segments of up to ``segment`` columns in the
    reference's window of the segment's last column (shortened until they fit in it)."""
    ch, cw = crop
    row_win, b0 = {}, 0
    while b0 < H:
        li = paper_li(b0, H, ch)
        b1 = min(b0 + rows, b0 + ch - li, H)
        row_win.update({i: b0 - li for i in range(b0, b1)})
        b0 = b1
    col_win, j0 = {}, 0
    while j0 < W:
        j1 = min(j0 + segment, W)
        while (j1 - 1) - paper_li(j1 - 1, W, cw) > j0:
            j1 -= 1
        col_win.update({j: (j1 - 1) - paper_li(j1 - 1, W, cw) for j in range(j0, j1)})
        j0 = j1
    return lambda i, j: (row_win[i], col_win[j])


CASES = [  # crop, H, W
    ((4, 4), 4, 4),  # the crop itself
    ((4, 4), 9, 11),
    ((4, 4), 4, 9),  # H == crop
    ((4, 4), 10, 4),  # W == crop
    ((3, 5), 7, 12),  # odd, not square
    ((3, 5), 3, 8),
]


def problem(crop: tuple[int, int], H: int, W: int, spatial: bool, B: int = 2):
    lc = crop[0] * crop[1] if spatial else 1
    gpt = tiny_gpt(crop, lc)
    grid = torch.randint(0, V, (B, H, W), generator=torch.Generator().manual_seed(7))
    fixed = torch.full((B, 1), 3)  # a start token
    cond = Conditioning(grid=grid) if spatial else Conditioning(fixed=fixed)
    kw = {"cond": grid} if spatial else {"fixed": fixed}
    return gpt, cond, kw


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "sos"])
@pytest.mark.parametrize("crop, H, W", CASES)
def test_exact_and_the_sequential_loop_equal_the_papers_loop(crop, H, W, spatial) -> None:
    gpt, cond, kw = problem(crop, H, W, spatial)
    opts = SamplingOptions(top_k=12, temperature=0.9)
    want = oracle(gpt, H, W, crop, opts, [1, 2], reference_window(H, W, crop), **kw)
    init = torch.zeros(2, H, W, dtype=torch.long)
    exact = sample_window(gpt, cond, init, crop, opts, make_generators([1, 2]), mode="exact")
    assert torch.equal(exact, want)
    assert torch.equal(sample_sequential(gpt, cond, init, crop, opts, make_generators([1, 2])), want)
    # sample 1 alone draws what it drew in the batch
    alone = sample_window(gpt, Conditioning(grid=kw["cond"][1:]) if spatial else
                          Conditioning(fixed=kw["fixed"][1:]), init[1:], crop, opts, make_generators([2]),
                          mode="exact")
    assert torch.equal(alone[0], want[1])


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "sos"])
@pytest.mark.parametrize("crop, H, W, segment, rows", [
    ((4, 4), 9, 11, 3, 2),  # 4 // 2 + 1 = 3: the widest segment
    ((4, 4), 9, 11, 2, 1),
    ((4, 4), 10, 4, 3, 4),  # W == crop; rows 4 is cut to what fits
    ((3, 5), 7, 12, 3, 2),
    ((3, 5), 7, 12, 2, 1),
])
def test_fast_equals_a_full_forward_per_token_with_the_documented_windows(crop, H, W, segment, rows,
                                                                          spatial) -> None:
    gpt, cond, kw = problem(crop, H, W, spatial)
    opts = SamplingOptions(top_k=12)
    want = oracle(gpt, H, W, crop, opts, [3, 4], fast_window(H, W, crop, segment, rows), **kw)
    got = sample_window(gpt, cond, torch.zeros(2, H, W, dtype=torch.long), crop, opts,
                        make_generators([3, 4]), mode="fast", segment=segment, rows=rows)
    assert torch.equal(got, want)
    # and it is not the reference's window: some token differs from exact's
    exact = oracle(gpt, H, W, crop, opts, [3, 4], reference_window(H, W, crop), **kw)
    assert not torch.equal(got, exact)


@pytest.mark.parametrize("crop, H, W", [((4, 4), 9, 11), ((3, 5), 7, 12), ((4, 4), 4, 9)])
def test_fast_with_one_token_tiles_is_the_papers_loop(crop, H, W) -> None:
    gpt, cond, kw = problem(crop, H, W, True)
    opts = SamplingOptions()
    init = torch.zeros(2, H, W, dtype=torch.long)
    want = oracle(gpt, H, W, crop, opts, [5, 6], reference_window(H, W, crop), **kw)
    one = sample_fast(gpt, cond, init, crop, opts, make_generators([5, 6]), segment=1, rows=1)
    assert torch.equal(one, want)
    assert torch.equal(sample_exact(gpt, cond, init, crop, opts, make_generators([5, 6])), want)


def test_at_the_crop_size_every_scheme_is_plain_sampling() -> None:
    crop = (4, 4)
    gpt, cond, kw = problem(crop, 4, 4, True)
    opts = SamplingOptions(top_k=10)
    plain = sample_sequence(gpt, kw["cond"].reshape(2, -1), 16, opts, make_generators([3, 4]))
    init = torch.zeros(2, *crop, dtype=torch.long)
    for mode in ("exact", "fast"):
        got = sample_window(gpt, cond, init, crop, opts, make_generators([3, 4]), mode=mode)
        assert torch.equal(got.reshape(2, -1), plain)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_guidance_and_kept_tokens_match_the_oracle(mode) -> None:
    crop, H, W = (3, 5), 8, 12
    gpt, _, kw = problem(crop, H, W, True, B=1)
    null = torch.full_like(kw["cond"], V - 1)
    init = torch.randint(0, V - 1, (1, H, W), generator=torch.Generator().manual_seed(1))
    known = torch.zeros(H, W, dtype=torch.bool)
    known[:3] = True
    known[5, 2:7] = True  # a kept patch inside the grid too
    opts = SamplingOptions(cfg_scale=2.0, n_tokens=V - 1)
    window = reference_window(H, W, crop) if mode == "exact" else fast_window(H, W, crop, 3, 2)
    want = oracle(gpt, H, W, crop, opts, [5], window, null=null, init=init, known=known, **kw)
    got = sample_window(gpt, Conditioning(grid=kw["cond"], null_grid=null), init, crop, opts,
                        make_generators([5]), known, mode=mode, segment=3, rows=2)
    assert torch.equal(got, want)
    assert torch.equal(got[:, known], init[:, known]) and not torch.equal(got, init)
    assert int(got.max()) < V - 1  # the null token is never drawn


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_the_memory_budget_changes_batches_not_tokens(mode) -> None:
    crop, H, W = (4, 4), 9, 11
    gpt, cond, _ = problem(crop, H, W, True)
    init = torch.zeros(2, H, W, dtype=torch.long)
    roomy = sample_window(gpt, cond, init, crop, SamplingOptions(), make_generators([1, 2]), mode=mode)
    # room for the fast caches plus one window at a time
    tight = sample_window(gpt, cond, init, crop, SamplingOptions(), make_generators([1, 2]), mode=mode,
                          memory_mib=0.8 if mode == "fast" else 0.15)
    assert torch.equal(roomy, tight)


def test_errors_name_the_option() -> None:
    crop = (4, 4)
    gpt, cond, _ = problem(crop, 6, 6, True, B=1)
    init = torch.zeros(1, 6, 6, dtype=torch.long)
    run = (gpt, cond, init, crop, SamplingOptions(), make_generators([0]))
    with pytest.raises(SamplingError, match="`window_memory` 0.001 MiB cannot hold one window"):
        sample_window(*run, mode="exact", memory_mib=0.001)
    with pytest.raises(SamplingError, match="`window_memory`"):
        sample_window(*run, mode="fast", memory_mib=0.01)
    with pytest.raises(SamplingError, match=r"`segment` must be in \[1, 3\]"):
        sample_window(*run, mode="fast", segment=4)
    with pytest.raises(SamplingError, match="`window` must be one of exact, fast"):
        sample_window(*run, mode="per-token")
    with pytest.raises(SamplingError, match="`size`: a 3x6 token grid is smaller"):
        sample_window(gpt, cond, init[:, :, :3], crop, SamplingOptions(), make_generators([0]))


def test_local_offset_is_the_papers_formula() -> None:
    # crop 16 in a 20-row grid: li = i for i < 8, 16 - (20 - i) when 20 - i < 8, else 8
    got = [local_offset(i, 20, 16) for i in range(20)]
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 9, 10, 11, 12, 13, 14, 15]
    assert [local_offset(i, 16, 16) for i in range(16)] == list(range(16))  # grid == crop
    assert [local_offset(i, 7, 3) for i in range(7)] == [0, 1, 1, 1, 1, 1, 2]  # odd crop


def window_dependencies(i: int, j: int, H: int, W: int, crop: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells of (i, j)'s reference window that precede it in raster order."""
    ch, cw = crop
    r, c = i - paper_li(i, H, ch), j - paper_li(j, W, cw)
    return [(a, b) for a in range(r, i) for b in range(c, c + cw)] + [(i, b) for b in range(c, j)]


@pytest.mark.parametrize("H, W, crop", [(9, 11, (4, 4)), (7, 12, (3, 5)), (4, 9, (4, 4)), (13, 6, (5, 3))])
def test_exact_schedule_respects_the_window_and_is_minimal(H, W, crop) -> None:
    steps = plan_windows((H, W), crop).steps
    want = np.zeros((H, W), dtype=np.int64)
    for i in range(H):
        for j in range(W):
            deps = window_dependencies(i, j, H, W, crop)
            assert all(steps[i, j] > steps[a, b] for a, b in deps)
            want[i, j] = 1 + max((want[a, b] for a, b in deps), default=-1)
    assert np.array_equal(steps, want)  # each token exactly 1 + its latest dependency


def test_exact_schedule_at_1280x832() -> None:
    """104x160 tokens, 8x8 crop. Inside the grid a token waits for its left neighbour and for the
    row above up to 3 columns right (t = j + 4i would give 576 steps). A row's first token sits
    at the left edge of its window, so it waits for the row above up to column 7: each row starts
    8 steps after the previous one, and the last token is at 8 * 103 + 159 = 983."""
    plan = plan_windows((104, 160), (8, 8))
    assert plan.n_steps == 984
    assert [int(plan.steps[i, 0]) for i in range(4)] == [0, 8, 16, 24]
    assert int(plan.steps[50, 80]) == 50 * 8 + 80
    assert sorted(np.bincount(plan.steps.ravel()))[-1] == 20  # the widest step: 20 windows


@pytest.mark.parametrize("segment, rows", [(3, 2), (2, 1), (3, 4)])
def test_fast_schedule_orders_tiles_after_their_window(segment, rows) -> None:
    H, W, crop = 11, 13, (4, 4)
    plan = plan_windows((H, W), crop, None, segment, rows)
    window = fast_window(H, W, crop, segment, rows)
    assert sum(u.c1 - u.c0 for u in plan.units) == H * W
    for u in plan.units:
        assert window(u.row, u.c0) == (u.win_r, u.win_c) == window(u.row, u.c1 - 1)
        ahead = plan.steps[u.win_r:u.row, u.win_c:u.win_c + 4].tolist() + [plan.steps[u.row, u.win_c:u.c0].tolist()]
        assert all(u.step > s for row in ahead for s in row)
        assert (plan.steps[u.row, u.c0:u.c1] == u.step).all()


def test_fast_keeps_the_references_above_right_context() -> None:
    """Every token's fast window reaches at least as far right, and starts no lower, than the
    reference's; what it loses on the left is d = lj - local column (j_end - c inside)."""
    H, W, crop = 30, 40, (8, 8)
    for segment in (1, 2, 5):
        plan = plan_windows((H, W), crop, None, segment, 4)
        for u in plan.units:
            for c in range(u.c0, u.c1):
                ref_r, ref_c = reference_window(H, W, crop)(u.row, c)
                assert u.win_c + 7 >= ref_c + 7 and u.win_r <= ref_r
                d = paper_li(c, W, 8) - (c - u.win_c)
                assert d == u.win_c - ref_c >= 0
                if 4 <= c and u.c1 - 1 < W - 4:  # away from the borders
                    assert d == u.c1 - 1 - c


def test_partial_forwards_equal_the_plain_forward() -> None:
    gpt = tiny_gpt((4, 4), 16)
    idx = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(0))
    full = gpt(idx)
    torch.testing.assert_close(forward_last(gpt, idx), full[:, -1], rtol=1e-5, atol=1e-5)
    # rows fed in two pieces of different lengths through a cache, outputs at chosen positions
    c = gpt.cfg
    kv = [LayerKV(torch.zeros(3, c.n_head, 32, c.head_dim), torch.zeros(3, c.n_head, 32, c.head_dim))
          for _ in range(c.n_layer)]
    split = torch.tensor([5, 9, 12])
    first = torch.stack([idx[n, :12] for n in range(3)])  # rows 0, 1 feed past their split: overwritten
    out = forward_rows(gpt, first, torch.zeros(3, dtype=torch.long), split - 1, kv)
    torch.testing.assert_close(out, full[torch.arange(3), split - 1], rtol=1e-5, atol=1e-5)
    rest = torch.stack([idx[n, split[n]:split[n] + 8] for n in range(3)])
    out = forward_rows(gpt, rest, split, torch.tensor([7, 7, 7]), kv)
    torch.testing.assert_close(out, full[torch.arange(3), split + 7], rtol=1e-5, atol=1e-5)


def test_windows_with_the_same_conditioning_share_it_and_equal_the_plain_forward() -> None:
    gpt = tiny_gpt((4, 4), 16)
    g = torch.Generator().manual_seed(1)
    cond = torch.randint(0, V, (2, 16), generator=g)[[0, 1, 0, 0, 1]]  # 5 windows, 2 distinct crops
    seq = torch.cat((cond, torch.randint(0, V, (5, 7), generator=g)), 1)  # (5, 23)
    full = gpt(seq)[:, -1]  # the oracle: the plain forward of every whole window
    torch.testing.assert_close(forward_windows(gpt, seq, 16), full, rtol=1e-5, atol=1e-5)
    # the conditioning's keys/values are computed for the 2 distinct crops, not the 5 windows
    seen = []
    embed = gpt.embed
    gpt.embed = lambda idx, pos=0: (seen.append(tuple(idx.shape)), embed(idx, pos))[1]
    c = gpt.cfg
    kv = [LayerKV(torch.zeros(5, c.n_head, 24, c.head_dim), torch.zeros(5, c.n_head, 24, c.head_dim))
          for _ in range(c.n_layer)]
    prefill_shared(gpt, seq[:, :15], kv, torch.arange(5))
    del gpt.embed
    assert seen == [(2, 15)]
    out = forward_rows(gpt, seq[:, 15:], torch.full((5,), 15), 7, kv)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_bf16_windows_are_deterministic() -> None:
    crop = (4, 4)
    gpt, cond, _ = problem(crop, 7, 9, True, B=1)
    init = torch.zeros(1, 7, 9, dtype=torch.long)
    for mode in ("exact", "fast"):
        runs = [sample_window(gpt, cond, init, crop, SamplingOptions(), make_generators([0]), mode=mode,
                              precision="bf16") for _ in range(2)]
        assert torch.equal(runs[0], runs[1]) and int(runs[0].max()) < V


def test_bf16_context_casts_weights_once_and_restores_them() -> None:
    gpt = tiny_gpt((4, 4), 16)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = gpt(idx)  # autocast casting every weight at every call
    from vqgan_cli.sample.window import precision_context

    with torch.no_grad(), precision_context(gpt, "bf16"):
        assert gpt.head.weight.dtype == torch.bfloat16 and gpt.blocks[0].ln1.weight.dtype == torch.float32
        once = gpt(idx)
    assert torch.equal(once, plain)
    after = gpt.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(SamplingError, match="`precision` must be one of fp32, bf16"):
        with precision_context(gpt, "fp16"):
            pass
