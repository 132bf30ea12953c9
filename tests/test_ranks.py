"""The helpers that split a command's work over torchrun ranks and bring it back together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vqgan_cli.runtime import Runtime, check_same_arguments, gather_rows, my_share


def test_shares_are_disjoint_cover_everything_and_depend_only_on_count_and_world() -> None:
    cpu = torch.device("cpu")
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shares = [my_share(n, Runtime(cpu, r, world)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            assert shares[0] == list(range(0, n, world))  # item i goes to rank i % world


def test_one_process_passes_through() -> None:
    rt = Runtime(torch.device("cpu"))
    t = torch.arange(6.0).view(3, 2)
    assert gather_rows(t, rt) is t
    check_same_arguments(rt, {"n": 1}, "vqgan sample")  # nothing to compare


SCRIPT = """
import sys, torch
from vqgan_cli.runtime import RankMismatch, check_same_arguments, gather_rows, setup_runtime, shutdown
rt = setup_runtime("cpu")
rows = torch.full((rt.rank + 1, 2), float(rt.rank))  # rank 0: 1 row of 0s, rank 1: 2 rows of 1s
got = gather_rows(rows, rt)
assert got.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], got
check_same_arguments(rt, {"n": 4, "out": "x"}, "vqgan sample")
try:
    check_same_arguments(rt, {"n": 4 + rt.rank}, "vqgan sample")
except RankMismatch as e:
    assert "rank(s) 1 were started with other arguments than rank 0" in str(e), e
else:
    raise AssertionError("no mismatch found")
shutdown(rt)
"""


@pytest.mark.slow
def test_two_ranks_gather_and_compare_arguments(tmp_path: Path, run_two_ranks) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    run_two_ranks(script)

