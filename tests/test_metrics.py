"""PSNR/SSIM and codebook statistics against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vqgan_cli.metrics import code_counts, codebook_perplexity, codebook_usage, psnr, ssim


def _unit_const(values: list[float], c: int = 3, size: int = 16) -> torch.Tensor:
    """Constant images whose [0, 1] value is given, returned in model space [-1, 1]."""
    unit = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, c, size, size)
    return unit * 2.0 - 1.0


def test_psnr_constant_offsets_per_image():
    x = _unit_const([0.5, 0.5])
    y = _unit_const([0.6, 0.51])  # offsets 0.1 and 0.01 in [0, 1] space -> 20 dB and 40 dB
    out = psnr(x, y)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([20.0, 40.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(psnr(y, x), out)


def test_psnr_identical_is_capped_and_clamps_out_of_range():
    x = _unit_const([0.3])
    assert psnr(x, x).item() == pytest.approx(100.0)
    # The decoder output is unbounded; values beyond [-1, 1] are measured as displayed (clamped).
    ones = torch.ones(1, 3, 8, 8)
    assert psnr(ones, ones * 5).item() == pytest.approx(100.0)
    assert psnr(ones, -ones).item() == pytest.approx(0.0)  # MSE 1 in [0, 1] space


def test_ssim_identical_and_constant_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    out = ssim(x, x)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.ones(2), atol=1e-5, rtol=0)
    # Constant images a, b: variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2.
    a, b, c1 = 0.5, 0.6, 1e-4
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(_unit_const([a], size=32), _unit_const([b], size=32))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(x, noisy) < 0.95).all()


def test_codebook_perplexity_and_usage():
    idx = torch.tensor([[0, 0], [1, 1]])
    assert codebook_perplexity(idx, 4).item() == pytest.approx(2.0)
    assert codebook_usage(idx, 4) == 0.5
    uniform = torch.arange(8).repeat(3)
    assert codebook_perplexity(uniform, 8).item() == pytest.approx(8.0, rel=1e-6)
    assert codebook_usage(uniform, 8) == 1.0
    skewed = torch.tensor([2, 2, 2, 5])  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_perplexity(skewed, 16).item() == pytest.approx(math.exp(h), rel=1e-6)
    assert codebook_usage(skewed, 16) == 2 / 16
    assert code_counts(skewed, 6).tolist() == [0, 0, 3, 0, 0, 1]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_usage(torch.tensor([4]), 4)
