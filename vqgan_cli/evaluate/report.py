"""The files every ``vqgan evaluate`` command writes: metrics.json and, per image, per_image.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_report(out: Path, payload: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write ``out/metrics.json`` (and ``out/per_image.csv`` when there are rows); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    written[0].write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    if rows:
        written.append(out / "per_image.csv")
        with open(written[1], "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return written


def parse_crop(text: str | None) -> tuple[int, int] | None:
    """``HxW`` in tokens -> (h, w)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"`crop`: expected HxW in tokens, e.g. 16x16, got {text!r}")
    return int(parts[0]), int(parts[1])
