"""Every test writes only into temporary folders; example data comes from VQGAN_EXAMPLES.

The tests mirror the package layout (tests/checkpoints/ for vqgan_cli/checkpoints/, ...). Their
folders have no ``__init__.py``: in pytest's default ``prepend`` import mode this file's folder,
tests/, is put on ``sys.path``, so any test imports the shared ``factory`` (every tiny model,
checkpoint, shard folder and recipe) and ``official_files`` (official-release files) by name;
test file basenames stay unique across folders for the same reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

_DEFAULT_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "examples"
EXAMPLES = Path(os.environ.get("VQGAN_EXAMPLES", _DEFAULT_EXAMPLES))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Point TORCH_HOME (and so any weight cache) at a temporary folder; one intra-op thread.

    Every test model is tiny: one thread is fastest for them, and with ``-n 2`` on two cores
    more threads only make OpenMP spin-wait (100x slowdowns seen on a loaded machine).
    """
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def examples() -> Path:
    """The shared example photos and maps; skip where they are absent."""
    if not (EXAMPLES / "sflckr_examples.txt").is_file():
        pytest.skip(f"example data not found at {EXAMPLES} (set VQGAN_EXAMPLES to the examples folder)")
    return EXAMPLES.resolve()


@pytest.fixture
def run_two_ranks() -> Callable[[Path], None]:
    """Run a script as 2 CPU processes under torchrun (a free port each time); fail with its stderr."""

    def run(script: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", str(script)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return run
