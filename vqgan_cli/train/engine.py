"""The one training loop both stages run: setup, resume, DDP/compile, signals, the non-finite guard,
the log/validation/checkpoint cadence, the final save and the closing report.

A stage (:mod:`vqgan_cli.train.tokenizer`, :mod:`vqgan_cli.train.prior`) is its recipe, its
models and optimisers, and a short step body; it knows nothing of checkpoints, cadence or signals.
The loop, top to bottom::

    open_run(...)                          runtime, run folder, seed: identical weights on every rank
    stage = ...Stage(recipe, rt)           build (the caller)
    run(stage, cfg, stream, run_dir, rt):
        resume from the latest complete checkpoint (or seed each rank its own stream)
        stage.attach(wrap(stage.model))    DDP + torch.compile
        each step: out = stage.step(batches, step); guard; stage.apply(step) when finite
                   log / images / validate / checkpoint when due
        final weights, curves.png, summary table

A resumed run is bitwise identical to a straight one: a checkpoint keeps every rank's RNG state
and the exact data position, and the work between steps (logs, validation, pictures) draws from
its own generators, never from the global RNG (a stage must keep it so). Ctrl-C or SIGTERM stops
the loop between steps, or a validation between its batches: the step is saved (with its
validation marked as due) and the run ends with 130/143; the same command resumes there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vqgan_cli import runtime as R
from vqgan_cli.console import TrainProgress, console, summary_table
from vqgan_cli.faults import Stopped
from vqgan_cli.runtime import Precision, Runtime, cpu_capability, print_precision
from vqgan_cli.train import TrainingError
from vqgan_cli.train.checkpointing import CheckpointManager, prepare_run_dir
from vqgan_cli.train.config import TrainConfig
from vqgan_cli.train.loggers import RunLog, draw_curves
from vqgan_cli.train.signals import StopRequest
from vqgan_cli.train.stream import BatchStream, DataPosition

__all__ = ["RunResult", "Stage", "StepOut", "TrainLog", "TrainState", "TrainingError", "open_run", "run",
           "wrap"]


class StepOut(NamedTuple):
    """What one optimiser step's forward/backward produced."""

    finite: bool  # every loss finite on every rank: only then may the stage apply the update
    logs: dict[str, float]  # the step's losses, averaged over its micro-batches
    notes: tuple[str, ...] = ()  # one-off messages for the console (e.g. a skipped file)


class TrainLog(NamedTuple):
    """A train record of metrics.jsonl (the fields between ``split`` and ``nonfinite_steps``) and
    the progress bar's text."""

    record: dict[str, float]
    text: str


class RunResult(NamedTuple):
    run_dir: Path
    weights: Path  # the final weights (not written when a signal stopped the run)
    steps: int
    seconds: float
    val: dict
    nonfinite: int
    stopped_by_signal: int | None  # exit code when a signal ended the run early


class Stage(Protocol):
    """One stage of training as the engine drives it (train/tokenizer.py, train/prior.py)."""

    name: str  # "train-tokenizer": the progress bar's and the summary's title
    weights_name: str  # the final weights' file name in the run folder
    unit: str  # what the rate counts ("img", "tok")
    items_per_step: int  # units one optimiser step consumes, over all processes
    model: nn.Module  # the bare model: saved, validated, and wrapped by the engine
    precision: Precision  # what train.precision resolved to on this device

    def checkpoint_size(self) -> tuple[int, int]:
        """(bytes of one step checkpoint, bytes of the final weights), estimated before work."""

    def attach(self, forward: nn.Module, log: RunLog | None = None, run_dir: Path | None = None) -> None:
        """Train through ``forward`` (the model wrapped by DDP/compile); with ``log`` and ``run_dir``,
        also prepare validation and say what is trained (without: a stage that only steps)."""

    def step(self, batches: Iterator[dict], step: int) -> StepOut:
        """Forward and backward of one optimiser step over its micro-batches; no update yet."""

    def apply(self, step: int) -> dict[str, float]:
        """The optimiser update(s) of a finite step; returns what only the update knows (norms)."""

    def train_log(self, logs: dict[str, float], rate: float, state: TrainState) -> TrainLog: ...

    def images(self, step: int) -> None:
        """Pictures of progress at ``train.image_every`` (main process)."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation metrics (main process); empty when there is nothing to validate on."""

    def val_text(self, val: dict[str, float]) -> str: ...

    def summary(self, final: Path | None) -> dict[str, Any]:
        """The stage's rows of the closing table; ``final`` is None when the run stopped early."""

    def state_dict(self) -> dict:
        """What resuming needs beyond the weights (optimisers, training-only modules)."""

    def load_state_dict(self, state: dict) -> None: ...

    def load_weights(self, path: Path) -> None: ...

    def save_weights(self, path: Path, info: dict) -> None: ...


@dataclass
class TrainState:
    """The loop's own resumable state; a step checkpoint holds it beside the stage's state."""

    step: int = 0  # optimiser steps done
    position: DataPosition = field(default_factory=DataPosition)  # batches consumed, per process
    nonfinite: int = 0  # steps skipped for a non-finite loss, in all
    nonfinite_in_a_row: int = 0
    rng: list[dict] = field(default_factory=list)  # every rank's RNG state, captured at saving
    val_due: bool = False  # a signal cut this step's validation: a resumed run does it first

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
                "rng": self.rng, "nonfinite": self.nonfinite, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                **({"val_due": True} if self.val_due else {})}  # other checkpoints keep their old keys

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.position = DataPosition(int(state["epoch"]), int(state["batch"]))
        self.rng = list(state["rng"])
        self.nonfinite = int(state["nonfinite"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.val_due = bool(state.get("val_due", False))  # checkpoints written before it lack the key

    def count(self, finite: bool, limit: int) -> None:
        """The non-finite guard: count a skipped step; ``limit`` in a row stop the run, with the
        last good checkpoint intact."""
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (last at step {self.step}); the run "
                "stopped and its last checkpoint is intact. Lower the learning rate (train.base_lr), use "
                "train.precision=fp32, or check the data.")


def open_run(cfg: TrainConfig, resolved: dict, run_dir: Path, overwrite: bool) -> Runtime:
    """Join the processes, prepare the run folder (refusing another recipe's run) and seed
    every rank alike, so that the stage built next has identical initial weights everywhere."""
    rt = R.setup_runtime(cfg.device, cfg.threads)
    prepare_run_dir(run_dir, resolved, overwrite, rt)
    R.barrier(rt)
    R.seed_everything(cfg.seed)
    return rt


def wrap(model: nn.Module, rt: Runtime, compile: bool) -> nn.Module:
    """The module a stage trains through: DDP across processes, then ``torch.compile``. A model with
    ``compile_parts`` (the VQGAN) compiles the regions without graph breaks itself."""
    wrapped = model
    if compile and hasattr(model, "compile_parts"):
        model.compile_parts()
        compile = False
    if rt.distributed:
        wrapped = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                          broadcast_buffers=False)
    if compile:
        wrapped = torch.compile(wrapped, dynamic=False)  # static shapes: symbolic ones broke Inductor here
    return wrapped


def all_finite(loss: torch.Tensor, rt: Runtime) -> bool:
    """Whether ``loss`` is finite on every rank (all ranks skip a step together)."""
    return not R.any_rank(not bool(torch.isfinite(loss)), rt)


def accumulate_logs(logs: dict, values: dict, n: int) -> None:
    """Add ``values / n`` into ``logs`` (the mean over ``n`` micro-batches); skips None."""
    for k, v in values.items():
        if v is None:
            continue
        logs[k] = logs.get(k, 0.0) + float(v.detach() if hasattr(v, "detach") else v) / n


def due(step: int, every: int, last: int) -> bool:
    """Periodic work (logging, validation, checkpoints) runs every N steps and on the last one."""
    return step % every == 0 or step == last


def gather_rng(rt: Runtime) -> list[dict]:
    """Every rank's RNG state, for the checkpoint (each rank draws its own random numbers)."""
    mine = R.rng_state()
    if not rt.distributed:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


def run(stage: Stage, cfg: TrainConfig, stream: BatchStream, run_dir: Path, rt: Runtime) -> RunResult:
    """Train ``stage`` to ``cfg.max_steps``, resuming from the run folder's latest checkpoint.

    ``rt`` comes in (from :func:`open_run`) because the stage is built on its device before the
    loop starts; ``stream`` starts wherever the checkpoint says.
    """
    ckpts = CheckpointManager(run_dir, cfg.keep_last)
    if rt.is_main:
        ckpts.check_space(*stage.checkpoint_size())  # warn before work when the disk is short
    log = RunLog(run_dir, cfg.loggers, enabled=rt.is_main)
    state = TrainState()
    latest = ckpts.latest()
    if latest is not None:
        stage.load_weights(latest.weights)
        saved = ckpts.load(latest)
        state.load_state_dict(saved)
        stage.load_state_dict(saved)
        # this rank's stream (rank 0's when the run had fewer processes)
        R.set_rng_state(state.rng[rt.rank] if rt.rank < len(state.rng) else state.rng[0])
        log.truncate_after(state.step)
        if rt.is_main:
            console.print(f"[green]resuming[/] {run_dir} from step {state.step} ({latest.weights.name})")
    else:
        R.seed_everything(cfg.seed + 1000 * rt.rank)  # per-rank randomness from here on
    stream.position = state.position
    _announce_precision(stage.precision, rt, log, state.step, stream.workers)
    stage.attach(wrap(stage.model, rt, cfg.compile), log, run_dir)

    def save_checkpoint() -> None:
        state.rng = gather_rng(rt)  # a collective: every rank takes part
        if rt.is_main:
            ckpts.save(state.step, {**state.state_dict(), **stage.state_dict()},
                       lambda p: stage.save_weights(p, {"step": state.step}))

    start_time, start_step = time.perf_counter(), state.step
    val: dict = {}
    window = (time.perf_counter(), state.step)
    stopped: int | None = None
    shown: tuple[float, str] = (0.0, "")
    stop = StopRequest()

    def validate_now(bar: TrainProgress) -> bool:
        """Validate at this step; True when a signal cut it short (the step is saved as due)."""
        nonlocal val, stopped
        result, cut = _validate(stage, state.step, log, bar, rt)
        val = result or val
        state.val_due = cut
        if cut:
            stopped = stop.exit_code if stop.requested else 130
        return cut

    try:
        with TrainProgress(cfg.max_steps, state.step, f"{stage.name} {run_dir.name}", rt.is_main) as bar:
            if state.val_due and not validate_now(bar):  # the validation a signal cut: finish it first
                save_checkpoint()  # so that a later resume from this step does not validate again
            while stopped is None and state.step < cfg.max_steps:
                if R.any_rank(stop.requested, rt):
                    stopped = stop.exit_code if stop.requested else 130
                    break
                step = state.step
                out = stage.step((stream.next() for _ in range(cfg.accumulate)), step)
                state.position = stream.position
                for note in out.notes:
                    bar.log(note)
                state.count(out.finite, cfg.max_nonfinite)
                logs = out.logs
                if out.finite:
                    logs = {**logs, **stage.apply(step)}
                else:
                    bar.log(f"[red]non-finite loss at step {step}: step skipped "
                            f"({state.nonfinite_in_a_row} in a row, {state.nonfinite} in all)[/]")
                state.step += 1

                if due(state.step, cfg.log_every, cfg.max_steps):
                    now = time.perf_counter()
                    rate = (state.step - window[1]) * stage.items_per_step / max(now - window[0], 1e-9)
                    window = (now, state.step)
                    entry = stage.train_log(logs, rate, state)
                    log.write({"step": state.step, "split": "train", **entry.record,
                               "nonfinite_steps": state.nonfinite})
                    shown = (rate, entry.text)
                bar.update(state.step, shown[0], stage.unit, shown[1])
                if rt.is_main and due(state.step, cfg.image_every, cfg.max_steps):
                    stage.images(state.step)
                if due(state.step, cfg.val_every, cfg.max_steps) and validate_now(bar):
                    break
                if due(state.step, cfg.ckpt_every, cfg.max_steps):
                    save_checkpoint()
        if stopped is not None:
            save_checkpoint()
    finally:
        log.close()
        stop.close()
        stream.close()
        R.shutdown(rt)

    final = run_dir / stage.weights_name
    if rt.is_main and stopped is None:
        stage.save_weights(final, {"step": state.step, "run": str(run_dir), "val": val, **stage.precision.record()})
    seconds = time.perf_counter() - start_time
    if rt.is_main:
        draw_curves(run_dir)
        _report(stage, run_dir, state, start_step, seconds, stopped, final, val)
    return RunResult(run_dir, final, state.step, seconds, val, state.nonfinite, stopped)


def _validate(stage: Stage, step: int, log: RunLog, bar: TrainProgress, rt: Runtime) -> tuple[dict, bool]:
    """Validation at ``step`` (main process): (metrics, cut). ``cut``: a signal stopped it between
    batches; every rank learns so (a collective), so that all of them stop and save together."""
    val, cut = {}, False
    if rt.is_main:
        try:
            val = stage.evaluate(step)
        except Stopped:
            cut = True
        if val:
            log.write({"step": step, "split": "val", **val})
            bar.log(f"step {step} validation: {stage.val_text(val)}")
    return val, R.any_rank(cut, rt)


def _announce_precision(choice: Precision, rt: Runtime, log: RunLog, step: int, workers: int) -> None:
    """Say which precision the run computes in and why, and keep it in metrics.jsonl (a ``run``
    record at the step the run starts or resumes from)."""
    if not rt.is_main:
        return
    print_precision(choice, "train.precision")
    log.write({"step": step, "split": "run", **choice.record(), "device": str(rt.device),
               "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
               "workers": workers})  # what data.workers (auto: the machine) gave


def _report(stage: Stage, run_dir: Path, state: TrainState, start_step: int, seconds: float,
            stopped: int | None, final: Path, val: dict[str, Any]) -> None:
    """The closing lines of a run (main process only): a signal notice, then the summary table."""
    if stopped is not None:
        console.print(f"[yellow]stopped by signal at step {state.step}[/]: checkpoint saved; run the "
                      "same command again to resume")
    table = {"run folder": str(run_dir), "steps": f"{state.step} ({state.step - start_step} this run)",
             "time": f"{seconds:.1f} s", "non-finite steps": state.nonfinite,
             **stage.summary(final if stopped is None else None)}
    table.update({f"val {k}": v for k, v in val.items()})
    console.print(summary_table(f"{stage.name} summary", table))
