"""The benchmark's baseline computes our maths, and the benchmark script runs end to end.

No timing is asserted anywhere: only that the reference-style network is the same function as
ours (given the same weights), and that ``--quick`` prints a table whose ratios are numbers.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqgan_cli.losses import LossConfig, TokenizerLoss
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _module("tokenizer_step")



def _tiny(beta_form: str = "legacy") -> TokenizerConfig:
    # Two levels (f2) with attention at 8x8 in the levels and in the mid blocks; 64 -> 32 channels
    # exercises nin_shortcut, Downsample and Upsample.
    ae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                           z_channels=8)
    return TokenizerConfig(autoencoder=ae, quantizer=QuantizerConfig(n_embed=16, embed_dim=4,
                                                                     beta_form=beta_form))


@pytest.mark.parametrize("beta_form", ["legacy", "paper"])
def test_reference_network_reconstructs_like_ours(bench, beta_form):
    torch.manual_seed(0)
    cfg = _tiny(beta_form)
    ours = VQGAN(cfg).eval()
    theirs = bench.reference_model(cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same parameter names, same shapes
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = ours(x)
        x_hat, q_loss = theirs(x)
        _, _, idx = theirs.quantize(theirs.quant_conv(theirs.encoder(x)))
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(x_hat, out.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_loss, out.q_loss, rtol=1e-5, atol=1e-6)


def test_reference_losses_match_ours(bench):
    """Generator total (L1 + LPIPS + adaptive-weight GAN + VQ) and hinge D loss, same weights, fp32."""
    from vqgan_cli.perceptual import build_lpips

    torch.manual_seed(0)
    cfg = _tiny()
    cfg.autoencoder.resolution = 32
    lpips = build_lpips("random")
    loss_cfg = LossConfig(lpips_backbone="random", disc_start=0, disc_ndf=16, disc_num_layers=2)
    ours = VQGAN(cfg)
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
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    before = {k: v.clone() for k, v in reference.loss.discriminator.state_dict().items()}
    logs = ours(x)
    reference(x)
    assert calls == {"ours": 1, "reference": 2}
    assert logs["finite"] and logs["d_loss"] > 0
    after = reference.loss.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # D was updated too


def test_benchmark_quick_runs_end_to_end():
    cmd = [sys.executable, str(BENCH / "tokenizer_step.py"), "--quick", "--configs", "quickstart",
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| quickstart ")]
    assert len(rows) == 5, proc.stdout  # reference + 4 eager variants (no compile in --quick)
    ratios = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        _, batch, label, seconds, images, ratio, cpu_seconds = cells
        assert int(batch) == 2
        assert float(seconds) > 0 and float(images) > 0 and float(cpu_seconds) >= 0
        assert ratio.endswith("x")
        ratios[label] = float(ratio[:-1])
    assert all(r > 0 for r in ratios.values())
    assert ratios["reference-style eager fp32 NCHW, AE x2"] == pytest.approx(1.0)
    assert "RANDOM VGG16" in proc.stdout
