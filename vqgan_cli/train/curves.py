"""A run's training curves as one picture, curves.png, drawn from its metrics.jsonl.

One panel per question a reader asks (is the loss going down, how good are reconstructions or
predictions, is the codebook used, what did the adaptive weight and learning rate do), train as
solid lines and validation as dots on the same axes. Panels without data are left out, so the
same code draws tokenizer and prior runs. matplotlib is a dependency (imported lazily).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import NamedTuple

# (title, metrics.jsonl keys, log scale): the order of the panels on the page.
PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("loss", "nll", "rec", "perceptual", "g_loss", "d_loss", "q_loss", "bce", "l1"), True),
    ("PSNR (dB)", ("psnr", "large_psnr"), False),
    ("SSIM", ("ssim", "large_ssim"), False),
    ("bits per token", ("bits_per_token", "unigram_bits"), False),
    ("accuracy", ("accuracy",), False),
    ("codebook usage", ("codebook_usage",), False),
    ("perplexity", ("perplexity",), False),
    ("adaptive weight", ("adaptive_weight", "disc_factor"), False),
    ("learning rate", ("lr",), True),
    ("gradient norm", ("grad_norm",), True),
)


class Series(NamedTuple):
    label: str  # "<split> <key>"
    split: str
    steps: list[int]
    values: list[float]


class Panel(NamedTuple):
    title: str
    series: list[Series]
    log: bool


def read_records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def curve_panels(records: list[dict]) -> list[Panel]:
    """The panels of ``records`` that have data; each series keeps finite numbers only, and a
    series that is zero throughout is left out (it would flatten the others' scale)."""
    panels = []
    for title, keys, log in PANELS:
        series = []
        for split in ("train", "val"):
            for key in keys:
                points = [(int(r["step"]), float(r[key])) for r in records
                          if r.get("split", "train") == split and isinstance(r.get(key), (int, float))
                          and not isinstance(r.get(key), bool) and float(r[key]) == float(r[key])]
                if any(v != 0 for _, v in points):  # an all-zero term (no GAN phase yet) is not drawn
                    series.append(Series(f"{split} {key}", split, [p[0] for p in points],
                                         [p[1] for p in points]))
        if series:
            panels.append(Panel(title, series, log and all(v > 0 for s in series for v in s.values)))
    return panels


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_curves(run_dir: Path, out: Path | None = None) -> Path | None:
    """Draw ``run_dir``/metrics.jsonl into ``out`` (default ``run_dir``/curves.png); None when the
    run has no records yet. Raises ImportError naming the extra when matplotlib is missing."""
    metrics = run_dir / "metrics.jsonl"
    panels = curve_panels(read_records(metrics)) if metrics.is_file() else []
    if not panels:
        return None
    if not plot_available():
        raise ImportError("curves.png needs matplotlib: pip install matplotlib")
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    cols = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), dpi=100, layout="constrained")
    fig.suptitle(f"{run_dir.name}: training curves (lines: train, dots: validation)")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for s in panel.series:
            if s.split == "train":
                ax.plot(s.steps, s.values, label=s.label, linewidth=1.2)
            else:
                ax.plot(s.steps, s.values, "o--", label=s.label, markersize=4, linewidth=0.8)
        if panel.log:
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = out or run_dir / "curves.png"
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out)
    return out
