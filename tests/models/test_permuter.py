"""Token orderings: bijections, exact inverses, known small-grid orders, reference buffer names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqgan_cli.models.permuter import PERMUTERS, Identity, build_permuter

ALL = sorted(PERMUTERS)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [2, 4, 8, 16])
def test_bijection_and_round_trip(name: str, size: int) -> None:
    p = build_permuter(name, size, size)
    ids = torch.arange(size * size).unsqueeze(0)  # (1, H*W)
    order = p(ids)[0]
    assert torch.equal(order.sort().values, torch.arange(size * size))
    x = torch.randint(0, 1000, (3, size * size), generator=torch.Generator().manual_seed(size))
    assert torch.equal(p(p(x), reverse=True), x)
    assert torch.equal(p(p(x, reverse=True)), x)


def test_identity_is_identity() -> None:
    p = build_permuter("identity", 4, 6)
    x = torch.randint(0, 50, (2, 24))
    assert isinstance(p, Identity)
    assert p(x) is x and p(x, reverse=True) is x
    assert list(p.state_dict()) == []


@pytest.mark.parametrize("name", [n for n in ALL if n != "identity"])
def test_reference_buffer_names(name: str) -> None:
    p = build_permuter(name, 4, 4)
    sd = p.state_dict()
    assert sorted(sd) == ["backward_shuffle_idx", "forward_shuffle_idx"]
    assert sd["forward_shuffle_idx"].dtype == torch.int64
    # an "official" state dict with these keys loads strictly
    p.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)


def _order(name: str, h: int, w: int) -> list[int]:
    return build_permuter(name, h, w)(torch.arange(h * w).unsqueeze(0))[0].tolist()


def test_zcurve_4x4_is_morton_order() -> None:
    assert _order("zcurve", 4, 4) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    # the reference stores the Morton code of each raster position as the backward index
    assert build_permuter("zcurve", 2, 2).backward_shuffle_idx.tolist() == [0, 1, 2, 3]


def test_subsample_4x4_is_coarse_to_fine() -> None:
    assert _order("subsample", 4, 4) == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]


def test_spirals_by_hand() -> None:
    assert _order("spiral_out", 2, 2) == [2, 0, 1, 3]
    out4 = [9, 5, 6, 10, 14, 13, 12, 8, 4, 0, 1, 2, 3, 7, 11, 15]
    assert _order("spiral_out", 4, 4) == out4
    assert _order("spiral_in", 4, 4) == out4[::-1]


def test_alternate_3x4_snakes() -> None:
    assert _order("alternate", 3, 4) == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]


def test_random_is_seeded_like_reference() -> None:
    assert _order("random", 4, 5) == np.random.RandomState(1).permutation(20).tolist()
    assert _order("random", 4, 5) == _order("random", 4, 5)


@pytest.mark.parametrize("name,h,w", [
    ("zcurve", 4, 8), ("zcurve", 6, 6), ("subsample", 4, 8), ("subsample", 12, 12),
    ("spiral_in", 3, 3), ("spiral_out", 3, 3), ("spiral_out", 4, 6),
])
def test_unsupported_grids_raise(name: str, h: int, w: int) -> None:
    with pytest.raises(ValueError, match=name):
        build_permuter(name, h, w)


def test_non_square_grids_where_allowed() -> None:
    for name in ("identity", "alternate", "random"):
        p = build_permuter(name, 3, 5)
        x = torch.arange(15).unsqueeze(0)
        assert torch.equal(p(p(x), reverse=True), x)


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown permuter"):
        build_permuter("hilbert", 4, 4)
