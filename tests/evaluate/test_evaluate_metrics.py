"""FID / KID / IS formulas against closed forms and hand computations (no network involved)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vqgan_cli.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    inception_score,
    kernel_inception_distance,
)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_matches_closed_form_for_commuting_gaussians():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2
    q = _rotation(5, 0)
    a, b = np.array([1.0, 2.0, 0.5, 4.0, 3.0]), np.array([2.0, 2.0, 1.5, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0, 0.5])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # = 5 + ...
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # one-dimensional: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance(np.array([3.0]), np.array([[4.0]]), np.array([1.0]), np.array([[9.0]])) == \
        pytest.approx(4.0 + 1.0)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    mu, s = feature_stats(f)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    noise = rng.normal(size=f.shape)
    fids = [frechet_distance(mu, s, *feature_stats(f + k * noise)) for k in (0.1, 0.3, 1.0, 3.0)]
    assert all(x < y for x, y in itertools.pairwise(fids)), fids
    assert fids[0] > 0


def _k(x, y):
    return (sum(a * b for a, b in zip(x, y, strict=True)) / len(x) + 1) ** 3


def test_kid_equals_hand_computed_unbiased_mmd():
    x = [[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 2.0, 0.0], [0.5, 0.5, 0.5]]
    y = [[1.0, 1.0, 1.0], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0], [1.0, 2.0, 1.0]]
    m = 4
    within = sum(_k(x[i], x[j]) + _k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(_k(x[i], y[j]) for i in range(m) for j in range(m)) * 2 / m ** 2
    mean, std = kernel_inception_distance(np.array(x), np.array(y), subsets=3, subset_size=4)
    assert mean == pytest.approx(within - cross, rel=1e-12)  # every subset holds all rows
    assert std == pytest.approx(0.0, abs=1e-12)
    assert kernel_inception_distance(np.array(x), np.array(x), 1, 4)[0] < 0.5 * abs(within - cross)


def test_kid_refuses_subsets_larger_than_a_set():
    with pytest.raises(ValueError, match="at least 5 images on each side, got 4 and 6"):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((6, 3)), 1, 5)


def test_inception_score_equals_hand_computation():
    logits = [[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 4.0]]

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    scores = []
    for part in (logits[:2], logits[2:]):
        ps = [softmax(r) for r in part]
        py = [sum(p[c] for p in ps) / len(ps) for c in range(3)]
        kl = [sum(p[c] * math.log(p[c] / py[c]) for c in range(3)) for p in ps]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean, std = inception_score(np.array(logits), splits=2)
    assert mean == pytest.approx(sum(scores) / 2, rel=1e-12)
    assert std == pytest.approx(abs(scores[0] - scores[1]) / 2, rel=1e-12)
    # a confident, uniformly spread classifier scores the number of classes
    assert inception_score(np.eye(3) * 50, splits=1)[0] == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score(np.zeros((4, 3)), splits=10)


def test_fid_of_small_feature_sets_equals_the_covariance_route():
    from scipy import linalg

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 30)), rng.normal(size=(9, 30)) * 1.5 + 0.2  # fewer rows than dimensions
    m1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    m2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm((s1 + 1e-9 * np.eye(30)) @ (s2 + 1e-9 * np.eye(30)))  # an independent route
    expected = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-5)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-5)
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-9)
