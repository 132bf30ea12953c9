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


class TrainProgress:
    """Step counter with rate, ETA and the latest losses; silent on non-main ranks."""

    def __init__(self, total: int, start: int, description: str, enabled: bool = True):
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start_step = start
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, disable=not enabled, transient=False, auto_refresh=console.is_terminal,
        )
        self._last_info = ""
        self._task = self._progress.add_task(description, total=total, completed=start,
                                             rate="", info="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, items_per_s: float, unit: str, info: str) -> None:
        rate = f"{items_per_s:.1f} {unit}/s"
        self._progress.update(self._task, completed=step, rate=rate, info=info)
        if self.enabled and not self._progress.console.is_terminal and info != self._last_info:
            # Logs and CI get no live bar: print a plain line whenever new numbers come in.
            self._last_info = info
            task = self._progress.tasks[0]
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / done * (task.total - step) if done and task.total else 0.0
            self._progress.console.print(f"{task.description}: step {step}/{task.total:.0f}, {rate}, "
                                         f"{info}, eta {eta / 60:.1f} min")

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
