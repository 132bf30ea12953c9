"""PSNR/SSIM, codebook statistics and the band/seam detectors against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.metrics import (
    band_score,
    code_counts,
    codebook_perplexity,
    codebook_usage,
    period_amplitude,
    psnr,
    seam_ratio,
    ssim,
)


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
    assert codebook_perplexity(code_counts(idx, 4)) == pytest.approx(2.0)
    assert codebook_usage(code_counts(idx, 4)) == 0.5
    uniform = torch.arange(8).repeat(3)
    assert codebook_perplexity(code_counts(uniform, 8)) == pytest.approx(8.0, rel=1e-12)
    assert codebook_usage(code_counts(uniform, 8)) == 1.0
    skewed = torch.tensor([2, 2, 2, 5])  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_perplexity(code_counts(skewed, 16)) == pytest.approx(math.exp(h), rel=1e-12)
    assert codebook_usage(code_counts(skewed, 16)) == 2 / 16
    assert code_counts(skewed, 6).tolist() == [0, 0, 3, 0, 0, 1]
    assert codebook_perplexity(torch.zeros(4, dtype=torch.long)) == 1.0  # no codes: exp(0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        code_counts(torch.tensor([4]), 4)


# --- band and seam detectors (sliding-window artefacts), on images with known answers ---

def _grey(rows: np.ndarray, width: int = 64) -> np.ndarray:
    """A grey uint8 image whose row y has value rows[y] (luminance of grey (v, v, v) is v)."""
    v = np.clip(np.rint(rows), 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(v[:, None, None], width, 1), 3, 2)


def test_period_amplitude_of_stripes_on_a_gradient():
    y = np.arange(832, dtype=np.float64)
    gradient = 40 + 0.15 * y  # sky-like: 125 grey levels top to bottom
    # ~0: only the uint8 staircase of the gradient (a step every 6.7 rows) is left
    assert period_amplitude(_grey(gradient), 32) < 0.1
    assert band_score(_grey(gradient), range(24, 73)) < 0.1
    found = []
    for amp in (0.5, 1.0, 2.0, 4.0, 8.0):
        img = _grey(gradient + amp * np.sin(2 * np.pi * y / 32 + 0.3))
        got = period_amplitude(img, 32)
        assert got == pytest.approx(amp, rel=0.03, abs=0.05)  # uint8 rounding: +-0.5 per row
        assert period_amplitude(img, 64) < 0.05 * amp + 0.1  # another period: ~nothing
        assert band_score(img, range(24, 73)) == pytest.approx(got)  # the band's peak is at 32
        found.append(got)
    assert found == sorted(found)


def test_band_ratio_against_the_real_render_grows_with_added_stripes():
    scene = render_landscape(1_000_000, 832, 1280)
    base = band_score(scene.image, range(24, 73))  # 3.6 grey levels: the scene's own edges
    y = np.arange(832)[:, None, None]
    ratios = []
    for amp in (0.0, 4.0, 8.0, 16.0):
        img = np.clip(scene.image + amp * np.sin(2 * np.pi * y / 40), 0, 255).round().astype(np.uint8)
        ratios.append(band_score(img, range(24, 73)) / base)
    assert ratios[0] == pytest.approx(1.0)
    assert ratios == sorted(ratios) and ratios[-1] > 2


def test_seam_ratio_of_a_ramp_with_steps():
    slope, jump, period = 1.0, 10.0, 32
    y = np.arange(128, dtype=np.float64)
    ramp = slope * y
    assert seam_ratio(_grey(ramp), period) == pytest.approx(1.0)
    stepped = ramp + jump * (y // period)  # rows change by 1 everywhere, by 1 + 10 at y = 32, 64, 96
    for step in (1, 8):
        assert seam_ratio(_grey(stepped), period, step) == pytest.approx((slope + jump) / slope, rel=1e-6)
    with pytest.raises(ValueError, match="multiple of step"):
        seam_ratio(_grey(ramp), 30, 8)


def test_seam_ratio_of_real_renders_and_injected_seams():
    period, f = 32, 8
    for seed in range(1_000_000, 1_000_004):
        img = render_landscape(seed, 832, 1280).image
        ratios = []
        for offset in (0.0, 4.0, 8.0):
            # alternate blocks of P rows brightened: a luminance step at every multiple of P
            lift = offset * ((np.arange(832) // period) % 2)[:, None, None]
            seamed = np.clip(img + lift, 0, 255).round().astype(np.uint8)
            ratios.append(seam_ratio(seamed, period, f))
        assert 0.6 < ratios[0] < 1.3  # measured 0.65-1.25 on 16 held-out scenes
        assert ratios == sorted(ratios) and ratios[-1] > 2


# ---- speckles and the bottom strip (benchmarks/window_quality.py's columns) -------------------------


def _cells(colours: np.ndarray, cell: int) -> np.ndarray:
    """An image whose cell x cell blocks have the given (h, w, 3) colours."""
    return np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1).astype(np.uint8)


def test_speckle_score_counts_outlying_cells_inside_one_label_regions():
    from vqgan_cli.metrics import speckle_score

    colours = np.zeros((5, 5, 3))
    colours[:] = (100, 150, 200)
    labels = np.zeros((5, 5), np.int64)
    assert speckle_score(_cells(colours, 4), labels, 4) == 0.0
    colours[2, 2, 0] += 30  # one dot 30 levels off in red: a speckle (> 24)
    colours[1, 3, 2] -= 20  # 20 levels off: below the threshold
    # the 3x3 inner cells all lie in one region; only (2, 2) stands out from its neighbours' median
    assert speckle_score(_cells(colours, 4), labels, 4) == pytest.approx(1 / 9)
    labels[:, 4] = 1  # a class edge at the right: inner cells next to it no longer count
    assert speckle_score(_cells(colours, 4), labels, 4) == pytest.approx(1 / 6)
    assert speckle_score(_cells(colours, 4), labels, 4, threshold=35.0) == 0.0


def test_bottom_edge_step_is_the_last_rows_luminance_over_the_rows_above():
    from vqgan_cli.metrics import bottom_edge_step

    img = np.full((32, 8, 3), 100, np.uint8)
    img[24:] = 130  # a light strip of 8 rows
    assert bottom_edge_step(img, 8) == pytest.approx(30.0)
    img[24:] = 90
    assert bottom_edge_step(img, 8) == pytest.approx(-10.0)
    assert bottom_edge_step(img, 4) == pytest.approx(0.0)  # rows 24-27 and 28-31 are alike
