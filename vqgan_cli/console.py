"""What the user sees during a run: metrics.jsonl, a rich progress bar, a final summary table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vqgan_cli.faults import naming

console = Console(stderr=True, soft_wrap=True)  # messages with paths stay whole


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per line; resumed runs keep appending to the same file."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with naming(self.path), open(self.path, "a") as fh:
            fh.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with naming(self.path):
            self.path.write_text("".join(k + "\n" for k in kept))


def clock(seconds: float) -> str:
    """h:mm:ss, the way rich shows elapsed time, for plain log lines."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainProgress:
    """Step counter with rate, ETA and the latest losses; silent on non-main ranks.

    On a terminal: a live rich bar. Elsewhere (logs, CI, ``| tee``) rich would squeeze its columns
    into 80 characters and cut them with '…', so the bar stays off and each new set of numbers
    (a new ``info``, i.e. at train.log_every) is printed whole as one plain line, and the last
    numbers once more at the end when they were not printed yet."""

    def __init__(self, total: int, start: int, description: str, enabled: bool = True):
        self.enabled = enabled
        self.plain = enabled and not console.is_terminal
        self.total, self.description = total, description
        self.start_time = time.perf_counter()
        self.start_step = start
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, disable=not enabled or self.plain, transient=False, auto_refresh=console.is_terminal,
        )
        self._last_info = ""
        self._pending = ""  # the newest plain line not printed yet (printed at the end)
        self._task = self._progress.add_task(description, total=total, completed=start,
                                             rate="", info="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)
        if self._pending and exc[0] is None:  # where the run ended, once
            self._print(self._pending)

    def _print(self, line: str) -> None:
        self._pending = ""
        self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True, overflow="ignore",
                                     crop=False)

    def update(self, step: int, items_per_s: float, unit: str, info: str) -> None:
        rate = f"{items_per_s:.1f} {unit}/s"
        self._progress.update(self._task, completed=step, rate=rate, info=info)
        if not self.plain:
            return
        self._pending = self.line(step, rate, info)
        if info != self._last_info:
            self._last_info = info
            self._print(self._pending)

    def line(self, step: int, rate: str, info: str) -> str:
        """``train-tokenizer run 20/1200 (2%) 2.1 img/s elapsed 0:00:10 eta 0:09:22 loss 0.123``."""
        done, elapsed = step - self.start_step, time.perf_counter() - self.start_time
        eta = clock(elapsed / done * (self.total - step)) if done > 0 else "?"
        pct = f" ({100 * step // self.total}%)" if self.total else ""
        return (f"{self.description} {step}/{self.total}{pct} {rate} elapsed {clock(elapsed)} eta {eta} "
                f"{info}").rstrip()

    def log(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        table.add_row(k, str(v))
    return table


def print_rows(title: str, rows: list[tuple[str, ...]], header: bool = True) -> None:
    """A table whose first row names the columns (shown when ``header``)."""
    table = Table(title=title, show_header=header)
    for i, name in enumerate(rows[0]):
        table.add_column(name, style="bold" if not header and i == 0 else None, overflow="fold")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
