"""Reconstruction and codebook metrics for tokenizers; band and seam detectors for samples.

Image metrics take model-space tensors in [-1, 1], clamp them to [-1, 1] (the decoder output is
unbounded and is clamped for display, PAPER.md) and map them to [0, 1] before measuring, so PSNR
and SSIM use data range 1 on the displayed image -- the convention of most published numbers.

The band and seam detectors measure what a sliding window leaves in a sample's rows: a window
that moves down the image in steps of P pixels can leave a pattern that repeats every P rows.
They take displayed images (uint8 (H, W, 3), or a (3, H, W) tensor in [-1, 1]) and work on
luminance Y = 0.299 R + 0.587 G + 0.114 B in grey levels (0..255). Whether a sample follows its
conditioning map is measured in :mod:`vqgan_cli.evaluate.map_agreement`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

# PSNR of identical images is infinite; flooring the MSE keeps batch means finite (cap: 100 dB).
_MSE_FLOOR = 1e-10


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] display space (clamped), in fp32."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), of (B, C, H, W) images in [-1, 1] measured in [0, 1] space."""
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(_MSE_FLOOR))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B,), Gaussian 11x11 window, in [0, 1] space (images must be >= 11 px)."""
    out = structural_similarity_index_measure(to_unit(x), to_unit(y), data_range=1.0, reduction="none")
    return out.reshape(-1)


def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor, modality: str,
                  perceptual: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Per-image metrics (each (B,), fp32) of inputs ``x`` and decoder outputs ``x_hat``: the one
    implementation behind training validation and ``vqgan evaluate tokenizer``, so both report alike."""
    x_hat, xf = x_hat.float(), x.float()
    vals: dict[str, torch.Tensor] = {}
    if modality == "segmentation":
        vals["accuracy"] = (x_hat.argmax(1) == xf.argmax(1)).float().flatten(1).mean(1)
        vals["bce"] = F.binary_cross_entropy_with_logits(x_hat, xf, reduction="none").flatten(1).mean(1)
        return vals
    vals["l1"] = (xf - x_hat).abs().flatten(1).mean(1)
    vals["psnr"] = psnr(x_hat.clamp(-1, 1), xf)
    rgb = (lambda t: t.repeat(1, 3, 1, 1)) if xf.shape[1] == 1 else (lambda t: t)
    vals["ssim"] = ssim(rgb(x_hat.clamp(-1, 1)), rgb(xf))
    if perceptual is not None and modality == "image":
        vals["lpips"] = perceptual(xf, x_hat.clamp(-1, 1)).flatten().float()
    return vals


def code_counts(indices: torch.Tensor, n_embed: int) -> torch.Tensor:
    """How often each of the ``n_embed`` codes occurs in ``indices`` (any shape), (n_embed,)."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= n_embed):
        raise ValueError(f"indices must lie in [0, {n_embed}), got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=n_embed)


def codebook_perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of a code histogram (:func:`code_counts`, summed over a data set): the
    effective number of codes in use, 1..n. In float64, so a large codebook's rare codes count."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))  # 0 * log 0 counts as 0


def codebook_usage(counts: torch.Tensor) -> float:
    """Share of the codes in a histogram (:func:`code_counts`) used at least once (dead codes lower it)."""
    return float((counts > 0).double().mean())


def as_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 as displayed: a uint8 array as is, a (3, H, W) or (1, 3, H, W) tensor in
    [-1, 1] clamped and rounded as saved PNGs are."""
    if isinstance(image, torch.Tensor):
        from vqgan_cli.images import to_uint8

        x = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor in [-1, 1], got shape {tuple(image.shape)}")
        return to_uint8(x)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    return image


def luminance(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W) luminance in grey levels, float64."""
    return as_uint8_image(image).astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def period_amplitude(image: np.ndarray | torch.Tensor, period: int) -> float:
    """Amplitude (grey levels) of the component of period ``period`` px in the row profile.

    Row profile p[y] = mean over columns of the luminance of row y. Its trend is a centred moving
    average over exactly one period (a "2xP" average with half weights at both ends when P is
    even), which holds no component of period P nor of its harmonics: the residual r = p - trend
    keeps them whole and loses everything slower (gradients, the horizon). Over the rows where the
    average is defined, the Hann-windowed DFT at frequency 1/P gives the amplitude
    ``2 |sum_y w_y r_y exp(-2 pi i y / P)| / sum_y w_y``: A for stripes A sin(2 pi y / P + phi)
    (up to a small leakage when the rows are not a whole number of periods), ~0 for a gradient.
    Phase counts from the top row, where the sliding window starts.
    """
    if period < 2:
        raise ValueError(f"period must be >= 2 px, got {period}")
    profile = luminance(image).mean(1)
    kernel = np.ones(period) if period % 2 else np.r_[0.5, np.ones(period - 1), 0.5]
    kernel /= period
    half = len(kernel) // 2
    if len(profile) - 2 * half < 2 * period:
        raise ValueError(f"an image {len(profile)} px high is too short to measure a {period} px period")
    resid = profile[half:len(profile) - half] - np.convolve(profile, kernel, mode="valid")
    y = np.arange(half, len(profile) - half)
    w = np.hanning(len(y) + 2)[1:-1]  # no zero weights at the ends
    return float(2 * abs(np.sum(w * resid * np.exp(-2j * np.pi * y / period))) / w.sum())


def band_score(image: np.ndarray | torch.Tensor, periods: list[int] | range) -> float:
    """The largest :func:`period_amplitude` over ``periods`` (a band around the window's steps)."""
    return max(period_amplitude(image, p) for p in periods)


def seam_ratio(image: np.ndarray | torch.Tensor, period: int, step: int = 1) -> float:
    """How much more the rows change across multiples of ``period`` than across nearby rows.

    The jump across row y is J[y] = mean over columns of |Y[y] - Y[y-1]|. Each seam row
    y = P, 2P, ... (with y + step inside the image) is compared with the rows ``step`` above and
    below it: the ratio is the median over seam rows of J[y] / ((J[y - step] + J[y + step]) / 2).
    ~1 when rows at multiples of P are like their neighbours, > 1 with seams at block boundaries.
    Local neighbours, because how much rows change depends on the content (sky rows hardly,
    meadow rows a lot); the median, because a scene's one or two full-width edges (the horizon,
    a shore) may fall on a multiple of P by chance, while seams recur at every multiple. With
    ``step`` = the token size f the neighbours are token boundaries too, so a decoder's
    per-token pattern cancels and only the blocks remain."""
    if period % step or period <= step:
        raise ValueError(f"period {period} must be a multiple of step {step} larger than it")
    lum = luminance(image)
    jumps = np.r_[0.0, np.abs(np.diff(lum, axis=0)).mean(1)]  # jumps[y]: between rows y - 1 and y
    seams = np.arange(period, lum.shape[0] - step, period)
    if len(seams) == 0:
        raise ValueError(f"an image {lum.shape[0]} px high has no seam row at a multiple of {period}")
    around = (jumps[seams - step] + jumps[seams + step]) / 2
    return float(np.median((jumps[seams] + 1e-6) / (around + 1e-6)))


def cell_means(image: np.ndarray | torch.Tensor, cell: int) -> np.ndarray:
    """(H // cell, W // cell, 3) mean colour of each ``cell`` x ``cell`` block (a token's pixels)."""
    x = as_uint8_image(image).astype(np.float64)
    h, w = x.shape[0] // cell, x.shape[1] // cell
    return x[:h * cell, :w * cell].reshape(h, cell, w, cell, 3).mean(axis=(1, 3))


def speckle_score(image: np.ndarray | torch.Tensor, labels: np.ndarray, cell: int,
                  threshold: float = 24.0) -> float:
    """Share of cells inside uniform regions whose colour stands out from their neighbourhood.

    ``labels`` (H // cell, W // cell) is the map on the cell grid. A cell counts when it and its 8
    neighbours carry one label (inside a region, away from class edges); it is a speckle when its
    mean colour differs from the median colour of those 8 neighbours by more than ``threshold``
    grey levels in some channel: a dot of wrong colour in the sky, say. Flat regions and smooth
    gradients score ~0; a real render is the reference."""
    means = cell_means(image, cell)
    h, w = min(means.shape[0], labels.shape[0]), min(means.shape[1], labels.shape[1])
    if h < 3 or w < 3:
        raise ValueError(f"the speckle score needs at least 3x3 cells, got {h}x{w}")
    lab = labels[:h, :w]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    inner = (slice(1, h - 1), slice(1, w - 1))
    centre, centre_lab = means[:h, :w][inner], lab[inner]
    neigh = np.stack([means[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy, dx in offsets])  # (8, h-2, w-2, 3)
    neigh_lab = np.stack([lab[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy, dx in offsets])
    uniform = (neigh_lab == centre_lab).all(axis=0)
    if not uniform.any():
        return 0.0
    deviation = np.abs(centre - np.median(neigh, axis=0)).max(axis=-1)
    return float((deviation[uniform] > threshold).mean())


def bottom_edge_step(image: np.ndarray | torch.Tensor, rows: int) -> float:
    """Mean luminance of the last ``rows`` rows minus that of the ``rows`` rows above them: a light
    strip along the bottom edge is positive; a scene that darkens downwards, slightly negative."""
    lum = luminance(image)
    if lum.shape[0] < 2 * rows:
        raise ValueError(f"an image {lum.shape[0]} px high has no {rows} rows above its last {rows}")
    return float(lum[-rows:].mean() - lum[-2 * rows:-rows].mean())


# --- Distribution metrics of Inception features (FID, KID, IS) -----------------------------------
# Feature sets are (N, D) float64 arrays; the `evaluate` package extracts them with torch-fidelity's
# InceptionV3 ("2048": pool features for FID/KID, "logits_unbiased": 1008 logits for IS).


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features; N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2)``: two symmetric eigendecompositions,
    exact for the rank-deficient covariances of small sets (no eps offset, no complex rounding as
    with a general ``sqrtm``); eigenvalues below zero by rounding count as zero."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    diff = mu1 - mu2
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of two feature sets (N, D), (M, D): :func:`frechet_distance` of their Gaussians.

    With fewer rows than dimensions the covariances are X^T X / (N-1) and Y^T Y / (M-1) of the
    centred features, and ``tr (S1 S2)^(1/2)`` is the nuclear norm of ``X Y^T / sqrt((N-1)(M-1))``
    (the non-zero eigenvalues of S1 S2 are the squared singular values of that small matrix):
    the same number without any D x D decomposition."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    n, m, d = len(f1), len(f2), f1.shape[1]
    if min(n, m) >= d:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    if min(n, m) < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {n} and {m}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    x, y = f1 - mu1, f2 - mu2
    nuclear = np.linalg.svd(x @ y.T / np.sqrt((n - 1) * (m - 1)), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (x * x).sum() / (n - 1) + (y * y).sum() / (m - 1) - 2.0 * nuclear)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std over ``subsets`` random subsets (``subset_size``
    rows of each set, without replacement) of the unbiased MMD^2 with the cubic polynomial kernel
    ``k(x, y) = (x.y / D + 1)^3``:
    ``sum_{i!=j} (k(x_i, x_j) + k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = subset_size
    if m < 2 or len(f1) < m or len(f2) < m:
        raise ValueError(f"KID subsets of {m} need at least {max(m, 2)} images on each side, "
                         f"got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(within - 2 * kxy.sum() / m ** 2)
    return float(np.mean(vals)), float(np.std(vals))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016): mean and std over ``splits`` consecutive splits of
    ``exp(mean_i KL(p(y|x_i) || p(y)))``, p(y|x) = softmax(logits), p(y) the split's mean."""
    lg = np.asarray(logits, np.float64)
    if len(lg) < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} images, got {len(lg)}")
    lg = lg - lg.max(1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        log_py = np.log(p.mean(0))
        scores.append(float(np.exp((p * (part - log_py)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))
