"""Vector and Gumbel quantizers: assignments, losses, options, bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vqgan_cli.models import GumbelQuantizer, Quantized, VectorQuantizer, build_quantizer
from vqgan_cli.models.config import QuantizerConfig


def vq(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    kw.setdefault("n_embed", 8)
    kw.setdefault("embed_dim", 4)
    return VectorQuantizer(QuantizerConfig(**kw))


def near_codes(q: VectorQuantizer, idx: torch.Tensor, noise: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Latent (B, D, h, w) whose every position sits next to the code named in idx (B, h, w)."""
    g = torch.Generator().manual_seed(seed)
    z = q.embedding.weight.detach()[idx].permute(0, 3, 1, 2)
    return (z + noise * torch.randn(z.shape, generator=g)).contiguous()


def crafted_codebook(q: VectorQuantizer) -> None:
    """Codes spread far apart (k * e_0 .. ), so nearest-neighbour answers are unambiguous."""
    with torch.no_grad():
        w = torch.zeros_like(q.embedding.weight)
        w[:, 0] = torch.arange(q.n_embed, dtype=w.dtype)
        w[:, 1] = 1.0
        q.embedding.weight.copy_(w)


def test_codebook_init_and_default_keys():
    q = vq(n_embed=1024, embed_dim=16)
    w = q.embedding.weight.detach()
    assert list(q.state_dict()) == ["embedding.weight"]
    assert float(w.abs().max()) <= 1 / 1024 and float(w.std()) > 0.5 / 1024 / math.sqrt(3)


def test_nearest_code_and_straight_through_values():
    q = vq().eval()
    crafted_codebook(q)
    idx = torch.tensor([[[3, 0], [7, 5]]])
    out = q(near_codes(q, idx, noise=0.1))
    assert isinstance(out, Quantized)
    assert torch.equal(out.indices, idx) and out.indices.dtype == torch.int64
    torch.testing.assert_close(out.z_q, q.embedding.weight[idx].permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.codes(idx), out.z_q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["legacy", "paper"])
def test_loss_forms_match_hand_formulas(form):
    q = vq(beta_form=form, beta=0.25).train()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 3, 3, generator=g).requires_grad_(True)
    out = q(z)
    zq = q.embedding.weight[out.indices].permute(0, 3, 1, 2)
    sq = float(((zq - z) ** 2).mean().detach())
    # both forms are 1.25 * mse in value; they differ in which side gets beta
    assert out.loss.item() == pytest.approx(1.25 * sq, rel=1e-5)
    out.loss.backward()
    numel = z.numel()
    w_commit, w_book = (1.0, 0.25) if form == "legacy" else (0.25, 1.0)
    torch.testing.assert_close(z.grad, w_commit * 2 * (z - zq).detach() / numel)
    expect = torch.zeros_like(q.embedding.weight)
    expect.index_add_(0, out.indices.reshape(-1),
                      (w_book * 2 * (zq - z).detach() / numel).permute(0, 2, 3, 1).reshape(-1, 4))
    torch.testing.assert_close(q.embedding.weight.grad, expect)


def test_l2_normalised_codes_have_unit_norm():
    q = vq(l2_normalize=True).eval()
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 3, 3))
    torch.testing.assert_close(q.codes(out.indices).norm(dim=1), torch.ones(2, 3, 3))
    # cosine nearest: the assignment is the argmax of the cosine similarity
    cos = F.normalize(z.permute(0, 2, 3, 1), dim=-1) @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(out.indices, cos.argmax(-1))


def test_codebook_dim_projections():
    q = vq(embed_dim=16, codebook_dim=4).eval()
    assert q.embedding.weight.shape == (8, 4)
    assert q.project_in.weight.shape == (4, 16) and q.project_out.weight.shape == (16, 4)
    assert set(q.state_dict()) == {"embedding.weight", "project_in.weight", "project_in.bias",
                                   "project_out.weight", "project_out.bias"}
    out = q(torch.randn(2, 16, 3, 3))
    assert out.z_q.shape == (2, 16, 3, 3)
    torch.testing.assert_close(q.codes(out.indices), out.z_q, rtol=0, atol=1e-6)
    assert vq().project_in is None


def test_ema_moves_codes_by_the_decay_formula():
    d = 0.9
    q = vq(ema=True, ema_decay=d).train()
    assert not q.embedding.weight.requires_grad
    assert {"ema_cluster_size", "ema_embed_sum"} <= set(q.state_dict())
    crafted_codebook(q)
    q.ema_embed_sum.copy_(q.embedding.weight)
    w0 = q.embedding.weight.clone()
    target = w0[2] + torch.tensor([0.3, 0.1, -0.2, 0.4])  # all 6 positions nearest code 2
    z = target.view(1, 4, 1, 1).expand(1, 4, 2, 3).contiguous()
    out = q(z)
    assert (out.indices == 2).all()
    # with EMA only the commitment term remains (weight 1 in the legacy form)
    assert float(out.loss) == pytest.approx(float((target - w0[2]).square().mean()), rel=1e-5)
    size = torch.full((8,), d)
    size[2] = d + (1 - d) * 6
    embed_sum = d * w0
    embed_sum[2] = d * w0[2] + (1 - d) * 6 * target
    total = size.sum()
    smoothed = (size + 1e-5) / (total + 8 * 1e-5) * total
    torch.testing.assert_close(q.embedding.weight, embed_sum / smoothed[:, None])
    # code 2 moved toward its inputs; the rest barely moved
    assert float((q.embedding.weight[2] - target).norm()) < float((w0[2] - target).norm())
    torch.testing.assert_close(q.embedding.weight[5], w0[5], rtol=1e-3, atol=1e-3)
    q.eval()
    before = q.embedding.weight.clone()
    q(z)
    assert torch.equal(q.embedding.weight, before)  # eval never updates


def test_dead_codes_restart_from_batch_and_used_codes_stay():
    q = vq(restart_dead=True, dead_after=2).train()
    crafted_codebook(q)
    w0 = q.embedding.weight.detach().clone()
    idx = torch.tensor([[[0, 1], [0, 1]]])
    z = near_codes(q, idx, noise=0.01)
    q(z)
    assert torch.equal(q.embedding.weight, w0)  # one unused step: not yet dead
    q(z)
    w = q.embedding.weight.detach()
    assert torch.equal(w[:2], w0[:2])
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in range(2, 8):  # every dead code is now one of this batch's encoder outputs
        assert torch.isclose(rows, w[k]).all(1).any()
    assert list(q.state_dict()) == ["embedding.weight"]  # bookkeeping is never saved
    assert int(q.steps_unused.max()) == 0


def test_usage_and_perplexity_on_crafted_batches():
    q = vq(usage_window=2)
    crafted_codebook(q)
    one = torch.full((2, 3, 3), 3)
    q.eval()
    out = q(near_codes(q, one))
    assert float(out.perplexity) == pytest.approx(1.0)
    assert q.usage() == 0.0  # eval batches are not counted
    q.train()
    q(near_codes(q, one))
    assert q.usage() == pytest.approx(1 / 8)
    four = torch.tensor([[[0, 1], [2, 3]]])
    out = q(near_codes(q, four))
    assert float(out.perplexity) == pytest.approx(4.0, rel=1e-5)
    assert q.usage() == pytest.approx(4 / 8)
    q(near_codes(q, torch.full((1, 2, 2), 7)))  # the window of 2 forgets the first batch
    assert q.usage() == pytest.approx(5 / 8)


def test_vq_under_autocast_keeps_float32_distances():
    q = vq().eval()
    z = torch.randn(2, 4, 5, 5)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = q(z)
    assert torch.equal(low.indices, ref.indices) and low.loss.dtype == torch.float32


def test_ema_and_restart_under_a_process_group(tmp_path):
    """World size 1 with gloo: the all-reduce/broadcast paths run and change nothing."""
    plain, ddp = vq(ema=True, restart_dead=True, dead_after=1), vq(ema=True, restart_dead=True, dead_after=1)
    z = torch.randn(2, 4, 3, 3)
    torch.manual_seed(5)
    plain.train()(z)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(5)
        ddp.train()(z)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(ddp.embedding.weight, plain.embedding.weight, rtol=0, atol=0)
    torch.testing.assert_close(ddp.ema_cluster_size, plain.ema_cluster_size, rtol=0, atol=0)


# ---- Gumbel ----------------------------------------------------------------------------------

def gumbel(**kw) -> GumbelQuantizer:
    torch.manual_seed(0)
    kw.setdefault("n_embed", 8)
    kw.setdefault("embed_dim", 4)
    return GumbelQuantizer(QuantizerConfig(kind="gumbel", **kw), z_channels=6)


def test_gumbel_keys_and_factory():
    q = gumbel()
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    assert shapes == {"proj.weight": (8, 6, 1, 1), "proj.bias": (8,), "embed.weight": (8, 4)}
    assert isinstance(build_quantizer(QuantizerConfig(kind="gumbel"), 256), GumbelQuantizer)
    assert isinstance(build_quantizer(QuantizerConfig(), 256), VectorQuantizer)


def test_gumbel_eval_is_hard_and_deterministic():
    q = gumbel().eval()
    z = torch.randn(2, 6, 3, 3)
    a, b = q(z), q(z)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices, q.proj(z).argmax(1))
    torch.testing.assert_close(a.z_q, q.embed.weight[a.indices].permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(q.codes(a.indices), a.z_q, rtol=0, atol=0)


def test_gumbel_training_is_soft_unless_hard_requested():
    z = torch.randn(2, 6, 3, 3)
    soft = gumbel(temperature=1.0).train()
    out = soft(z)
    hard_codes = soft.embed.weight[out.indices].permute(0, 3, 1, 2)
    assert not torch.allclose(out.z_q, hard_codes, atol=1e-4)  # a mixture of codes
    out.z_q.sum().backward()
    assert soft.proj.weight.grad.abs().sum() > 0
    hard = gumbel(gumbel_hard=True).train()
    out = hard(z)
    torch.testing.assert_close(out.z_q, hard.embed.weight[out.indices].permute(0, 3, 1, 2))


def test_gumbel_temperature_annealing():
    q = gumbel(temperature=0.9, temperature_end=1e-6, anneal_steps=100)
    values = []
    for step in (0, 50, 100, 1000):
        q.set_step(step)
        values.append(q.temperature)
    assert values[0] == pytest.approx(0.9)
    assert values[1] == pytest.approx(math.sqrt(0.9 * 1e-6))  # geometric midpoint
    assert values[2] == pytest.approx(1e-6) and values[3] == pytest.approx(1e-6)
    flat = gumbel(temperature=0.5)
    flat.set_step(10_000)
    assert flat.temperature == 0.5


def test_gumbel_kl_term_formula():
    q = gumbel(kl_weight=0.1).eval()
    z = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        qy = F.softmax(q.proj(z), dim=1)
        expect = 0.1 * (qy * torch.log(qy * 8 + 1e-10)).sum(1).mean()
        assert q(z).loss.item() == pytest.approx(expect.item(), rel=1e-5)
        q.proj.weight.zero_()  # uniform logits: q equals the prior, KL 0
        q.proj.bias.zero_()
        assert abs(q(z).loss.item()) < 1e-7


def test_gumbel_usage_and_perplexity():
    q = gumbel(usage_window=4)
    with torch.no_grad():
        q.proj.weight.zero_()
        q.proj.bias.copy_(torch.tensor([0, 0, 0, 50.0, 0, 0, 0, 0]))  # always code 3
    q.eval()
    out = q(torch.randn(2, 6, 3, 3))
    assert float(out.perplexity) == pytest.approx(1.0) and q.usage() == 0.0
    q.train()(torch.randn(2, 6, 3, 3))
    assert q.usage() == pytest.approx(1 / 8)


@pytest.mark.parametrize("unknown,expect_unknown", [("extra", 5), (3, 3)])
def test_remap_tokens_follow_a_hand_written_table(unknown, expect_unknown):
    """used = [4, 1, 9, 1, 2]: a code's token is its FIRST position in the table; codes the table
    lacks (0, 3, 5, 6, 7, 8) become ``unknown_index``; a token decodes as the code at its position."""
    q = vq(n_embed=10, n_used=5, unknown_index=unknown).eval()
    crafted_codebook(q)
    q.used.copy_(torch.tensor([4, 1, 9, 1, 2]))
    code_to_token = {4: 0, 1: 1, 9: 2, 2: 4}  # written by hand from the table above
    codes = torch.tensor([[[4, 1, 9], [2, 0, 7]]])
    tokens = q(near_codes(q, codes, noise=0.1)).indices
    want = [[[code_to_token.get(c, expect_unknown) for c in row] for row in codes[0].tolist()]]
    assert tokens.tolist() == want
    assert q.n_tokens == (6 if unknown == "extra" else 5)
    decoded = {0: 4, 1: 1, 2: 9, 3: 1, 4: 2, 5: 4}  # token -> code; "extra" (5) decodes as used[0]
    t = torch.tensor([[[0, 1, 2], [3, 4, 5 if unknown == "extra" else 0]]])
    expect = q.embedding.weight[torch.tensor([[[decoded[v] for v in row] for row in t[0].tolist()]])]
    torch.testing.assert_close(q.codes(t), expect.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert list(q.state_dict()) == ["used", "embedding.weight"]


def test_remap_with_random_unknowns_draws_tokens_below_the_table():
    q = vq(n_embed=10, n_used=3).eval()
    crafted_codebook(q)
    q.used.copy_(torch.tensor([7, 2, 5]))
    codes = torch.tensor([[[7, 2, 5, 0, 1, 3, 4, 6, 8, 9]]])
    tokens = q(near_codes(q, codes, noise=0.1)).indices
    assert tokens[0, 0, :3].tolist() == [0, 1, 2]
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 3 and q.n_tokens == 3
