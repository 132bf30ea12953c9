"""``builtin:landscapes``: procedural scenes with exact labels, so the whole pipeline (image and
segmentation tokenizers, conditional priors) can be trained and tested with no downloads.

A scene is drawn in painter's order: sky gradient, clouds, one or two mountain ridges (ridged
fractal profiles, slope lighting, optional snow caps), a tree line at their foot, then the ground
below the horizon: a lake (mirrored, darkened reflections), a coast (sand beach) or a meadow
(grass with forest patches). Every class has its own colour family and a mild, smooth texture:
the high-frequency part stays within a few /255 so a small tokenizer can reach >= 20 dB PSNR.

All noise is value noise interpolated separably (along x on the small lattice, then rows), so a
256x256 scene costs a few dozen (H, W) array passes. Coordinates are in units of the image height,
so the same seed gives the same scene at any resolution of the same aspect ratio.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

LANDSCAPE_CLASSES: tuple[str, ...] = ("sky", "cloud", "mountain", "snow", "water", "grass",
                                      "forest", "sand")
SKY, CLOUD, MOUNTAIN, SNOW, WATER, GRASS, FOREST, SAND = range(len(LANDSCAPE_CLASSES))


class Landscape(NamedTuple):
    """A rendered scene: RGB pixels and the class index of every pixel."""

    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8, indices into LANDSCAPE_CLASSES


class _Lerp(NamedTuple):
    """Lattice cells and smoothstep weights of sample coordinates (separable interpolation)."""

    i0: np.ndarray
    s: np.ndarray


def _lerp(coords: np.ndarray, n: int) -> _Lerp:
    i0 = np.clip(np.floor(coords).astype(np.int64), 0, n - 2)
    f = coords - i0
    return _Lerp(i0, (f * f * (3.0 - 2.0 * f)).astype(np.float32))


def _noise1(rng: np.random.Generator, x: np.ndarray, freq: float, octaves: int,
            gain: float = 0.5) -> np.ndarray:
    """Fractal 1-D value noise in about [-1, 1]."""
    out = np.zeros(x.shape[0], np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        c = x * freq + rng.random()
        n = int(np.ceil(c.max())) + 2
        vals = rng.uniform(-1, 1, n).astype(np.float32)
        i0, s = _lerp(c, n)
        out += amp * (vals[i0] + (vals[i0 + 1] - vals[i0]) * s)
        total += amp
        amp *= gain
        freq *= 2.0
    return out / total


def _noise2(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, fy: float, fx: float,
            octaves: int = 1, gain: float = 0.5) -> np.ndarray:
    """Fractal 2-D value noise (H, W) in about [-1, 1]; anisotropic via separate frequencies.

    Interpolates along x on the small lattice first, then gathers rows: a few (H, W) passes.
    """
    out = np.zeros((y.shape[0], x.shape[0]), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        cy, cx = y * fy + rng.random(), x * fx + rng.random()
        ny, nx = int(np.ceil(cy.max())) + 2, int(np.ceil(cx.max())) + 2
        grid = rng.uniform(-1, 1, (ny, nx)).astype(np.float32)
        ix, sx = _lerp(cx, nx)
        rows = grid[:, ix] + (grid[:, ix + 1] - grid[:, ix]) * sx  # (ny, W)
        iy, sy = _lerp(cy, ny)
        top = rows[iy]
        out += amp * (top + (rows[iy + 1] - top) * sy[:, None])
        total += amp
        amp *= gain
        fy, fx = fy * 2.0, fx * 2.0
    return out / total


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _paint(img: np.ndarray, labels: np.ndarray, mask: np.ndarray, colour: np.ndarray,
           cls: int) -> None:
    """Write ``colour`` (broadcastable to (H, W, 3)) and ``cls`` where ``mask`` holds.

    A multiply by the 0/1 mask is several times faster than boolean-index assignment here.
    """
    img += (colour - img) * mask[..., None].astype(np.float32)
    labels[mask] = cls


def render_landscape(seed: int, height: int, width: int) -> Landscape:
    """A plausible landscape and its labels, fully determined by ``seed`` (any size, any aspect)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    r_par, r_sky, r_cloud, r_mnt, r_tree, r_ground, r_tex, r_water = streams
    v = ((np.arange(height) + 0.5) / height).astype(np.float32)
    u = ((np.arange(width) + 0.5) / height).astype(np.float32)
    V = v[:, None]

    horizon = float(r_par.uniform(0.5, 0.72))
    kind = str(r_par.choice(["lake", "meadow", "coast"], p=[0.4, 0.4, 0.2]))
    n_ridges = int(r_par.choice([1, 2], p=[0.35, 0.65]))
    snowy = bool(r_par.random() < 0.55)
    treeline = bool(r_par.random() < (0.3 if kind == "coast" else 0.65))
    cloudiness = float(r_par.uniform(0.0, 0.5))
    light = float(r_par.choice([-1.0, 1.0]))

    img = np.empty((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)

    # Sky: deep blue at the top fading to a pale horizon.
    top, bottom = _jitter(r_sky, (50, 100, 190), 15), _jitter(r_sky, (180, 208, 236), 12)
    t = np.clip(v / horizon, 0, 1) ** 0.9
    img[:] = (top + (bottom - top) * t[:, None])[:, None, :]
    haze = bottom

    # Clouds: horizontally stretched noise, thinning towards the horizon.
    n = _noise2(r_cloud, v, u, 7.0, 3.0, octaves=3) - 0.5 * np.clip(V / horizon - 0.4, 0, 1)
    thr = 0.45 - cloudiness
    alpha = np.clip((n - thr) / 0.12, 0, 1)[..., None]
    grey = 246 - 40 * np.clip(_noise2(r_cloud, v, u, 6.0, 4.0) * 0.5 + 0.5, 0, 1)
    cloud_rgb = np.stack([grey, grey, grey + 4], axis=-1)
    img[:] = img * (1 - alpha) + cloud_rgb * alpha
    labels[alpha[..., 0] > 0.5] = CLOUD

    # Mountains: ridged fractal profiles, lit from one side, hazier when far.
    for j in range(n_ridges):
        far = j == 0 and n_ridges == 2
        peak = horizon - float(r_mnt.uniform(0.18, 0.4) if far or n_ridges == 1 else r_mnt.uniform(0.07, 0.2))
        freq = 1.2 if far else 2.0
        crest = np.zeros_like(u)
        amp, tot, f = 1.0, 0.0, freq
        for octave in range(5):
            crest += amp * (1.0 - np.abs(_noise1(r_mnt, u, f, 1))) ** 2
            tot += amp
            amp *= 0.5
            f *= 2.1
            if octave == 1:  # broad faces for the lighting; fine crests would streak it
                coarse = crest / tot
        crest /= tot
        lo, span = crest.min(), np.ptp(crest) + 1e-6
        prof = horizon - (horizon - peak) * (0.25 + 0.95 * (crest - lo) / span)
        broad = horizon - (horizon - peak) * (0.25 + 0.95 * (coarse - lo) / span)
        slope = np.gradient(broad, u) if width > 1 else np.zeros_like(prof)
        below = np.clip(V - prof[None, :], 0, None)
        shade = np.tanh(2.0 * light * slope)[None, :] * np.exp(-below / 0.2)
        gully = _noise2(r_mnt, v, u, 2.0, 6.0, octaves=2)
        bright = 1 + 0.22 * shade + 0.06 * gully
        base = _jitter(r_mnt, (112, 118, 138) if far else (104, 94, 86), 10)
        col = base * bright[..., None]
        depth = np.clip(below / max(horizon - float(prof.min()), 1e-3), 0, 1)[..., None]
        mix = (0.4 if far else 0.1) + 0.15 * depth
        col = col * (1 - mix) + haze * mix
        mask = (V >= prof[None, :]) & (V < horizon)
        _paint(img, labels, mask, col, MOUNTAIN)
        if snowy:
            line = float(prof.min()) + (horizon - float(prof.min())) * float(r_mnt.uniform(0.18, 0.4))
            line_u = line + 0.025 * _noise1(r_mnt, u, 6.0, 3)
            snow = mask & (V < line_u[None, :])
            scol = np.asarray([236, 240, 248], np.float32) * (1 + 0.12 * shade - 0.04)[..., None]
            scol = scol * (1 - 0.5 * mix) + haze * 0.5 * mix
            _paint(img, labels, snow, scol, SNOW)

    # Trees along the foot of the mountains, with a bumpy crown line.
    if treeline:
        band = float(r_tree.uniform(0.02, 0.07)) * np.clip(0.6 + _noise1(r_tree, u, 2.0, 2), 0, 1.2)
        crown = band + 0.008 * np.abs(_noise1(r_tree, u, 30.0, 1))
        mask = (V >= horizon - crown[None, :]) & (V < horizon) & (crown[None, :] > 0.012)
        fcol = _jitter(r_tree, (42, 78, 46), 8) * (1 + 0.08 * _noise2(r_tex, v, u, 18.0, 18.0))[..., None]
        _paint(img, labels, mask, fcol, FOREST)

    # Ground: row coordinates squeezed towards the horizon for a hint of perspective.
    g = np.clip(V - horizon, 0, None)
    persp = (0.15 / (v - horizon + 0.05)).clip(0, 4).astype(np.float32)
    ground = V >= horizon
    shore = np.full_like(u, horizon)
    if kind in ("lake", "coast"):
        shore = horizon + float(r_ground.uniform(0.1, 0.28)) + 0.04 * _noise1(r_ground, u, 2.0, 3)
    water = ground & (V < shore[None, :])
    land = ground & ~water

    grass = _jitter(r_ground, (92, 146, 62), 12)
    tex = 10 * _noise2(r_tex, persp, u, 1.2, 3.0, octaves=2) + 2.5 * _noise2(r_tex, v, u, 30.0, 30.0)
    near = np.clip(g / max(1 - horizon, 1e-3), 0, 1)[..., None]
    gcol = (grass * (0.7 + 0.3 * (1 - near)) + haze * 0.25 * (1 - near)) + tex[..., None] * [1, 1.2, 0.6]
    _paint(img, labels, land, gcol, GRASS)

    sand_rgb = _jitter(r_ground, (208, 188, 142), 10)
    beach = np.zeros_like(land)
    if kind == "coast":
        beach = land & (V < shore[None, :] + float(r_ground.uniform(0.15, 0.4)))
    elif kind == "lake" and r_ground.random() < 0.5:
        beach = land & (V < shore[None, :] + float(r_ground.uniform(0.015, 0.035)))
    wet = np.clip(1 - (V - shore[None, :]) / 0.04, 0, 1)[..., None]
    scol = sand_rgb * (1 - 0.15 * wet) + 0.5 * tex[..., None]
    _paint(img, labels, beach, scol, SAND)

    if kind == "meadow" and r_ground.random() < 0.7:
        patch = _noise2(r_ground, persp, u, 1.2, 4.0, octaves=2)
        mask = land & (patch > float(r_ground.uniform(0.25, 0.45)))
        pcol = _jitter(r_tree, (38, 72, 42), 8) * (1 + 0.08 * _noise2(r_tex, v, u, 16.0, 16.0))[..., None]
        _paint(img, labels, mask, pcol, FOREST)

    # Water: the scene above mirrored about the horizon, rippled and blended with deep blue.
    if water.any():
        h_row = horizon * height
        src = np.clip(np.rint(2 * h_row - (np.arange(height) + 0.5) - 0.5), 0, height - 1)
        wobble = 1.5 * _noise2(r_water, persp, u, 3.0, 6.0) * (1 + near[..., 0] * 2)
        rows = np.clip(np.rint(src[:, None] + wobble), 0, max(int(h_row) - 1, 0)).astype(np.int64)
        refl = img[rows, np.arange(width)[None, :]]
        deep = _jitter(r_water, (30, 62, 96), 8)
        fres = np.clip(g / 0.3, 0, 1)[..., None]
        streak = 5 * _noise2(r_water, persp, u, 10.0, 2.0)
        wcol = refl * (0.72 - 0.32 * fres) + deep * (0.28 + 0.32 * fres) + streak[..., None]
        _paint(img, labels, water, wcol, WATER)

    return Landscape(np.clip(np.rint(img), 0, 255).astype(np.uint8), labels)
