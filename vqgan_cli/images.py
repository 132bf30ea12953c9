"""Turning model tensors into viewable pictures: [-1,1] images, label maps, depth, grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqgan_cli.checkpoints.format import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C,H,W) or (B,C,H,W) in [-1,1] -> uint8 HWC / BHWC; 1-channel inputs become grey RGB."""
    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    if x.shape[-3] == 1:
        x = x.repeat_interleave(3, dim=-3)
    return x.movedim(-3, -1).numpy()


def label_palette(n_labels: int) -> torch.Tensor:
    """A fixed, well-spread colour per label (golden-ratio hues), (n_labels, 3) in [-1, 1]."""
    import colorsys

    cols = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * (i % 3 == 0))
            for i in range(n_labels)]
    return torch.tensor(cols, dtype=torch.float32) * 2 - 1


def labels_to_rgb(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(B,H,W) integer labels -> (B,3,H,W) colours in [-1,1]."""
    pal = label_palette(n_labels).to(labels.device)
    return pal[labels.long().clamp(0, n_labels - 1)].permute(0, 3, 1, 2)


def displayable(x: torch.Tensor, modality: str) -> torch.Tensor:
    """Model input/output -> RGB in [-1,1]: segmentation one-hot/logits are coloured by argmax."""
    if modality == "segmentation":
        return labels_to_rgb(x.argmax(dim=1), x.shape[1])
    x = x.float()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def save_png(path: str | Path, image: torch.Tensor | np.ndarray) -> Path:
    """The one PNG writer: (C,H,W) in [-1,1] or uint8 (H,W,3). No timestamps, so equal pixels
    give equal bytes; atomic, so an interrupted run never leaves half an image; readable by all."""
    pixels = to_uint8(image) if isinstance(image, torch.Tensor) else np.asarray(image, np.uint8)

    def write(tmp: Path) -> None:
        Image.fromarray(pixels).save(tmp, format="PNG")
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the image from other users

    return atomic_write(path, write)


def save_grid(path: str | Path, rows: list[torch.Tensor], pad: int = 2) -> Path:
    """Save rows of (B,3,H,W) images in [-1,1] as one PNG (e.g. inputs above reconstructions)."""
    arrays = [to_uint8(r) for r in rows]
    n = max(a.shape[0] for a in arrays)
    h, w = arrays[0].shape[1:3]
    canvas = np.full((len(arrays) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, a in enumerate(arrays):
        for j in range(a.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = a[j]
    return save_png(path, canvas)
