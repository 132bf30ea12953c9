"""The minGPT-layout prior: official key names, init, causality, SDPA maths, KV cache, decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from factory import gpt

from vqgan_cli.config import ConfigError, from_dict
from vqgan_cli.models.gpt import GPT, GPTConfig, param_groups

V, BLOCK, L, NH, C = 50, 32, 2, 2, 32


def tiny(**kw) -> GPT:
    return gpt(vocab_size=V, block_size=BLOCK, n_layer=L, n_head=NH, n_embd=C, **kw)


def expected_keys() -> list[str]:
    """The reference's ``transformer.*`` keys without the prefix, written out from PAPER.md."""
    keys = ["tok_emb.weight", "pos_emb"]
    for n in range(L):
        b = f"blocks.{n}."
        keys += [b + "ln1.weight", b + "ln1.bias", b + "ln2.weight", b + "ln2.bias"]
        for lin in ("key", "query", "value", "proj"):
            keys += [b + f"attn.{lin}.weight", b + f"attn.{lin}.bias"]
        keys += [b + "attn.mask"]
        keys += [b + "mlp.0.weight", b + "mlp.0.bias", b + "mlp.2.weight", b + "mlp.2.bias"]
    keys += ["ln_f.weight", "ln_f.bias", "head.weight"]
    return keys


def test_state_dict_keys_match_mingpt_and_load_strictly() -> None:
    model = tiny()
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected_keys())
    assert sd["pos_emb"].shape == (1, BLOCK, C)
    assert sd["blocks.0.attn.mask"].shape == (1, 1, BLOCK, BLOCK)
    assert torch.equal(sd["blocks.1.attn.mask"][0, 0], torch.tril(torch.ones(BLOCK, BLOCK)))
    assert sd["blocks.0.mlp.0.weight"].shape == (4 * C, C)
    assert sd["blocks.0.mlp.2.weight"].shape == (C, 4 * C)
    assert sd["head.weight"].shape == (V, C)
    # an "official" dict: same names, other values, prefix stripped -> loads with strict=True
    official = {f"transformer.{k}": torch.randn_like(v) if v.is_floating_point() else v
                for k, v in sd.items()}
    stripped = {k.removeprefix("transformer."): v for k, v in official.items()}
    other = tiny()
    other.load_state_dict(stripped, strict=True)
    assert torch.equal(other.head.weight, official["transformer.head.weight"])


def test_param_count_formula() -> None:
    model = tiny()
    per_layer = 12 * C * C + 13 * C  # 4 CxC linears + MLP (C*4C*2 + 5C biases) + 2 LayerNorms
    total = 2 * V * C + BLOCK * C + L * per_layer + 2 * C
    assert model.num_params() == total == 29_696
    assert model.num_params(exclude_embeddings=True) == total - V * C - BLOCK * C


def test_init_statistics() -> None:
    big = gpt(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128)
    assert torch.count_nonzero(big.pos_emb) == 0
    assert big.head.bias is None
    for name, m in big.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert torch.all(m.bias == 0), name
    w = torch.cat([big.tok_emb.weight.flatten(), big.blocks[0].mlp[0].weight.flatten(),
                   big.head.weight.flatten()])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)


def test_forward_shape_and_causality() -> None:
    model = tiny()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, 20), generator=g)
    logits = model(idx)
    assert logits.shape == (2, 20, V) and logits.dtype == torch.float32
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 7) % V
    other = model(changed)
    torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=1e-6)
    assert (other[:, t:] - logits[:, t:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def test_sdpa_matches_explicit_attention() -> None:
    model = tiny()
    attn = model.blocks[0].attn
    x = torch.randn(3, 17, C, generator=torch.Generator().manual_seed(2))
    B, T, _ = x.shape
    hs = C // NH
    k = attn.key(x).view(B, T, NH, hs).transpose(1, 2)
    q = attn.query(x).view(B, T, NH, hs).transpose(1, 2)
    v = attn.value(x).view(B, T, NH, hs).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    att = att.masked_fill(attn.mask[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
    expected = attn.proj((att @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefill", [1, 5])
def test_cache_matches_full_forward(prefill: int) -> None:
    model = tiny()
    idx = torch.randint(0, V, (3, BLOCK), generator=torch.Generator().manual_seed(3))
    full = model(idx)  # (3, BLOCK, V)
    cache = model.new_cache(3)
    assert cache.max_len == BLOCK and cache.layers[0].k.shape == (3, NH, BLOCK, C // NH)
    out = model.forward_cached(idx[:, :prefill], cache, 0)
    torch.testing.assert_close(out, full[:, :prefill], rtol=0, atol=1e-5)
    for i in range(prefill, BLOCK):
        step = model.forward_cached(idx[:, i:i + 1], cache, i)
        assert step.shape == (3, 1, V)
        torch.testing.assert_close(step[:, 0], full[:, i], rtol=0, atol=1e-5)
    assert cache.length == BLOCK


def test_cache_chunked_prefill_and_rewind() -> None:
    model = tiny()
    idx = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(4))
    full = model(idx)
    cache = model.new_cache(4, max_len=24)
    model.forward_cached(idx[:, :6], cache)  # pos defaults to cache.length
    chunk = model.forward_cached(idx[:, 6:13], cache)  # a multi-token chunk at pos > 0
    torch.testing.assert_close(chunk, full[:, 6:13], rtol=0, atol=1e-5)
    # rewind: overwrite the tail with different tokens, then the original ones again
    model.forward_cached(torch.zeros(4, 3, dtype=torch.long), cache, 8)
    again = model.forward_cached(idx[:, 8:10], cache, 8)
    torch.testing.assert_close(again, full[:, 8:10], rtol=0, atol=1e-5)
    assert cache.length == 10
    with pytest.raises(ValueError):
        model.forward_cached(idx[:, :1], cache, cache.length + 1)  # would leave a hole
    with pytest.raises(ValueError):
        model.forward_cached(idx[:, :16], cache, 10)  # past max_len


def test_cached_decoding_follows_changed_weights() -> None:
    """The fused query/key/value snapshot is rebuilt when a weight changes in place or is swapped."""
    model = tiny()
    idx = torch.randint(0, V, (5, 10), generator=torch.Generator().manual_seed(6))  # 5 rows: matmul attention
    model.forward_cached(idx, model.new_cache(5, 10), 0)  # builds the snapshot
    with torch.no_grad():
        model.blocks[0].attn.key.weight.mul_(3.0)  # an optimiser-style in-place update
    steps = model.new_cache(5, 10)
    out = torch.cat([model.forward_cached(idx[:, i:i + 1], steps, i) for i in range(10)], 1)
    torch.testing.assert_close(out, model(idx), rtol=0, atol=1e-5)
    q = model.blocks[-1].attn.query
    q.weight.data = torch.zeros_like(q.weight.data)  # new storage (what precision_context does)
    torch.testing.assert_close(model.forward_cached(idx, model.new_cache(5, 10), 0), model(idx), rtol=0, atol=1e-5)


def test_autocast_bf16_cpu() -> None:
    model = tiny()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx)
        cache = model.new_cache(2, 12)
        assert cache.layers[0].k.dtype == torch.bfloat16
        pre = model.forward_cached(idx[:, :4], cache, 0)
        steps = [model.forward_cached(idx[:, i:i + 1], cache, i) for i in range(4, 12)]
    assert full.dtype == torch.bfloat16
    cached = torch.cat([pre, *steps], dim=1).float()
    torch.testing.assert_close(full.float(), ref, rtol=0, atol=0.05)
    torch.testing.assert_close(cached, ref, rtol=0, atol=0.05)
    # a float32 cache under autocast works too (keys/values cast to the compute dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c32 = model.new_cache(2, 12, dtype=torch.float32)
        out = model.forward_cached(idx, c32, 0)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)


def test_bf16_decoding_hides_the_cache_beyond_each_row() -> None:
    """bf16 decoding reads whole cache buffers (a slice would be copied by every matmul): what a
    longer, rewound sequence left after the current position must not change a step."""
    model = tiny()
    idx = torch.randint(0, V, (5, 12), generator=torch.Generator().manual_seed(7))
    other = torch.full((5, 12), V - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model.new_cache(5, 12)
        expected = [model.forward_cached(idx[:, :4], fresh, 0)]
        expected += [model.forward_cached(idx[:, i:i + 1], fresh, i) for i in range(4, 12)]
        stale = model.new_cache(5, 12)
        model.forward_cached(other, stale, 0)  # fills every position with another sequence's keys
        got = [model.forward_cached(idx[:, :4], stale, 0)]  # rewound to 0: positions 4.. are stale
        got += [model.forward_cached(idx[:, i:i + 1], stale, i) for i in range(4, 12)]
    assert not torch.equal(stale.layers[0].k, torch.zeros_like(stale.layers[0].k))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)  # masked positions weigh exactly 0


def test_param_groups_cover_everything_once() -> None:
    model = tiny()
    groups = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(names)
    expected_decay = sorted([f"blocks.{n}.attn.{m}.weight" for n in range(L)
                             for m in ("key", "query", "value", "proj")]
                            + [f"blocks.{n}.mlp.{i}.weight" for n in range(L) for i in (0, 2)]
                            + ["head.weight"])
    assert decay == expected_decay
    assert "pos_emb" in no_decay and "tok_emb.weight" in no_decay
    assert all(n.endswith("bias") or "ln" in n or "emb" in n for n in no_decay)
    torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))  # accepted as-is
    model.tok_emb.weight.requires_grad_(False)  # frozen parameters are left out
    assert sum(len(g["params"]) for g in param_groups(model, 0.01)) == len(names) - 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=3, n_embd=32))
    with pytest.raises(ConfigError) as err:
        from_dict(GPTConfig, {"vocab_size": 0, "block_size": 8, "n_head": 3, "n_embd": 32,
                              "attn_pdrop": 1.5})
    text = str(err.value)
    assert "vocab_size" in text and "attn_pdrop" in text and "n_embd" in text
    cfg = from_dict(GPTConfig, {"vocab_size": 1024, "block_size": 256})
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.head_dim) == (24, 16, 1024, 64)
