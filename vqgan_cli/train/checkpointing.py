"""A run folder: its saved recipe (a resumed run must match it) and its step checkpoints (write,
find the latest complete one, keep the last M).

A step checkpoint is a pair in ``<run>/checkpoints/``: ``step_0000500.state.pt`` (optimisers,
RNG, data position, training-only modules) written first, then ``step_0000500.safetensors``
(the model, loadable on its own). Both writes are atomic and the weights come last, so a pair
whose weights file exists is complete; anything else is ignored on resume.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from rich.markup import escape
from torch import nn

from vqgan_cli.checkpoints.format import load_state, save_state, state_path
from vqgan_cli.config import ConfigError
from vqgan_cli.console import console
from vqgan_cli.faults import human_bytes, ledger, space_shortfall
from vqgan_cli.runtime import Runtime

_STEP = re.compile(r"^step_(\d+)\.safetensors$")

# Recipe keys that may change between a run and its resumption without changing the result
# up to the point where the earlier run stopped.
RESUMABLE_CHANGES = ("train.max_steps", "train.ckpt_every", "train.keep_last", "train.log_every",
                     "train.image_every", "train.val_every", "train.val_batches", "train.threads",
                     "train.max_nonfinite", "data.workers", "data.verify", "train.out_dir", "train.loggers")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prepare_run_dir(run_dir: Path, resolved: dict, overwrite: bool, rt: Runtime) -> None:
    """Create the run folder and save the resolved recipe; refuse to resume a different recipe.

    Only the main process writes. A resumed run must match the saved recipe except for the keys
    in RESUMABLE_CHANGES; otherwise continuing would silently mix two experiments.
    """
    saved_path = run_dir / "recipe.yaml"
    if rt.is_main and overwrite and run_dir.exists():
        for name in ("checkpoints", "images", "metrics.jsonl", "recipe.yaml", "tensorboard", "curves.png"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    if saved_path.is_file() and (run_dir / "checkpoints").is_dir():
        before = _flatten(yaml.safe_load(saved_path.read_text()) or {})
        now = _flatten(resolved)
        changed = [f"{k}: run has {before.get(k)!r}, recipe now says {now.get(k)!r}"
                   for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(changed + [f"{run_dir} holds a run of another recipe: pass `overwrite` "
                                         "to start it over, or set train.out_dir to a new folder"])
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(yaml.safe_dump(resolved, sort_keys=False))


class StepCheckpoint(NamedTuple):
    step: int
    weights: Path
    state: Path


class CheckpointManager:
    """Owns ``<run>/checkpoints``; only the main process should call ``save``."""

    def __init__(self, run_dir: str | Path, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.sizes: tuple[int, int] | None = None  # (one checkpoint, final weights), from check_space
        self._record(self.latest())

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
        self._record(StepCheckpoint(step, weights, state_path(weights)))
        return weights

    def _record(self, latest: StepCheckpoint | None) -> None:
        """What a fault would leave behind: the last complete checkpoint, and how to go on."""
        if self.sizes is not None:
            ledger.need = self._need()
        if latest is None:
            ledger.record("no checkpoint of this run yet (the first comes at train.ckpt_every)",
                          "re-run the same command to start the run again")
        else:
            ledger.record(f"checkpoint step {latest.step} ({latest.weights}) is intact",
                          f"re-run the same command to resume from step {latest.step}")

    def check_space(self, per_checkpoint: int, final: int) -> None:
        """Warn (main process) when the run folder's disk has less room than the rest of the run
        writes: ``keep_last`` checkpoints plus one in flight (less those already there, which
        pruning replaces) and the final weights."""
        self.sizes = (per_checkpoint, final)
        what = (f"{self.keep_last + 1} checkpoints of {human_bytes(per_checkpoint)}: keep_last "
                f"{self.keep_last} plus one being written, and final weights of {human_bytes(final)}")
        if (warning := space_shortfall(self.dir.parent, self._need(), what, "train.out_dir")) is not None:
            console.print(f"[yellow]warning:[/] {escape(warning)}")

    def _need(self) -> int:
        """Bytes the rest of the run adds at its peak: checkpoints up to keep_last + 1 (those on
        disk count) and the final weights."""
        per, final = self.sizes  # type: ignore[misc]
        have = sum(p.stat().st_size for c in self.list() for p in (c.weights, c.state))
        return max(0, (self.keep_last + 1) * per - have) + final

    @staticmethod
    def load(ckpt: StepCheckpoint) -> dict:
        return load_state(ckpt.state)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpoint_size(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer | None],
                    extra: Sequence[nn.Module | None] = ()) -> tuple[int, int]:
    """(bytes of one step checkpoint, bytes of the weights file) estimated before training:
    the model's tensors, two moments per parameter of each Adam-type optimiser and the
    training-only modules (``extra``), plus about 200 bytes of file framing per tensor."""
    weights = model.state_dict().values()
    w = tensor_bytes(weights) + 200 * len(weights) + 8192  # safetensors header with the config
    moments = [p for opt in optimizers if opt is not None for g in opt.param_groups for p in g["params"]]
    modules = [t for m in extra if m is not None for t in m.state_dict().values()]
    state = 2 * tensor_bytes(moments) + tensor_bytes(modules) + 600 * len(moments) + 200 * len(modules) + 32768
    return w + state, w
