"""Token grid -> pixels: the whole grid at once when it fits, else overlapping tiles, cross-faded.

The decoder is convolutional apart from its mid-block attention, so a tile decoded on its own
differs from the whole-grid decode mostly near its border (zero padding, a different attention
context). Tiles therefore overlap, and each output pixel is a weighted mean of the tiles covering
it, with weights that fall off linearly towards every tile edge facing a neighbour (never at the
image border): the worst pixels of a tile count least and no seam line survives.
Memory then depends on the tile, not the image.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vqgan_cli.models.vqgan import VQGAN

DEFAULT_MAX_BYTES = 1 << 30  # whole-grid decoding above this estimate switches to tiles
DEFAULT_TILE = 32  # tokens per tile side
DEFAULT_OVERLAP = 8  # tokens shared by neighbouring tiles


class Decoded(NamedTuple):
    """Pixels (B, C, H*f, W*f) and how many tiles produced them (1: the whole grid)."""

    image: torch.Tensor
    tiles: int


def decode_bytes(tokenizer: VQGAN, batch: int, h: int, w: int) -> int:
    """Rough peak activation memory of a whole-grid decode: the full-resolution level's
    feature maps (a few alive at once) dominate."""
    ae = tokenizer.config.autoencoder
    f = tokenizer.factor
    return 6 * 4 * batch * ae.ch * ae.ch_mult[0] * (h * f) * (w * f)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``size`` with at least ``overlap`` shared; the last one flush with
    the end."""
    if tile >= size:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, fade_start: bool, fade_end: bool, fade: int) -> torch.Tensor:
    """1-D weights: 1 inside, falling linearly to ~0 over ``fade`` pixels at faded ends."""
    x = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if fade > 0:
        if fade_start:
            w = torch.minimum(w, (x + 0.5) / fade)
        if fade_end:
            w = torch.minimum(w, (length - x - 0.5) / fade)
    return w


@torch.no_grad()
def decode_tiled(tokenizer: VQGAN, indices: torch.Tensor, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> Decoded:
    """Decode (B, h, w) tokens as overlapping ``tile`` x ``tile`` token tiles, blended."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    B, h, w = indices.shape
    f = tokenizer.factor
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out: torch.Tensor | None = None
    weight = torch.zeros(h * f, w * f, device=indices.device)
    for r in rows:
        for c in cols:
            th, tw = min(tile, h), min(tile, w)
            px = tokenizer.decode_indices(indices[:, r:r + th, c:c + tw]).float()  # (B, C, th*f, tw*f)
            if out is None:
                out = torch.zeros(B, px.shape[1], h * f, w * f, device=px.device)
            fade = overlap * f
            wy = _ramp(th * f, r > 0, r + th < h, fade)
            wx = _ramp(tw * f, c > 0, c + tw < w, fade)
            wgt = (wy[:, None] * wx[None, :]).to(px.device)  # (th*f, tw*f)
            ys, xs = slice(r * f, (r + th) * f), slice(c * f, (c + tw) * f)
            out[:, :, ys, xs] += px * wgt
            weight[ys, xs] += wgt
    assert out is not None
    return Decoded(out / weight, len(rows) * len(cols))


@torch.no_grad()
def decode_grid(tokenizer: VQGAN, indices: torch.Tensor, max_bytes: int = DEFAULT_MAX_BYTES,
                tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                mode: str = "auto") -> Decoded:
    """Decode (B, h, w) tokens: ``auto`` picks the whole grid when its estimated memory is
    below ``max_bytes``, else tiles; ``whole`` / ``tiles`` force one way."""
    if mode not in ("auto", "whole", "tiles"):
        raise ValueError(f"decode mode must be auto, whole or tiles, got {mode!r}")
    B, h, w = indices.shape
    if mode == "whole" or (mode == "auto" and decode_bytes(tokenizer, B, h, w) <= max_bytes):
        return Decoded(tokenizer.decode_indices(indices).float(), 1)
    return decode_tiled(tokenizer, indices, tile, overlap)
