"""The benchmark's baseline computes our maths, and the benchmark script runs end to end.

No speed is asserted: the baselines are checked to compute what ours computes (same weights, same
outputs), and the ``--quick`` runs to print tables whose numbers follow from their own timings.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factory import gpt as factory_gpt
from factory import tokenizer, tokenizer_config

from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.train.losses import LossConfig, TokenizerLoss

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    """A benchmark script as a module; benchmarks/ goes on the path, as when a script runs, for
    the reference baselines the scripts import as siblings."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench():
    return _module("tokenizer_step")



def _tiny(beta_form: str = "legacy") -> TokenizerConfig:
    # Two levels (f2) with attention at 8x8 in the levels and in the mid blocks; 64 -> 32 channels
    # exercises nin_shortcut, Downsample and Upsample.
    return tokenizer_config(embed_dim=4, beta_form=beta_form)


@pytest.mark.parametrize("norm", ["group", "pixel"])
@pytest.mark.parametrize("beta_form", ["legacy", "paper"])
def test_reference_network_reconstructs_like_ours(bench, beta_form, norm):
    cfg = _tiny(beta_form)
    cfg.autoencoder.norm = norm
    ours = tokenizer(cfg)
    theirs = bench.reference_model(cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same parameter names, same shapes
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = ours(x)
        x_hat, q_loss = theirs(x)
        _, _, idx = theirs.quantize(theirs.quant_conv(theirs.encoder(x)))
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(x_hat, out.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_loss, out.q_loss, rtol=1e-5, atol=1e-6)


def test_reference_losses_match_ours(bench):
    """Generator total (L1 + LPIPS + adaptive-weight GAN + VQ) and hinge D loss, same weights, fp32."""
    from vqgan_cli.models.lpips import build_lpips

    torch.manual_seed(0)  # LPIPS' and the discriminator's init
    cfg = tokenizer_config(embed_dim=4, resolution=32)
    lpips = build_lpips("random")
    loss_cfg = LossConfig(lpips_backbone="random", disc_start=0, disc_ndf=16, disc_num_layers=2)
    ours = tokenizer(cfg).train()
    with bench.shared_lpips(lpips):
        our_loss = TokenizerLoss(loss_cfg, "image", 3)
    theirs = bench.reference_model(cfg)
    their_loss = bench.reference_loss(loss_cfg, 3, lpips)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    their_loss.discriminator.load_state_dict(our_loss.discriminator.state_dict(), strict=True)
    for m in (ours, our_loss, theirs, their_loss):
        m.train()
    lpips.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    out = ours(x)
    gl = our_loss.generator_loss(x, out.x_hat, out.q_loss, 0, ours.last_layer)
    x_hat, q_loss = theirs(x)
    total = their_loss.generator_loss(q_loss, x, x_hat, 0, theirs.get_last_layer())
    torch.testing.assert_close(total, gl.total, rtol=1e-4, atol=1e-5)
    dl = our_loss.discriminator_loss(x, out.x_hat.detach(), 0)
    d_total = their_loss.discriminator_loss(x, x_hat.detach(), 0)
    torch.testing.assert_close(d_total, dl.total, rtol=1e-4, atol=1e-5)


def test_reference_step_runs_the_autoencoder_twice_and_ours_once(bench):
    b = bench.Bench("tiny", _tiny(), LossConfig(perceptual_weight=0.0, disc_start=0, disc_ndf=16,
                                                disc_num_layers=2), 2, 16, 4.5e-6, "")
    lpips = torch.nn.Identity()  # unused: perceptual_weight 0
    ours = bench.OursStep(b, bench.Variant("eager", "eager"), lpips, seed=0)
    reference = bench.ReferenceStep(b, lpips, ours)
    calls = {"ours": 0, "reference": 0}
    ours.model.encoder.register_forward_hook(lambda *a: calls.__setitem__("ours", calls["ours"] + 1))
    reference.model.encoder.register_forward_hook(
        lambda *a: calls.__setitem__("reference", calls["reference"] + 1))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    before = {k: v.clone() for k, v in reference.loss.discriminator.state_dict().items()}
    logs = ours(x)
    theirs = reference(x)  # built from ours' weights before ours stepped: the same first step
    assert calls == {"ours": 1, "reference": 2}
    assert logs["finite"]
    assert float(logs["loss"]) == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
    after = reference.loss.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # D was updated too


def test_benchmark_quick_runs_end_to_end():
    cmd = [sys.executable, str(BENCH / "tokenizer_step.py"), "--quick", "--configs", "quickstart",
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| quickstart ")]
    machine = next(line for line in proc.stdout.splitlines() if line.startswith("machine: "))
    assert "CPU capability" in machine and "torch thread(s)" in machine and "GPU " in machine
    bf16 = "bf16 native" in machine  # bf16 rows only where the CPU computes bf16 natively
    assert len(rows) == (5 if bf16 else 3), proc.stdout  # reference + eager variants (no compile in --quick)
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        _, batch, label, seconds, images, ratio, cpu_seconds = cells
        assert int(batch) == 2 and ratio.endswith("x")
        table[label] = (float(seconds), float(images), float(ratio[:-1]))
    reference = "reference-style eager fp32 NCHW, AE x2"
    assert set(table) == {reference, "ours eager fp32 NCHW", "ours fp32 channels_last"} | (
        {"ours bf16 autocast NCHW", "ours bf16 autocast + channels_last"} if bf16 else set())
    for label, (seconds, images, ratio) in table.items():  # each row's numbers follow from its s/step
        assert images == pytest.approx(2 / seconds, rel=0.05, abs=0.06)
        if label != reference:  # (the reference's own row is 1.00x by construction)
            assert ratio == pytest.approx(table[reference][0] / seconds, rel=0.05, abs=0.006)
    assert "RANDOM VGG16" in proc.stdout


# ---- benchmarks/sampling.py ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_bench():
    return _module("sampling")


def test_reference_cached_model_computes_our_logits(sampling_bench):
    """forward_with_past one token at a time (torch.cat of the past) = our plain forward."""
    gpt = factory_gpt(vocab_size=30, block_size=24, n_layer=2, spread=0.3)
    ref = sampling_bench.reference_model(gpt)
    idx = torch.randint(0, 30, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = gpt(idx)
        logits, present = ref.forward_with_past(idx[:, :5])
        past, steps = [present], [logits]
        for t in range(5, 24):
            logits, present = ref.forward_with_past(idx[:, t:t + 1], torch.cat(past, dim=-2), t)
            past.append(present)
            steps.append(logits)
    assert torch.cat(past, dim=-2).shape == (2, 2, 3, 2, 24, 16)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_reference_sampler_and_ours_draw_the_same_greedy_tokens(sampling_bench):
    from vqgan_cli.sample.tokens import SamplingOptions, make_generators, sample_sequence

    gpt = factory_gpt(vocab_size=30, block_size=40, n_layer=2, spread=0.3)
    cond = torch.tensor([[3], [7]])
    greedy = SamplingOptions(top_k=1)
    theirs = sampling_bench.sample_with_past(cond, sampling_bench.reference_model(gpt), 40, greedy,
                                             torch.Generator().manual_seed(0))
    ours = sample_sequence(gpt, cond, 40, greedy, make_generators([0, 1]))
    assert torch.equal(theirs, ours) and len(set(ours[0].tolist())) > 1


def test_sampling_benchmark_quick_runs_and_its_numbers_hold_together():
    cmd = [sys.executable, str(BENCH / "sampling.py"), "--quick", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULTS "))
    precisions = res["precisions"]  # fp32, and bf16 only where the CPU computes it natively
    assert precisions[0] == "fp32" and set(precisions) <= {"fp32", "bf16"}
    assert ("bf16" in precisions) == res["machine"]["bf16_native"]
    for key in [f"{p}_b{b}" for p in precisions for b in (1, 8)]:
        c = res["cache"][key]
        assert c["ratio_reference"] == pytest.approx(c["reference"] / c["compiled"])
        assert c["ratio_reference_eager"] == pytest.approx(c["reference"] / c["eager"])
        assert c["compile_seconds"] > 0  # the first compiled run paid for compilation
        # the bound is the reference's time over ours' time in the products (a separate,
        # profiled run: on a loaded machine it need not stay below ours' timed run)
        assert c["products"] > 0 and c["bound"] == pytest.approx(c["reference"] / c["products"])
    w = res["window"]
    H, W = w["grid"]
    assert (H, W) == (24, 32) and w["crop"] == [8, 8] and w["timed_rows"] == 2
    # a row starts 8 steps after the one above it (module docstring of test_window)
    assert w["exact_steps"] == 8 * (H - 1) + W
    for precision in precisions:
        r = w[precision]
        assert r["forwards"] == 2 * W  # the reference loop ran one window forward per token
        assert r["reference"] == pytest.approx(r["reference_part"] * H * W / (2 * W))
        assert r["exact_ratio"] == pytest.approx(r["reference"] / r["exact"])
    assert w["fp32"]["identical"] is True  # the reference loop and exact drew the same tokens
    assert w["fp32"]["fast"] < w["fp32"]["exact"]  # ~6x apart at this size
    assert "EXTRAPOLATED from its first 2 rows (64 window forwards" in proc.stdout


# ---- benchmarks/prior_step.py -------------------------------------------------------------------


def test_prior_benchmark_steps_the_shipped_stage_and_the_baseline_on_the_same_maths():
    """First step, same weights, fp32: minGPT's loss equals the loss the shipped stage reports; then
    the stage's step really updates the prior it was given."""
    from dataclasses import replace

    from vqgan_cli.config import load_recipe

    prior_bench = _module("prior_step")
    recipe = load_recipe(prior_bench.PriorRecipe, prior_bench.QUICKSTART)
    recipe = replace(recipe, train=replace(recipe.train, batch_size=2))
    torch.manual_seed(0)
    prior = prior_bench.quickstart_prior(recipe).train()
    prior.config.pkeep = 1.0
    g = torch.Generator().manual_seed(0)
    batch = {"keys": ["a", "b"], "cond": torch.randint(0, 8, (2, 8, 8), generator=g),
             "tokens": torch.randint(0, 256, (2, 8, 8), generator=g)}
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    reference = prior_bench.reference_step(prior)(batch)
    ours = prior_bench.our_step(prior, recipe, "fp32")(batch)
    assert ours == pytest.approx(reference, rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in prior.state_dict().items())
