"""The command line's one error boundary: library errors become a message and an exit code.

Exit codes: 0 success; 1 a run that failed (bad data, non-finite losses, an altered shard, a
full or read-only disk and other operating-system errors); 2 usage and recipe errors (bad
options, recipe problems, missing files or weights); 128+N when signal N stopped a run after
saving what it had finished. ``--debug`` (or VQGAN_DEBUG=1) adds the traceback to a message.

The library names a setting at fault by its field in backticks (`top_k`); :func:`as_options`
words it as the command's option (``--top-k``).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from vqgan_cli.console import console

T = TypeVar("T")
debug = {"on": False}  # --debug: tracebacks of caught errors are shown

_OPTION_OF = {"classes": "--class", "image": "IMAGE"}  # fields whose option is not --field-name


def as_options(text: str) -> str:
    """`field_name` in a library message -> the option that sets it (``--field-name``)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: _OPTION_OF.get(m[1], "--" + m[1].replace("_", "-")), text)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` (paths whole, copy-pasteable) and return the exit to raise."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {_which_rank()}{escape(as_options(message))}", soft_wrap=True)
    return typer.Exit(code)


def _which_rank() -> str:
    """``rank N of W: `` under torchrun, where several processes print into one console; else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '0')} of {world}: " if world > 1 else ""


def stop(e: BaseException, message: str, code: int) -> typer.Exit:
    """:func:`fail` for a caught error; with --debug or VQGAN_DEBUG=1 its traceback comes first."""
    if debug["on"] or os.environ.get("VQGAN_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e)
    return fail(message, code)


def note(message: str) -> None:
    console.print(f"[yellow]note:[/] {as_options(message)}", soft_wrap=True)


def say_found(name: str | Path, config: str | Path | None) -> None:
    """Name what a run folder or a .ckpt's ../configs/ resolved to (checkpoint, YAML)."""
    from vqgan_cli.checkpoints.resolve import resolve_model

    found = resolve_model(name, str(config) if config else None).note
    if found:
        note(found)


def invocation(command: str, drop: tuple[str, ...] = ()) -> str | None:
    """The command line as typed, recorded in outputs so that they can be re-made; None when the
    command was called from Python rather than from the ``vqgan`` program."""
    if command not in sys.argv:
        return None
    return shlex.join(["vqgan", *(a for a in sys.argv[1:] if a not in drop)])


def _without_worker_traceback(e: Exception) -> str:
    """A DataLoader worker's error arrives with the worker's traceback in its message: keep
    only the message (the traceback is for --debug)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    lines = text.splitlines()
    heads = [i for i, ln in enumerate(lines) if ln.startswith(f"{type(e).__module__}.{type(e).__name__}: ")
             or ln.startswith(f"{type(e).__name__}: ")]
    return "\n".join(lines[heads[-1]:]).split(": ", 1)[1] if heads else text


def run_guarded(fn: Callable[[], T], setting: str = "--out") -> T:
    """Run one command's library call: the library's expected errors and the operating system's
    (no space, read-only, permissions, I/O) become one message with an exit code, no traceback;
    ``setting`` names the option that chooses the output folder."""
    from vqgan_cli import faults
    from vqgan_cli.checkpoints.format import CheckpointError
    from vqgan_cli.config import ConfigError
    from vqgan_cli.data import DataError
    from vqgan_cli.encode import EncodeUsageError
    from vqgan_cli.evaluate.inception import EvaluationError
    from vqgan_cli.models.lpips import PerceptualWeightsMissing
    from vqgan_cli.runtime import PrecisionError, RankMismatch
    from vqgan_cli.sample.inputs import SampleUsageError
    from vqgan_cli.sample.tokens import SamplingError
    from vqgan_cli.shards.format import ShardError
    from vqgan_cli.train import TrainingError

    faults.reset_ledger()
    default = faults.Ledger()

    def kept() -> str:  # only once the command has recorded something
        if (faults.ledger.kept, faults.ledger.resume) == (default.kept, default.resume):
            return ""
        return f"\n  kept: {faults.ledger.kept}\n  to continue: {faults.ledger.resume}"

    try:
        return fn()
    except (ConfigError, PerceptualWeightsMissing, CheckpointError, FileNotFoundError, EncodeUsageError,
            SampleUsageError, SamplingError, EvaluationError, PrecisionError, RankMismatch,
            ImportError) as e:  # ImportError: an extra
        raise stop(e, str(e), 2) from None
    except (DataError, TrainingError, ShardError) as e:
        raise stop(e, _without_worker_traceback(e) + kept(), 1) from None
    except OSError as e:
        raise stop(e, faults.explain(e, setting), 1) from None
    except KeyboardInterrupt as e:
        raise stop(e, "interrupted (Ctrl-C)" + kept(), 130) from None
    except faults.Stopped as e:
        raise stop(e, str(e) + kept(), e.exit_code) from None
