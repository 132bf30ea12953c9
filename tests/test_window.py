"""Sliding-window sampling: the reference's placement, the blockwise plan, cache == plain forward."""

from __future__ import annotations

import torch

from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.sampling import Guided, SamplingOptions, make_generators, pick_tokens, sample_sequence
from vqgan_cli.window import (
    Conditioning,
    block_generator,
    local_offset,
    plan_blocks,
    sample_blockwise,
    sample_per_token,
)

V = 20
CROP = (4, 4)



def tiny_gpt(crop: tuple[int, int] = CROP, spatial: bool = True) -> GPT:
    torch.manual_seed(0)
    n = crop[0] * crop[1]
    gpt = GPT(GPTConfig(vocab_size=V, block_size=2 * n if spatial else n, n_layer=2, n_head=2,
                        n_embd=32)).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.5)
    return gpt


def cond_grid(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, V - 1, (b, h, w), generator=torch.Generator().manual_seed(7))


def test_local_offset_is_the_papers_formula() -> None:
    # crop 16 in a 20-row grid: li = i for i < 8, 16 - (20 - i) when 20 - i < 8, else 8
    got = [local_offset(i, 20, 16) for i in range(20)]
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 9, 10, 11, 12, 13, 14, 15]
    assert all(0 <= i - local_offset(i, 20, 16) <= 20 - 16 for i in range(20))
    assert [local_offset(i, 16, 16) for i in range(16)] == list(range(16))  # grid == crop


def test_block_plan_covers_every_position_once_and_respects_dependencies() -> None:
    H, W = 11, 14
    diagonals = plan_blocks((H, W), (4, 6))
    seen = torch.zeros(H, W, dtype=torch.long)
    done_at = torch.full((H, W), -1)
    for d, blocks in enumerate(diagonals):
        for b in blocks:
            seen[b.r0:b.r1, b.c0:b.c1] += 1
            done_at[b.r0:b.r1, b.c0:b.c1] = d
            assert (b.r1, b.c1) == (b.win_r + 4, b.win_c + 6) and b.win_r >= 0 and b.win_c >= 0
    assert (seen == 1).all()
    # everything a window holds before its block (raster order) was drawn on an earlier diagonal
    for d, blocks in enumerate(diagonals):
        for b in blocks:
            win = done_at[b.win_r:b.r1, b.win_c:b.c1]
            local_r, local_c = b.r0 - b.win_r, b.c0 - b.win_c
            before = torch.zeros_like(win, dtype=torch.bool)
            before[:local_r] = True
            before[local_r:, :local_c] = True
            assert (win[before] < d).all()
    assert [len(x) for x in diagonals] == [1, 2, 3, 4, 4, 3, 2, 1]


def test_at_the_crop_size_every_scheme_is_plain_sampling() -> None:
    gpt = tiny_gpt()
    cond = cond_grid(2, *CROP)
    opts = SamplingOptions(top_k=10)
    init = torch.zeros(2, *CROP, dtype=torch.long)
    plain = sample_sequence(gpt, cond.reshape(2, -1), 16, opts, make_generators([3, 4]))
    block = sample_blockwise(gpt, Conditioning(grid=cond), init, CROP, opts, make_generators([3, 4]))
    per = sample_per_token(gpt, Conditioning(grid=cond), init, CROP, opts, make_generators([3, 4]))
    assert torch.equal(block.reshape(2, -1), plain) and torch.equal(per, block)


def naive_blockwise(gpt: GPT, cond: torch.Tensor, H: int, W: int, crop: tuple[int, int],
                    opts: SamplingOptions, seeds: list[int],
                    null: torch.Tensor | None = None) -> torch.Tensor:
    """The blockwise placement without cache or batching: a full window forward per token."""
    B = cond.shape[0]
    ch, cw = crop
    grid = torch.zeros(B, H, W, dtype=torch.long)
    g = Guided(gpt, opts.cfg_scale)
    for blocks in plan_blocks((H, W), crop):
        targets = [(a, c) for a in range(ch) for c in range(cw)]
        shapes: dict = {}
        for b in blocks:
            shapes.setdefault((b.r1 - b.r0, b.c1 - b.c0), []).append(b)
        for group in shapes.values():  # draw order as batched: step-major, sample-major
            gens = [block_generator(seed, b, W) for seed in seeds for b in group]
            top, left = group[0].r0 - group[0].win_r, group[0].c0 - group[0].win_c
            for a, c in [(a, c) for a, c in targets if a >= top and c >= left]:
                logits = []
                for s in range(B):
                    for b in group:
                        r, q = b.win_r, b.win_c
                        seq = torch.cat((cond[s:s + 1, r:r + ch, q:q + cw].reshape(1, -1),
                                         grid[s:s + 1, r:r + ch, q:q + cw].reshape(1, -1)), 1)
                        nseq = None if null is None else torch.cat(
                            (null[s:s + 1, r:r + ch, q:q + cw].reshape(1, -1),
                             grid[s:s + 1, r:r + ch, q:q + cw].reshape(1, -1)), 1)
                        at = ch * cw - 1 + a * cw + c
                        logits.append(g.mix(gpt(g.join(seq, nseq)[:, :at + 1])[:, at]))
                tok = pick_tokens(torch.cat(logits), opts, gens)
                for s in range(B):
                    for k, b in enumerate(group):
                        grid[s, b.win_r + a, b.win_c + c] = tok[s * len(group) + k]
    return grid


def test_blockwise_cache_and_wavefront_equal_plain_window_forwards() -> None:
    gpt = tiny_gpt()
    H, W = 9, 11
    cond = cond_grid(2, H, W)
    opts = SamplingOptions(temperature=0.9)
    init = torch.zeros(2, H, W, dtype=torch.long)
    fast = sample_blockwise(gpt, Conditioning(grid=cond), init, CROP, opts, make_generators([1, 2]))
    ref = naive_blockwise(gpt, cond, H, W, CROP, opts, [1, 2])
    assert torch.equal(fast, ref)
    assert fast[0, 0].tolist() == [19, 10, 10, 16, 19, 19, 6, 19, 19, 11, 19]
    # the batch cap (memory) does not change a single token
    capped = sample_blockwise(gpt, Conditioning(grid=cond), init, CROP, opts, make_generators([1, 2]),
                              max_rows=2)
    assert torch.equal(capped, fast)


def test_guided_non_square_blockwise_matches_reference_loop() -> None:
    crop = (3, 5)
    gpt = tiny_gpt(crop)
    H, W = 7, 12
    cond = cond_grid(1, H, W)
    null = torch.full_like(cond, V - 1)
    opts = SamplingOptions(cfg_scale=2.0, n_tokens=V - 1)
    c = Conditioning(grid=cond, null_grid=null)
    fast = sample_blockwise(gpt, c, torch.zeros(1, H, W, dtype=torch.long), crop, opts,
                            make_generators([5]))
    assert torch.equal(fast, naive_blockwise(gpt, cond, H, W, crop, opts, [5], null))


def test_kept_tokens_stay_and_fixed_conditioning() -> None:
    gpt = tiny_gpt(spatial=False)
    H, W = 8, 10
    init = torch.randint(0, V, (1, H, W), generator=torch.Generator().manual_seed(1))
    known = torch.zeros(H, W, dtype=torch.bool)
    known[:5] = True
    cond = Conditioning(fixed=torch.tensor([[0]]))
    for sampler in (sample_blockwise, sample_per_token):
        out = sampler(gpt, cond, init, CROP, SamplingOptions(), make_generators([0]), known)
        assert torch.equal(out[:, :5], init[:, :5]) and not torch.equal(out[:, 5:], init[:, 5:])


def test_per_token_uses_the_reference_window() -> None:
    """Record the windows the per-token loop feeds and compare with i - li, j - lj."""
    gpt = tiny_gpt()
    H, W = 6, 7
    cond = torch.arange(H * W).view(1, H, W) % (V - 1)
    seen: list[torch.Tensor] = []
    forward = gpt.forward

    def spy(idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx[0, :16].clone())
        return forward(idx)

    gpt.forward = spy  # type: ignore[method-assign]
    sample_per_token(gpt, Conditioning(grid=cond), torch.zeros(1, H, W, dtype=torch.long), CROP,
                     SamplingOptions(), make_generators([0]), limit=H * W)
    assert len(seen) == H * W
    for n, got in enumerate(seen):
        i, j = divmod(n, W)
        r, c = i - local_offset(i, H, 4), j - local_offset(j, W, 4)
        assert torch.equal(got, cond[0, r:r + 4, c:c + 4].reshape(-1))


def test_bf16_blockwise_is_deterministic() -> None:
    gpt = tiny_gpt()
    cond = cond_grid(1, 7, 9)
    runs = [sample_blockwise(gpt, Conditioning(grid=cond), torch.zeros(1, 7, 9, dtype=torch.long), CROP,
                             SamplingOptions(), make_generators([0]), precision="bf16") for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and int(runs[0].max()) < V
