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


class Window(NamedTuple):
    """Rows [top, top + height) and columns [left, left + width) of a scene."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


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
            octaves: int = 1, gain: float = 0.5, win: Window | None = None) -> np.ndarray:
    """Fractal 2-D value noise in about [-1, 1]; anisotropic via separate frequencies.

    ``y``/``x`` are the whole scene's coordinates: they fix the lattice (and so what the generator
    draws); the result covers ``win`` only, (h, w), or everything when it is None. Interpolates
    along x on the small lattice first, then gathers rows: a few (h, w) passes.
    """
    rows, cols = (slice(None), slice(None)) if win is None else (win.rows, win.cols)
    out = np.zeros((y[rows].shape[0], x[cols].shape[0]), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        cy, cx = y * fy + rng.random(), x * fx + rng.random()
        ny, nx = int(np.ceil(cy.max())) + 2, int(np.ceil(cx.max())) + 2
        grid = rng.uniform(-1, 1, (ny, nx)).astype(np.float32)
        ix, sx = _lerp(cx[cols], nx)
        rows_x = grid[:, ix] + (grid[:, ix + 1] - grid[:, ix]) * sx  # (ny, w)
        iy, sy = _lerp(cy[rows], ny)
        top = rows_x[iy]
        out += amp * (top + (rows_x[iy + 1] - top) * sy[:, None])
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


def render_landscape(seed: int, height: int, width: int, window: Window | None = None) -> Landscape:
    """A plausible landscape and its labels, fully determined by ``seed`` (any size, any aspect).

    With ``window``, only that part of the ``height`` x ``width`` scene is rendered, equal to the
    same crop of the whole render: a 64-pixel window of a 1024-pixel scene costs about what a
    64-pixel scene costs (per-column profiles are computed for the whole width, which is cheap).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    win = Window(0, 0, height, width) if window is None else window
    if win.top < 0 or win.left < 0 or win.height < 1 or win.width < 1 or \
            win.top + win.height > height or win.left + win.width > width:
        raise ValueError(f"window {tuple(win)} (top, left, height, width) is not inside a {height}x{width} scene")
    img, labels = _render(seed, height, width, win)
    return Landscape(np.clip(np.rint(img), 0, 255).astype(np.uint8), labels)


def _render(seed: int, height: int, width: int, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """Float pixels (h, w, 3) and labels (h, w) of ``win`` of the scene, before rounding."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    r_par, r_sky, r_cloud, r_mnt, r_tree, r_ground, r_tex, r_water = streams
    v_all = ((np.arange(height) + 0.5) / height).astype(np.float32)
    u_all = ((np.arange(width) + 0.5) / height).astype(np.float32)
    v, u = v_all[win.rows], u_all[win.cols]
    V = v[:, None]
    cols = win.cols

    def noise2(rng: np.random.Generator, y_all: np.ndarray, fy: float, fx: float, octaves: int = 1) -> np.ndarray:
        return _noise2(rng, y_all, u_all, fy, fx, octaves, win=win)

    horizon = float(r_par.uniform(0.5, 0.72))
    kind = str(r_par.choice(["lake", "meadow", "coast"], p=[0.4, 0.4, 0.2]))
    n_ridges = int(r_par.choice([1, 2], p=[0.35, 0.65]))
    snowy = bool(r_par.random() < 0.55)
    treeline = bool(r_par.random() < (0.3 if kind == "coast" else 0.65))
    cloudiness = float(r_par.uniform(0.0, 0.5))
    light = float(r_par.choice([-1.0, 1.0]))

    img = np.empty((win.height, win.width, 3), np.float32)
    labels = np.zeros((win.height, win.width), np.uint8)

    # Sky: deep blue at the top fading to a pale horizon.
    top, bottom = _jitter(r_sky, (50, 100, 190), 15), _jitter(r_sky, (180, 208, 236), 12)
    t = np.clip(v / horizon, 0, 1) ** 0.9
    img[:] = (top + (bottom - top) * t[:, None])[:, None, :]
    haze = bottom

    # Clouds: horizontally stretched noise, thinning towards the horizon.
    n = noise2(r_cloud, v_all, 7.0, 3.0, octaves=3) - 0.5 * np.clip(V / horizon - 0.4, 0, 1)
    thr = 0.45 - cloudiness
    alpha = np.clip((n - thr) / 0.12, 0, 1)[..., None]
    grey = 246 - 40 * np.clip(noise2(r_cloud, v_all, 6.0, 4.0) * 0.5 + 0.5, 0, 1)
    cloud_rgb = np.stack([grey, grey, grey + 4], axis=-1)
    img[:] = img * (1 - alpha) + cloud_rgb * alpha
    labels[alpha[..., 0] > 0.5] = CLOUD

    # Mountains: ridged fractal profiles, lit from one side, hazier when far. Profiles are
    # computed along the whole width (their normalisation and slope need it), then cut.
    for j in range(n_ridges):
        far = j == 0 and n_ridges == 2
        peak = horizon - float(r_mnt.uniform(0.18, 0.4) if far or n_ridges == 1 else r_mnt.uniform(0.07, 0.2))
        freq = 1.2 if far else 2.0
        crest = np.zeros_like(u_all)
        amp, tot, f = 1.0, 0.0, freq
        for octave in range(5):
            crest += amp * (1.0 - np.abs(_noise1(r_mnt, u_all, f, 1))) ** 2
            tot += amp
            amp *= 0.5
            f *= 2.1
            if octave == 1:  # broad faces for the lighting; fine crests would streak it
                coarse = crest / tot
        crest /= tot
        lo, span = crest.min(), np.ptp(crest) + 1e-6
        prof_full = horizon - (horizon - peak) * (0.25 + 0.95 * (crest - lo) / span)
        broad = horizon - (horizon - peak) * (0.25 + 0.95 * (coarse - lo) / span)
        slope = (np.gradient(broad, u_all) if width > 1 else np.zeros_like(prof_full))[cols]
        prof = prof_full[cols]
        below = np.clip(V - prof[None, :], 0, None)
        shade = np.tanh(2.0 * light * slope)[None, :] * np.exp(-below / 0.2)
        gully = noise2(r_mnt, v_all, 2.0, 6.0, octaves=2)
        bright = 1 + 0.22 * shade + 0.06 * gully
        base = _jitter(r_mnt, (112, 118, 138) if far else (104, 94, 86), 10)
        col = base * bright[..., None]
        depth = np.clip(below / max(horizon - float(prof_full.min()), 1e-3), 0, 1)[..., None]
        mix = (0.4 if far else 0.1) + 0.15 * depth
        col = col * (1 - mix) + haze * mix
        mask = (V >= prof[None, :]) & (V < horizon)
        _paint(img, labels, mask, col, MOUNTAIN)
        if snowy:
            line = float(prof_full.min()) + (horizon - float(prof_full.min())) * float(r_mnt.uniform(0.18, 0.4))
            line_u = (line + 0.025 * _noise1(r_mnt, u_all, 6.0, 3))[cols]
            snow = mask & (V < line_u[None, :])
            scol = np.asarray([236, 240, 248], np.float32) * (1 + 0.12 * shade - 0.04)[..., None]
            scol = scol * (1 - 0.5 * mix) + haze * 0.5 * mix
            _paint(img, labels, snow, scol, SNOW)

    # Trees along the foot of the mountains, with a bumpy crown line.
    if treeline:
        band = float(r_tree.uniform(0.02, 0.07)) * np.clip(0.6 + _noise1(r_tree, u_all, 2.0, 2), 0, 1.2)
        crown = (band + 0.008 * np.abs(_noise1(r_tree, u_all, 30.0, 1)))[cols]
        mask = (V >= horizon - crown[None, :]) & (V < horizon) & (crown[None, :] > 0.012)
        fcol = _jitter(r_tree, (42, 78, 46), 8) * (1 + 0.08 * noise2(r_tex, v_all, 18.0, 18.0))[..., None]
        _paint(img, labels, mask, fcol, FOREST)

    # Ground: row coordinates squeezed towards the horizon for a hint of perspective.
    g = np.clip(V - horizon, 0, None)
    persp_all = (0.15 / (v_all - horizon + 0.05)).clip(0, 4).astype(np.float32)
    ground = V >= horizon
    shore = np.full_like(u, horizon)
    if kind in ("lake", "coast"):
        shore = (horizon + float(r_ground.uniform(0.1, 0.28)) + 0.04 * _noise1(r_ground, u_all, 2.0, 3))[cols]
    water = ground & (V < shore[None, :])
    land = ground & ~water

    grass = _jitter(r_ground, (92, 146, 62), 12)
    tex = 10 * noise2(r_tex, persp_all, 1.2, 3.0, octaves=2) + 2.5 * noise2(r_tex, v_all, 30.0, 30.0)
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
        patch = noise2(r_ground, persp_all, 1.2, 4.0, octaves=2)
        mask = land & (patch > float(r_ground.uniform(0.25, 0.45)))
        pcol = _jitter(r_tree, (38, 72, 42), 8) * (1 + 0.08 * noise2(r_tex, v_all, 16.0, 16.0))[..., None]
        _paint(img, labels, mask, pcol, FOREST)

    # Water: the scene above mirrored about the horizon, rippled and blended with deep blue.
    if water.any():
        h_row = horizon * height
        src = np.clip(np.rint(2 * h_row - (np.arange(height) + 0.5) - 0.5), 0, height - 1)[win.rows]
        wobble = 1.5 * noise2(r_water, persp_all, 3.0, 6.0) * (1 + near[..., 0] * 2)
        rows = np.clip(np.rint(src[:, None] + wobble), 0, max(int(h_row) - 1, 0)).astype(np.int64)
        refl = _reflection_source(seed, height, width, win, img, rows)
        deep = _jitter(r_water, (30, 62, 96), 8)
        fres = np.clip(g / 0.3, 0, 1)[..., None]
        streak = 5 * noise2(r_water, persp_all, 10.0, 2.0)
        wcol = refl * (0.72 - 0.32 * fres) + deep * (0.28 + 0.32 * fres) + streak[..., None]
        _paint(img, labels, water, wcol, WATER)

    return img, labels


def _reflection_source(seed: int, height: int, width: int, win: Window, img: np.ndarray,
                       rows: np.ndarray) -> np.ndarray:
    """Pixels at scene rows ``rows`` (h, w) of the window's columns, as painted before the water.

    Those rows lie above the horizon, where nothing is painted after this point, so a window that
    holds them reads its own pixels; otherwise the band they span is rendered (it has no water).
    """
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if lo >= win.top and hi <= win.top + win.height:
        band, start = img, win.top
    else:
        band, _ = _render(seed, height, width, Window(lo, win.left, hi - lo, win.width))
        start = lo
    return band[rows - start, np.arange(win.width)[None, :]]
