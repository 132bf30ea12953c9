"""Loop machinery both stages share: run folder, resumable batch stream, non-finite guard,
learning-rate rules, optimiser steps and the per-rank RNG states a checkpoint keeps."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, IterableDataset

from vqgan_cli import runtime as R
from vqgan_cli.config import ConfigError
from vqgan_cli.runtime import Runtime

# Recipe keys that may change between a run and its resumption without changing the result
# up to the point where the earlier run stopped.
RESUMABLE_CHANGES = ("train.max_steps", "train.ckpt_every", "train.keep_last", "train.log_every",
                     "train.image_every", "train.val_every", "train.val_batches", "train.threads",
                     "train.max_nonfinite", "data.workers", "data.verify", "train.out_dir", "train.loggers")


class TrainingError(Exception):
    """A run that cannot go on (non-finite losses, unusable state); the message says what to do."""


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
            raise ConfigError(changed + [f"{run_dir} holds a run of another recipe: pass --overwrite "
                                         "to start it over, or set train.out_dir to a new folder"])
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(yaml.safe_dump(resolved, sort_keys=False))


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # batches consumed in this epoch, per process


class BatchStream:
    """Endless batches over epochs, restartable at an exact (epoch, batch) position.

    Map-style datasets go through a ResumableSampler (shuffled per epoch by seed, split by rank);
    iterable datasets (tar shards) split themselves and are fast-forwarded on resume. The
    loader gets its own seeded generator so that making an iterator never consumes the global
    RNG: a resumed run then draws exactly the random numbers a straight run draws.
    """

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, rt: Runtime,
                 collate: Callable, position: DataPosition | None = None, shuffle: bool = True):
        from vqgan_cli.data.sampler import ResumableSampler

        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers
        self.seed = seed
        self.collate = collate
        self.position = position or DataPosition()
        self.iterable = isinstance(dataset, IterableDataset)
        self.sampler = None if self.iterable else ResumableSampler(
            len(dataset), seed=seed, rank=rt.rank, world_size=rt.world_size, shuffle=shuffle)  # type: ignore[arg-type]
        if self.sampler is not None and len(self.sampler) < batch_size:
            raise TrainingError(f"the data has {len(dataset)} items, fewer than one batch of "  # type: ignore[arg-type]
                                f"{batch_size} per process: add data or lower train.batch_size")
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        pos = self.position
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(pos.epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pos.epoch)
        if self.sampler is not None:
            self.sampler.start_at(pos.epoch, pos.batch * self.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.workers, collate_fn=self.collate, drop_last=True,
                            generator=gen, persistent_workers=False,
                            prefetch_factor=4 if self.workers else None)
        self._it = iter(loader)
        if self.iterable:
            for _ in range(pos.batch):
                next(self._it)

    def next(self) -> dict:
        if self._it is None:
            self._start_epoch()
        assert self._it is not None
        try:
            batch = next(self._it)
        except StopIteration:
            if self.position.batch == 0:
                raise TrainingError("the data produced no batch at all: every file was skipped or "
                                    "the source is empty") from None
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._start_epoch()
            return self.next()
        self.position = DataPosition(self.position.epoch, self.position.batch + 1)
        return batch

    def close(self) -> None:
        self._it = None


class NonFiniteGuard:
    """Counts skipped steps; K in a row stop the run with the last good checkpoint intact."""

    def __init__(self, limit: int, total: int = 0, in_a_row: int = 0):
        self.limit = limit
        self.total = total
        self.in_a_row = in_a_row

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"{self.in_a_row} non-finite losses in a row (last at step {step}); the run stopped "
                "and its last checkpoint is intact. Lower the learning rate (train.base_lr), use "
                "train.precision=fp32, or check the data.")


def learning_rate(base_lr: float, batch_size: int, accumulate: int, world_size: int) -> float:
    """The reference's scaling rule: base_lr x batch x accumulation x processes."""
    return base_lr * batch_size * accumulate * world_size


def scheduled_lr(step: int, peak: float, warmup_steps: int, total_steps: int, schedule: str,
                 min_ratio: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``peak`` over
    ``warmup_steps``, then ``constant`` or a ``cosine`` decay to ``min_ratio * peak`` at
    ``total_steps``. Warm-up keeps early AdamW steps of a transformer from diverging."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; use constant or cosine")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def accumulate_logs(logs: dict, values: dict, n: int) -> None:
    """Add ``values / n`` into ``logs`` (the mean over ``n`` micro-batches); skips None."""
    for k, v in values.items():
        if v is None:
            continue
        logs[k] = logs.get(k, 0.0) + float(v.detach() if hasattr(v, "detach") else v) / n


def optimizer_step(opt: torch.optim.Optimizer, module: torch.nn.Module,
                   scaler: torch.amp.GradScaler, clip: float | None) -> float | None:
    """Unscale, clip (when asked) and step; returns the gradient norm before clipping."""
    norm = None
    if clip is not None:
        scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), clip))
    scaler.step(opt)
    return norm


def gather_rng(rt: Runtime) -> list[dict]:
    """Every rank's RNG state, for the checkpoint (each rank draws its own random numbers)."""
    mine = R.rng_state()
    if not rt.distributed:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list[dict], rt: Runtime) -> None:
    """This rank's RNG state from a checkpoint (rank 0's when the run had fewer processes)."""
    R.set_rng_state(states[rt.rank] if rt.rank < len(states) else states[0])


def due(step: int, every: int, last: int) -> bool:
    """Periodic work (logging, validation, checkpoints) runs every N steps and on the last one."""
    return step % every == 0 or step == last


def report_end(title: str, run_dir: Path, step: int, start_step: int, seconds: float, nonfinite: int,
               stopped: int | None, rows: dict[str, Any], val: dict[str, Any]) -> None:
    """The closing lines of a run (main process only): a signal notice, then the summary table."""
    from vqgan_cli.console import console, summary_table

    if stopped is not None:
        console.print(f"[yellow]stopped by signal at step {step}[/]: checkpoint saved; run the "
                      "same command again to resume")
    table = {"run folder": str(run_dir), "steps": f"{step} ({step - start_step} this run)",
             "time": f"{seconds:.1f} s", "non-finite steps": nonfinite, **rows}
    table.update({f"val {k}": v for k, v in val.items()})
    console.print(summary_table(title, table))
