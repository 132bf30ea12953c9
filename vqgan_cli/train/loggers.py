"""Where a run's numbers go: metrics.jsonl always, TensorBoard event files when the recipe asks.

TensorBoard gets exactly the records metrics.jsonl gets (tag ``<split>/<key>``, same step), plus
the pictures and histograms only a viewer can show. A resumed run opens its writer with
``purge_step`` = the checkpoint's step + 1, so readers drop what the interrupted run wrote past
the checkpoint, as ``MetricsWriter.truncate_after`` drops those lines: no step appears twice.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqgan_cli.console import MetricsWriter

LOGGERS = ("jsonl", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


def logger_problems(loggers: list[str]) -> list[str]:
    """Recipe problems of ``train.loggers`` (checked before any heavy work)."""
    problems = [f"loggers: unknown logger {name!r}; choose from {list(LOGGERS)}"
                for name in loggers if name not in LOGGERS]
    if "tensorboard" in loggers and importlib.util.find_spec("tensorboard") is None:
        problems.append("loggers: tensorboard is not installed: pip install 'vqgan[tensorboard]' "
                        "(or drop tensorboard from train.loggers)")
    return problems


class RunLog:
    """metrics.jsonl plus the optional TensorBoard writer; silent on non-main ranks."""

    def __init__(self, run_dir: Path, loggers: list[str], enabled: bool = True):
        self.jsonl = MetricsWriter(run_dir / "metrics.jsonl", enabled=enabled)
        self.tb_dir = run_dir / TENSORBOARD_DIR
        self.use_tb = enabled and "tensorboard" in loggers
        self._tb: Any = None
        self._purge: int | None = None

    def _writer(self) -> Any:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=self._purge, flush_secs=30)
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Resuming from ``step``: forget every record written after it, in every logger."""
        self.jsonl.truncate_after(step)
        self._purge = step + 1

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        if not self.use_tb:
            return
        step, split = int(record["step"]), record.get("split", "train")
        writer = self._writer()
        for key, value in record.items():
            if key in ("step", "split"):
                continue
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(f"{split}/{key}", float(value), step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A grid already saved as ``png`` (the same picture the run folder keeps)."""
        if not self.use_tb or not png.is_file():
            return
        from PIL import Image

        with Image.open(png) as im:
            array = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        self._writer().add_image(tag, array, step, dataformats="HWC")

    def histogram(self, tag: str, values: torch.Tensor | None, step: int) -> None:
        if not self.use_tb or values is None or values.numel() == 0:
            return
        self._writer().add_histogram(tag, values.detach().float().cpu(), step)

    def code_histogram(self, tag: str, quantizer: torch.nn.Module, step: int) -> None:
        """Which codes the quantizer's usage window used (computed only when TensorBoard is on)."""
        if self.use_tb:
            self.histogram(tag, code_use_counts(quantizer), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def code_use_counts(quantizer: torch.nn.Module) -> torch.Tensor | None:
    """Per code, the index of every batch of the usage window that used it: a histogram over
    code ids whose flat parts are the dead codes."""
    tracker = getattr(quantizer, "tracker", None)
    if tracker is None or tracker.seen is None or tracker.filled == 0:
        return None
    per_code = tracker.seen[: tracker.filled].sum(0)  # (n_embed,) batches that used each code
    return torch.repeat_interleave(torch.arange(per_code.numel(), device=per_code.device), per_code)


def draw_curves(run_dir: Path) -> None:
    """curves.png at the end of a run; a one-line note instead when matplotlib is missing."""
    from vqgan_cli.console import console
    from vqgan_cli.train.curves import plot_available, write_curves

    if not plot_available():
        console.print("[yellow]no curves.png: pip install matplotlib, then vqgan plot RUN_DIR[/]")
        return
    try:
        write_curves(run_dir)
    except (OSError, ValueError) as e:  # a picture must not fail a run whose weights are saved
        console.print(f"[yellow]curves.png not drawn ({e}); vqgan plot {run_dir} tries again[/]")
