"""Does a sample follow its conditioning map? Label agreement on the built-in landscapes.

Every f x f token cell of an image is classified into one of ``LANDSCAPE_CLASSES`` from its
pixels, and compared with the map's label for that cell: the label at the cell's centre pixel,
the rule ``--cond labels`` encodes maps with (:func:`map_cell_labels` calls that code).

The classifier (:class:`CellClassifier`) is fitted on rendered scenes of training seeds (the
built-in validation seeds, from ``VAL_SEED_BASE``, stay held out) at several render sizes, since
the cells of a large scene are flatter than those of a small one. What it sees of a cell
(:func:`cell_features`, RGB in [0, 1]): the mean of the 2 x 2 pixels at the cell centre (the
label's own pixel), of the central f/2 x f/2 block and of the whole cell; the standard deviation
of luminance in the cell and its mean absolute horizontal and vertical pixel differences
(texture: water ripples run horizontally); and the mean colours of the 8 neighbouring cells (the
edge cell repeated at the border): 36 numbers. A small MLP (36 -> 64 -> 64 -> classes, ReLU,
Adam, cross-entropy with the scenes' own class frequencies) maps them to a class.

Why not simpler (measured on 8 held-out scenes per size): per-class Gaussians (QDA) on the cell
mean reach 0.88 (64x64) to 0.96 (1280x832), nearest-centroid 0.75-0.78, the same MLP on the
cell mean alone 0.85-0.97: sky is a gradient from deep blue to pale haze (not one Gaussian),
water mirrors the sky and the mountains above it, and snow and cloud share their colour; the
centre pixels, the texture and the neighbours (snow sits on a mountain, cloud in the sky)
separate them. Real renders of 16 held-out scenes then score 0.952 (64x64, where most cells
straddle a boundary: even the majority label of each cell matches its centre label only 94% of
the time), 0.969 (128x128), 0.991 (512x320) and 0.994 (1280x832): the ceiling a sample can
reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, render_landscape
from vqgan_cli.data.maps import cell_labels
from vqgan_cli.metrics import as_uint8_image

# (height, width) render sizes the default classifier is fitted at: whole small scenes to flat
# cells of the quickstart sampling size.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (160, 256), (320, 512), (832, 1280))
DEFAULT_SEEDS = range(32)  # training seeds (the validation scenes start at VAL_SEED_BASE)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_HIDDEN = 64


def _check_grid(shape: tuple[int, ...], factor: int) -> tuple[int, int]:
    if factor < 2 or shape[0] % factor or shape[1] % factor:
        raise ValueError(f"image {shape[1]}x{shape[0]} is not a grid of {factor} px cells (factor >= 2)")
    return shape[0] // factor, shape[1] // factor


def cell_features(image: np.ndarray | torch.Tensor, factor: int) -> np.ndarray:
    """Features (h * w, 36) of every f x f cell in raster order (see the module docstring)."""
    img = as_uint8_image(image)
    h, w = _check_grid(img.shape, factor)
    f, q = factor, factor // 4
    c = (img.astype(np.float32) / 255.0).reshape(h, f, w, f, 3).transpose(0, 2, 1, 3, 4)  # (h, w, f, f, 3)
    mean = c.mean((2, 3))
    lum = c @ _LUMA  # (h, w, f, f)
    neigh = np.pad(mean, ((1, 1), (1, 1), (0, 0)), mode="edge")
    parts = [c[:, :, f // 2 - 1:f // 2 + 1, f // 2 - 1:f // 2 + 1].mean((2, 3)),
             c[:, :, q:f - q, q:f - q].mean((2, 3)), mean,
             lum.std((2, 3))[..., None],
             np.abs(np.diff(lum, axis=3)).mean((2, 3))[..., None],
             np.abs(np.diff(lum, axis=2)).mean((2, 3))[..., None]]
    parts += [neigh[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    return np.concatenate(parts, -1).reshape(h * w, -1)


def map_cell_labels(labels: np.ndarray | torch.Tensor, factor: int) -> np.ndarray:
    """(h, w) label of every cell of an (H, W) map: encode-dataset's ``--cond labels`` rule."""
    m = torch.as_tensor(np.asarray(labels)).long()
    _check_grid(tuple(m.shape), factor)
    return cell_labels(m, factor).numpy()


@dataclass
class CellClassifier:
    """Feature standardisation and MLP weights (numpy, float32), and what it was fitted on."""

    factor: int
    classes: tuple[str, ...]
    mean: np.ndarray  # (36,)
    std: np.ndarray  # (36,)
    weights: list[np.ndarray]  # w0 (36, 64), b0, w1 (64, 64), b1, w2 (64, classes), b2
    seeds: np.ndarray  # training seeds
    sizes: np.ndarray  # (n, 2) (height, width) render sizes

    def logits(self, features: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy((features - self.mean) / self.std)
        w = [torch.from_numpy(a) for a in self.weights]
        return _mlp(x, w)

    def predict(self, image: np.ndarray | torch.Tensor) -> np.ndarray:
        """(h, w) predicted class of every cell of an image (uint8 (H, W, 3) or a (3, H, W) tensor in [-1, 1])."""
        img = as_uint8_image(image)
        h, w = _check_grid(img.shape, self.factor)
        with torch.no_grad():
            return self.logits(cell_features(img, self.factor)).argmax(1).reshape(h, w).numpy()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"w{i}": a for i, a in enumerate(self.weights)}
        with open(path, "wb") as fh:  # np.savez would append .npz to a name without it
            np.savez(fh, factor=np.int64(self.factor), classes=np.array(self.classes), mean=self.mean,
                     std=self.std, seeds=self.seeds, sizes=self.sizes, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CellClassifier:
        with np.load(path, allow_pickle=False) as z:
            n = sum(1 for k in z.files if k.startswith("w"))
            return cls(int(z["factor"]), tuple(str(c) for c in z["classes"]), z["mean"], z["std"],
                       [z[f"w{i}"] for i in range(n)], z["seeds"], z["sizes"])


def _mlp(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    for i in range(0, len(w) - 2, 2):
        x = torch.relu(x @ w[i] + w[i + 1])
    return x @ w[-2] + w[-1]


def fit_cell_classifier(seeds: Sequence[int] = DEFAULT_SEEDS,
                        sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, factor: int = 8,
                        steps: int = 4000, seed: int = 0) -> CellClassifier:
    """Fit the cell classifier on scenes ``seeds`` rendered at each (height, width) of ``sizes``.

    Deterministic for a given torch thread count: weights and batches come from ``seed``. The
    defaults (32 scenes at 5 sizes, 645k cells) take about 20 s on one core, mostly rendering.
    """
    seeds = list(seeds)
    if any(s >= 1_000_000 for s in seeds):  # VAL_SEED_BASE: the held-out scenes
        raise ValueError("fit on training seeds (< 1_000_000); the validation scenes are held out")
    feats, labels = [], []
    for s in seeds:
        for height, width in sizes:
            scene = render_landscape(s, height, width)
            feats.append(cell_features(scene.image, factor))
            labels.append(map_cell_labels(scene.labels, factor).reshape(-1))
    x_np = np.concatenate(feats)
    mean, std = x_np.mean(0), x_np.std(0) + 1e-6
    x = torch.from_numpy((x_np - mean) / std)
    y = torch.from_numpy(np.concatenate(labels)).long()
    g = torch.Generator().manual_seed(seed)
    dims = [x.shape[1], _HIDDEN, _HIDDEN, len(LANDSCAPE_CLASSES)]
    w: list[torch.Tensor] = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):  # He initialisation, zero biases
        w += [torch.randn(d_in, d_out, generator=g) * (2.0 / d_in) ** 0.5, torch.zeros(d_out)]
    for p in w:
        p.requires_grad_(True)
    opt = torch.optim.Adam(w, lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (1024,), generator=g)
        loss = torch.nn.functional.cross_entropy(_mlp(x[batch], w), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return CellClassifier(factor, LANDSCAPE_CLASSES, mean.astype(np.float32), std.astype(np.float32),
                          [p.detach().numpy().copy() for p in w], np.asarray(seeds, np.int64),
                          np.asarray(sizes, np.int64).reshape(-1, 2))


def label_agreement(image: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, factor: int,
                    classifier: CellClassifier) -> float:
    """Fraction of the image's f x f cells whose predicted class equals the map's cell label."""
    if classifier.factor != factor:
        raise ValueError(f"the classifier was fitted on {classifier.factor} px cells, not {factor}")
    img = as_uint8_image(image)
    if img.shape[:2] != tuple(np.asarray(labels).shape):
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} and map {np.asarray(labels).shape[::-1]} differ")
    return float((classifier.predict(img) == map_cell_labels(labels, factor)).mean())
