"""Robust image decoding and the paper's geometry: smaller side to ``resize``, then a square crop.

Decoding decisions, one per awkward case (the reference only calls ``convert("RGB")``, which
clips 16-bit data and turns transparent pixels black):

=====================================  =====================================================
input                                  decision
=====================================  =====================================================
RGB                                    used as is
L (grayscale), 1 (bilevel)             replicated to three channels
P (palette) without transparency       palette looked up to RGB
RGBA, LA, PA, P/L/RGB + transparency   composited on white (transparent = white, not black)
CMYK, YCbCr, LAB, HSV                  PIL's conversion to RGB (ICC profiles are not applied)
I;16 / I;16B / I;16L / I (16-bit)      scaled ``round(v / 257)`` so 65535 -> 255, not clipped
F (float)                              values <= 1 scaled by 255, otherwise clipped to 0..255
16-bit RGB PNG                         PIL keeps the high byte (already a correct scaling)
truncated, unreadable, not an image    BadFile naming the file: skipped with a DataWarning
                                       (``bad_files: skip``) or raised (``bad_files: stop``)
smaller than the crop                  upscaled by the resize, as the reference does, and
                                       counted (``upscaled`` in the sample and the batch)
EXIF orientation                       ignored, like the reference: paired maps were made
                                       from the stored pixels, so rotating would misalign them
=====================================  =====================================================
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgan_cli.data.errors import BadFile

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_RESAMPLE = {"image": Image.Resampling.BICUBIC, "labels": Image.Resampling.NEAREST,
             "depth": Image.Resampling.BILINEAR}


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL image as uint8 (H, W, 3), following the decision table of this module."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        a = np.nan_to_num(np.asarray(img).astype(np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    transparent = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if transparent:
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
        a = rgba[..., 3:4]
        out = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255
        return out.astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(source: str | bytes, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes to uint8 RGB; any failure is a BadFile naming the file."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decoding is lazy: truncation only shows up here
            if img.width == 0 or img.height == 0:
                raise BadFile(name, "image has zero size")
            return to_rgb8(img)
    except BadFile:
        raise
    except FileNotFoundError:
        raise BadFile(name, "file not found") from None
    except Image.UnidentifiedImageError:
        raise BadFile(name, "not a readable image (unknown or corrupt format)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadFile(name, f"cannot decode: {e}") from None


class Resized(NamedTuple):
    """A resized array and whether it had to be enlarged (the source was smaller than asked)."""

    array: np.ndarray
    upscaled: bool


def resized_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """(H, W) with the smaller side equal to ``target`` and the aspect ratio kept."""
    scale = target / min(h, w)
    return max(target, round(h * scale)), max(target, round(w * scale))


def resize_smaller_side(arr: np.ndarray, target: int, kind: str = "image") -> Resized:
    """Resize so the smaller side is ``target``: bicubic for images, nearest for labels (no new
    label values), bilinear for depth (stays inside the value range, unlike bicubic)."""
    h, w = arr.shape[:2]
    nh, nw = resized_shape(h, w, target)
    if (nh, nw) == (h, w):
        return Resized(arr, False)
    if kind == "image":
        out = np.asarray(Image.fromarray(arr).resize((nw, nh), _RESAMPLE[kind]))
    elif kind == "labels":
        out = np.asarray(Image.fromarray(arr.astype(np.int32)).resize((nw, nh), _RESAMPLE[kind]))
        out = out.astype(arr.dtype)
    elif kind == "depth":
        out = np.asarray(Image.fromarray(arr.astype(np.float32)).resize((nw, nh), _RESAMPLE[kind]))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return Resized(out, min(h, w) < target)


class CropBox(NamedTuple):
    """Top-left corner and side of a square crop, shared by an image and its maps."""

    top: int
    left: int
    size: int


class Geometry(NamedTuple):
    """Where to crop and whether to mirror: drawn once per sample, applied to every array."""

    box: CropBox
    flip: bool


def choose_geometry(h: int, w: int, size: int, rng: np.random.Generator | None,
                    flip: bool = False) -> Geometry:
    """Random crop (and flip) when ``rng`` is given (training), centre crop otherwise (validation)."""
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}")
    if rng is None:
        return Geometry(CropBox((h - size) // 2, (w - size) // 2, size), False)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    mirror = bool(rng.random() < 0.5) if flip else False
    return Geometry(CropBox(top, left, size), mirror)


def apply_geometry(arr: np.ndarray, geo: Geometry) -> np.ndarray:
    """Crop (and mirror) an (H, W, ...) array; contiguous so torch can share the memory."""
    b = geo.box
    out = arr[b.top:b.top + b.size, b.left:b.left + b.size]
    if geo.flip:
        out = out[:, ::-1]
    out = np.ascontiguousarray(out)
    return out if out.flags.writeable else out.copy()


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], the range the tokenizer expects."""
    if not rgb.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants to own writable memory
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 (H, W, 3), clamped, for saving and inspection."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def degrade(rgb: np.ndarray, factor: int) -> np.ndarray:
    """S-times bicubic downsample (PIL antialiases) then bicubic back up: the low-resolution
    input a super-resolution prior is conditioned on."""
    h, w = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((max(1, round(w / factor)), max(1, round(h / factor))),
                                        Image.Resampling.BICUBIC)
    return np.array(small.resize((w, h), Image.Resampling.BICUBIC))


def degrade_batch(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same images degraded like ``encode-dataset --cond lowres:S``
    (PIL bicubic down then up), so sampling conditions on what training saw."""
    out = [image_to_tensor(degrade(tensor_to_image(img), factor)) for img in x.cpu()]
    return torch.stack(out).to(x.device, x.dtype)
