"""Paired maps: segmentation label PNGs and depth PNGs (float32 stored in RGBA bytes).

A label value outside ``0..n_labels-1`` is always an error, whatever ``bad_files`` says:
it would otherwise become a wrong one-hot channel (or an index error deep in the model) and
silently corrupt training.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgan_cli.data.errors import BadFile, DataError


class LabelError(DataError):
    """A segmentation map holds a label the model cannot represent; never skipped."""


def _open(source: str | bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
        return img
    except FileNotFoundError:
        raise BadFile(name, "map file not found") from None
    except Exception as e:
        raise BadFile(name, f"cannot decode map: {e}") from None


def labels_from_image(img: Image.Image, name: str) -> np.ndarray:
    """Label indices of a map image as int32 (H, W); palette PNGs give their indices, not colours."""
    mode = img.mode
    if mode in ("L", "P", "1"):
        return np.asarray(img, dtype=np.uint8).astype(np.int32)
    if mode.startswith("I"):
        return np.asarray(img).astype(np.int32)
    if mode in ("LA", "PA"):
        return np.asarray(img)[..., 0].astype(np.int32)
    if mode == "RGB":
        a = np.asarray(img)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
            return a[..., 0].astype(np.int32)
        raise BadFile(name, "colour segmentation map: expected one label index per pixel "
                            "(8-bit grayscale or palette PNG)")
    if mode == "RGBA":
        raise BadFile(name, "RGBA map looks like a depth map, expected segmentation labels")
    raise BadFile(name, f"unsupported segmentation map mode {mode}")


def check_labels(labels: np.ndarray, n_labels: int | None, name: str) -> None:
    """Raise a LabelError naming the file, the offending value and ``n_labels``."""
    if n_labels is None or labels.size == 0:
        return
    hi, lo = int(labels.max()), int(labels.min())
    if hi >= n_labels or lo < 0:
        bad = hi if hi >= n_labels else lo
        raise LabelError(f"{name}: label value {bad} is outside 0..{n_labels - 1} (n_labels = "
                         f"{n_labels}); raise n_labels, or use label_shift for a 255 'unlabelled' value")


def rgba_to_depth(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 4) whose 4 bytes per pixel are a little-endian float32 -> float32 (H, W)."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected uint8 (H, W, 4), got {rgba.dtype} {rgba.shape}")
    return np.ascontiguousarray(rgba).view("<f4")[..., 0].astype(np.float32)


def depth_to_rgba(depth: np.ndarray) -> np.ndarray:
    """float32 (H, W) -> uint8 (H, W, 4) bytes, the storage format of the depth PNGs."""
    d = np.ascontiguousarray(depth, dtype="<f4")
    return d[..., None].view(np.uint8).reshape(*d.shape, 4)


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """Per-image min-max to [-1, 1] as the reference does; a constant map becomes zeros."""
    lo, hi = float(depth.min()), float(depth.max())
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        return np.zeros_like(depth, dtype=np.float32)
    return ((depth - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)


class MapData(NamedTuple):
    """A decoded map: ``kind`` is ``seg`` (int32 labels) or ``depth`` (float32 in [-1, 1])."""

    kind: str
    array: np.ndarray


def read_map(source: str | bytes, name: str | None = None, label_shift: int = 0) -> MapData:
    """Decode a map, telling depth (RGBA float bytes) from segmentation (label indices) by mode."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    with _open(source, name) as img:
        if img.mode == "RGBA":
            depth = rgba_to_depth(np.asarray(img))
            if not np.isfinite(depth).all():
                raise BadFile(name, "depth map holds NaN or infinite values")
            return MapData("depth", normalize_depth(depth))
        labels = labels_from_image(img, name)
    if label_shift:
        labels = (labels + label_shift) % 256
    return MapData("seg", labels)


def one_hot(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """int (B, H, W) -> float (B, n_labels, H, W), the segmentation tokenizer's input and target."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_labels):
        raise DataError(f"label values {int(labels.min())}..{int(labels.max())} do not fit "
                        f"n_labels = {n_labels}")
    b, h, w = labels.shape
    out = torch.zeros(b, n_labels, h, w, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0)


def cell_labels(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """Label maps (..., H, W) -> (..., H/f, W/f): the label at the centre pixel of every f x f cell.

    The one nearest-downsampling rule of raw label maps to the token grid: encode-dataset's
    ``--cond labels``, the prior's ``labels`` conditioning and the map-agreement score all use it,
    so a map means the same tokens wherever it enters. Numpy arrays slice the same way."""
    return maps[..., factor // 2::factor, factor // 2::factor]


def resize_nearest(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """A label (int) or depth (float32) map resized to (h, w) without inventing values: labels
    stay labels. This is how ``--cond`` brings a map to the sample size."""
    if arr.dtype == np.float32:
        return np.asarray(Image.fromarray(arr, mode="F").resize((w, h), Image.Resampling.NEAREST))
    return np.asarray(Image.fromarray(arr.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
