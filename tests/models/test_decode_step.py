"""The fixed-shape decoding step: its logits against the plain forward, one graph under
torch.compile, and compiled sampling drawing the tokens eager sampling draws."""

from __future__ import annotations

import torch
import torch._dynamo
from factory import gpt
from torch._dynamo.utils import counters

from vqgan_cli.models.kv_cache import StaticDecoder, decode_step
from vqgan_cli.sample.tokens import SamplingOptions, make_generators, sample_sequence

V, BLOCK = 50, 40


def tiny():  # noqa: ANN201
    return gpt(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)


def _step_inputs(model, decoder: StaticDecoder, idx: torch.Tensor, pos: int) -> tuple:  # noqa: ANN001
    return (model, decoder.fused, decoder.cache.layers, decoder.positions, idx[:, pos:pos + 1],
            torch.tensor(pos))


def test_eager_step_matches_the_plain_forward() -> None:
    model = tiny()
    idx = torch.randint(0, V, (3, BLOCK), generator=torch.Generator().manual_seed(0))
    full = model(idx)  # the oracle: every position of the plain forward
    dec = StaticDecoder(model, 3, BLOCK)
    with torch.no_grad():
        torch.testing.assert_close(dec.prefill(idx[:, :5]), full[:, :5], rtol=0, atol=1e-5)
        for p in range(5, BLOCK):
            # the fixed-shape step itself, run eagerly: whole-buffer read, masked past ``pos``
            out = decode_step(*_step_inputs(model, dec, idx, p))
            torch.testing.assert_close(out, full[:, p], rtol=0, atol=1e-5)


def test_the_step_is_one_graph_without_breaks() -> None:
    model = tiny()
    idx = torch.randint(0, V, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    dec = StaticDecoder(model, 2, BLOCK)
    with torch.no_grad():
        dec.prefill(idx[:, :3])
        explained = torch._dynamo.explain(decode_step)(*_step_inputs(model, dec, idx, 3))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_steps_match_the_plain_forward_at_every_position() -> None:
    """Compiled once, the step serves every position (the position is a tensor, not a shape)."""
    model = tiny()
    idx = torch.randint(0, V, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    torch._dynamo.reset()
    counters.clear()
    dec = StaticDecoder(model, 2, BLOCK, compiled=True)
    with torch.no_grad():
        dec.prefill(idx[:, :1])
        for p in range(1, BLOCK):
            torch.testing.assert_close(dec.step(idx[:, p:p + 1], p), full[:, p], rtol=0, atol=1e-4)
    assert dec.cache.length == BLOCK
    # one compilation for all positions: a recompile per position would show as more graphs
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_sampling_draws_the_eager_tokens_on_the_quickstart_shape() -> None:
    """recipes/quickstart_prior.yaml's transformer (4 layers, 4 heads, 256 wide) with random
    weights: 127 tokens after 64 conditioning tokens, top-k 100, two seeds."""
    model = gpt(vocab_size=264, block_size=127 + 64, n_layer=4, n_head=4, n_embd=256)
    torch.nn.init.normal_(model.pos_emb, std=0.02, generator=torch.Generator().manual_seed(3))
    cond = torch.randint(256, 264, (2, 64), generator=torch.Generator().manual_seed(4))
    opts = SamplingOptions(top_k=100, n_tokens=256)
    eager = sample_sequence(model, cond, 128, opts, make_generators([5, 6]))
    compiled = sample_sequence(model, cond, 128, opts, make_generators([5, 6]), compiled=True)
    assert torch.equal(eager, compiled)
    plain = sample_sequence(model, cond, 128, opts, make_generators([5, 6]), cached=False)
    assert torch.equal(eager, plain)  # and both are what the uncached loop draws
