"""Every test writes only into temporary folders; example data comes from VQGAN_EXAMPLES."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process: with `-n 2` on 2 cores, more threads only make OpenMP spin.
    torch.set_num_threads(1)

EXAMPLES = Path(os.environ.get("VQGAN_EXAMPLES", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "examples"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Point TORCH_HOME (and so any weight cache) at a temporary folder."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    torch.manual_seed(0)
    yield


@pytest.fixture
def examples() -> Path:
    """The shared example photos and maps; skip where they are absent."""
    if not (EXAMPLES / "sflckr_examples.txt").is_file():
        pytest.skip(f"example data not found at {EXAMPLES} (set VQGAN_EXAMPLES to the examples folder)")
    return EXAMPLES.resolve()
