"""Tiled decoding of big token grids: equal to the whole decode where a tile covers the grid,
close to it elsewhere, and without seams at tile borders."""

from __future__ import annotations

import torch
from factory import tokenizer

from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.sample.decode import decode_bytes, decode_grid, decode_tiled, tile_starts


def tiny_tokenizer() -> VQGAN:
    """f = 2, a spread codebook: neighbouring tokens decode to visibly different pixels."""
    return tokenizer(attn_resolutions=(), spread=True)


def tokens(h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 16, (1, h, w), generator=torch.Generator().manual_seed(0))


def test_tile_starts() -> None:
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(21, 8, 2) == [0, 6, 12, 13]


def test_one_tile_is_the_whole_decode() -> None:
    tok = tiny_tokenizer()
    idx = tokens(6, 9)
    whole = decode_grid(tok, idx, mode="whole")
    tiled = decode_tiled(tok, idx, tile=16, overlap=4)
    assert whole.tiles == 1 and tiled.tiles == 1
    assert torch.equal(whole.image, tiled.image)


def test_tiled_is_close_to_whole_and_seamless() -> None:
    tok = tiny_tokenizer()
    idx = tokens(16, 20)
    whole = decode_grid(tok, idx, mode="whole").image  # (1, 3, 32, 40)
    tiled = decode_tiled(tok, idx, tile=12, overlap=4)
    assert tiled.tiles == 2 * 2 and tiled.image.shape == whole.shape == (1, 3, 32, 40)
    diff = (tiled.image - whole).abs()
    # GroupNorm statistics and mid-block attention see a tile instead of the whole grid (a
    # random decoder exaggerates this; trained ones are far more local)
    assert round(diff.mean().item(), 3) == 0.082
    assert diff.mean() < 0.25 * whole.std()
    # no seam: the jump between neighbouring pixel columns/rows at tile borders is no larger
    # than what the whole decode has there
    dx_t = (tiled.image[..., 1:] - tiled.image[..., :-1]).abs().mean(dim=(0, 1, 2))
    dx_w = (whole[..., 1:] - whole[..., :-1]).abs().mean(dim=(0, 1, 2))
    borders = [2 * (s + 12) - 1 for s in tile_starts(20, 12, 4)[:-1]]  # a tile's last column
    assert borders == [23] and (dx_t[borders] < 1.25 * dx_w[borders]).all()
    dy_t = (tiled.image[..., 1:, :] - tiled.image[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    dy_w = (whole[..., 1:, :] - whole[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    assert dy_t[23] < 1.25 * dy_w[23]


def test_auto_switches_to_tiles_above_the_budget() -> None:
    tok = tiny_tokenizer()
    idx = tokens(16, 20)
    assert decode_bytes(tok, 1, 16, 20) == 6 * 4 * 32 * 32 * 40
    assert decode_grid(tok, idx).tiles == 1
    small = decode_grid(tok, idx, max_bytes=1000, tile=8, overlap=4)
    assert small.tiles == 12
    assert torch.equal(small.image, decode_tiled(tok, idx, 8, 4).image)
