"""Step checkpoints of a run folder: write, find the latest complete one, keep the last M.

A step checkpoint is a pair in ``<run>/checkpoints/``: ``step_0000500.state.pt`` (optimisers,
RNG, data position, training-only modules) written first, then ``step_0000500.safetensors``
(the model, loadable on its own). Both writes are atomic and the weights come last, so a pair
whose weights file exists is complete; anything else is ignored on resume.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from vqgan_cli.checkpoints import load_state, save_state, state_path

_STEP = re.compile(r"^step_(\d+)\.safetensors$")


class StepCheckpoint(NamedTuple):
    step: int
    weights: Path
    state: Path


class CheckpointManager:
    """Owns ``<run>/checkpoints``; only the main process should call ``save``."""

    def __init__(self, run_dir: str | Path, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}.safetensors"

    def list(self) -> list[StepCheckpoint]:
        """Complete checkpoints, oldest first."""
        found = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                m = _STEP.match(p.name)
                if m and state_path(p).is_file():
                    found.append(StepCheckpoint(int(m.group(1)), p, state_path(p)))
        return sorted(found)

    def latest(self) -> StepCheckpoint | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, state: dict, write_weights: Callable[[Path], object]) -> Path:
        """State first, weights last (see module doc); then prune old pairs."""
        weights = self.path_for(step)
        save_state(state_path(weights), state)
        write_weights(weights)
        for old in self.list()[: -self.keep_last]:
            old.weights.unlink(missing_ok=True)
            old.state.unlink(missing_ok=True)
        return weights

    @staticmethod
    def load(ckpt: StepCheckpoint) -> dict:
        return load_state(ckpt.state)
