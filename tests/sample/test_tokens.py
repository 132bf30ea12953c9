"""Token drawing: filtering, option checks, and cached == uncached sampling (tiny GPT, CPU fp32)."""

from __future__ import annotations

import pytest
import torch
from factory import gpt

from vqgan_cli.models.gpt import GPT
from vqgan_cli.sample.tokens import (
    SamplingError,
    SamplingOptions,
    draw_tokens,
    filter_logits,
    make_generators,
    sample_sequence,
    step_uniforms,
)

V = 24



def tiny_gpt(block: int = 40, vocab: int = V) -> GPT:
    return gpt(vocab_size=vocab, block_size=block, n_layer=2, spread=0.3)


def test_filter_top_k_top_p_temperature() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    k2 = filter_logits(logits, SamplingOptions(top_k=2))
    assert torch.isinf(k2[0, :2]).all() and k2[0, 2:].tolist() == [2.0, 3.0]
    t = filter_logits(logits, SamplingOptions(temperature=2.0))
    assert t[0].tolist() == [0.0, 0.5, 1.0, 1.5]
    # softmax = .032 .087 .237 .644: top-p 0.6 keeps only the best, 0.7 the best two
    assert torch.isfinite(filter_logits(logits, SamplingOptions(top_p=0.6))).sum() == 1
    assert torch.isfinite(filter_logits(logits, SamplingOptions(top_p=0.7))).sum() == 2
    assert torch.isfinite(filter_logits(logits, SamplingOptions(top_p=1.0))).sum() == 4
    assert filter_logits(logits, SamplingOptions(n_tokens=3)).shape == (1, 3)


def inverse_cdf(probs: list[float], u: float) -> int:
    """PAPER.md's draw written out: the first token whose cumulative probability exceeds u."""
    total = 0.0
    for token, p in enumerate(probs):
        total += p
        if u < total:
            return token
    return len(probs) - 1


def test_draw_tokens_is_the_inverse_cdf_at_u() -> None:
    p = [0.1, 0.2, 0.3, 0.4]
    us = [0.05, 0.2, 0.35, 0.45, 0.62, 0.99]  # chosen so the three settings below draw differently
    logits = torch.tensor([p] * len(us)).log()
    u = torch.tensor(us)
    assert draw_tokens(logits, SamplingOptions(), u).tolist() == [inverse_cdf(p, x) for x in us] == [0, 1, 2, 2, 3, 3]
    # top-k 2 keeps 0.3 and 0.4, renormalised; temperature 2 takes the square root of p, renormalised
    top2 = [0, 0, 3 / 7, 4 / 7]
    assert draw_tokens(logits, SamplingOptions(top_k=2), u).tolist() == [inverse_cdf(top2, x) for x in us] \
        == [2, 2, 2, 3, 3, 3]
    root = [x ** 0.5 / sum(y ** 0.5 for y in p) for x in p]
    assert draw_tokens(logits, SamplingOptions(temperature=2.0), u).tolist() == [inverse_cdf(root, x) for x in us] \
        == [0, 1, 1, 2, 2, 3]


def test_step_uniforms_are_each_rows_own_stream_in_step_order() -> None:
    u = step_uniforms(make_generators([1, 2, 3]), 4)
    # the oracle: four one-number draws per generator, one after the other
    want = [[float(torch.rand(1, generator=g)) for _ in range(4)] for g in make_generators([1, 2, 3])]
    assert u.shape == (3, 4) and u.tolist() == want
    assert step_uniforms(make_generators([1]), 4).tolist() == want[:1]  # row 0 does not depend on its batch
    # uniform over 10 tokens: the draw is floor(10 u)
    logits = torch.zeros(3, 10)
    assert draw_tokens(logits, SamplingOptions(), u[:, 0]).tolist() == [int(10 * r[0]) for r in want] == [7, 6, 0]
    sure = torch.full((2, 10), -1e4)
    sure[:, 4] = 0
    assert draw_tokens(sure, SamplingOptions(), u[:2, 1]).tolist() == [4, 4]
    # top-k 1 is greedy whatever the draw
    assert draw_tokens(torch.arange(10.0).repeat(2, 1), SamplingOptions(top_k=1), u[:2, 2]).tolist() == [9, 9]


@pytest.mark.parametrize("opts, message", [
    (SamplingOptions(temperature=0), "`temperature` must be > 0"),
    (SamplingOptions(temperature=-1), "`temperature` must be > 0"),
    (SamplingOptions(top_k=0), f"`top_k` must be in [1, {V}]"),
    (SamplingOptions(top_k=V + 1), f"`top_k` must be in [1, {V}]"),
    (SamplingOptions(top_p=0.0), "`top_p` must be in (0, 1]"),
    (SamplingOptions(top_p=1.5), "`top_p` must be in (0, 1]"),
])
def test_option_checks(opts: SamplingOptions, message: str) -> None:
    with pytest.raises(SamplingError) as e:
        opts.check(V)
    assert message in str(e.value)
    SamplingOptions(temperature=0.5, top_k=V, top_p=1.0).check(V)


def test_cached_and_uncached_draw_identical_tokens() -> None:
    gpt = tiny_gpt()
    cond = torch.tensor([[3], [5]])
    opts = SamplingOptions(temperature=1.0, top_k=12)
    fast = sample_sequence(gpt, cond, 30, opts, make_generators([10, 11]), cached=True)
    slow = sample_sequence(gpt, cond, 30, opts, make_generators([10, 11]), cached=False)
    assert torch.equal(fast, slow)
    assert fast[:, :8].tolist() == [[16, 16, 12, 15, 4, 12, 16, 20], [3, 13, 20, 3, 15, 15, 15, 3]]
    # the same seed alone in a batch of one gives the same sample
    alone = sample_sequence(gpt, cond[1:], 30, opts, make_generators([11]), cached=True)
    assert torch.equal(alone[0], fast[1])


def test_prefix_is_kept_and_guidance_matches_uncached() -> None:
    gpt = tiny_gpt()
    cond = torch.tensor([[3, 4], [5, 6]])
    null = torch.full_like(cond, V - 1)
    prefix = torch.tensor([[1, 2, 3], [4, 5, 6]])
    opts = SamplingOptions(cfg_scale=3.0, top_p=0.9, n_tokens=V - 1)
    fast = sample_sequence(gpt, cond, 20, opts, make_generators([0, 1]), prefix, null, cached=True)
    slow = sample_sequence(gpt, cond, 20, opts, make_generators([0, 1]), prefix, null, cached=False)
    assert torch.equal(fast, slow) and torch.equal(fast[:, :3], prefix)
    assert int(fast.max()) < V - 1  # the null token is never drawn as an image token
    plain = sample_sequence(gpt, cond, 20, SamplingOptions(top_p=0.9, n_tokens=V - 1),
                            make_generators([0, 1]), prefix)
    assert not torch.equal(plain, fast)  # guidance changes the draw
    with pytest.raises(SamplingError, match="null"):
        sample_sequence(gpt, cond, 5, opts, make_generators([0, 1]))


def test_too_long_for_the_block_size() -> None:
    with pytest.raises(SamplingError, match="block size"):
        sample_sequence(tiny_gpt(block=8), torch.zeros(1, 1, dtype=torch.long), 9,
                        SamplingOptions(), make_generators([0]))
