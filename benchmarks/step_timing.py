"""Timings of ``tokenizer_step.py``: per-variant results, their markdown table and the
machine they ran on (timings on a shared machine mean little without its load)."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass


@dataclass
class Result:
    """The timings of one variant of one config (every step's wall-clock and CPU seconds)."""

    config: str
    variant: str
    label: str
    times: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds, all threads
    warmup_s: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and self.error is None else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_times) if self.cpu_times and self.error is None else None


def describe_error(e: BaseException) -> str:
    """The first line of an exception, short enough for a table note."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def table(results: list[Result], batches: dict[str, int]) -> str:
    """A markdown table: per config and variant, s/step, images/s, the ratio to the config's
    ``reference`` variant and CPU s/step."""
    rows = [("config", "batch", "variant", "s/step", "images/s", "vs reference", "cpu s/step")]
    for res in results:
        batch = batches[res.config]
        base = next((r.median for r in results if r.config == res.config and r.variant == "reference"), None)
        if res.error is not None:
            rows.append((res.config, str(batch), res.label, "failed", "-", "n/a (see below)", "-"))
            continue
        m = res.median
        ratio = f"{base / m:.2f}x" if base and m else "n/a"
        rows.append((res.config, str(batch), res.label, f"{m:.3f}", f"{batch / m:.1f}", ratio,
                     f"{res.cpu_median:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
