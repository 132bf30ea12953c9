#!/usr/bin/env python
"""Seconds per 1280x832 image at the size of the released S-FLCKR prior: what a user of the
official weights wants to know before starting.

    python benchmarks/release_size.py [--exact-tokens N] [--fast-bands N] [--device cpu|cuda]
                                      [--precision fp32|bf16] [--threads T] [--full]

The transformer of the release (PAPER.md): 24 layers, 16 heads, 1024 wide, 1024 image codes,
a 16x16-token crop after 256 conditioning tokens (block 512), f16 tokens: a 1280x832 image is an
80x52 grid, 4,160 tokens. Random weights (speed does not depend on them), a built-in landscape's
labels as the conditioning grid.

Where the whole image would take too long (the CPU), only interior rows are sampled: every other
position is given as known (``known``, the completion path), so the timed tokens use the
windows and cache of the image's middle, and the time is EXTRAPOLATED to 52 rows (rows near the
top are cheaper: their windows are shorter; the figure is an upper estimate). ``--exact-tokens``
tokens in the middle of an interior row for ``exact`` (a window forward each), ``--fast-bands``
whole bands of 8 rows for ``fast``. ``--full`` samples the whole image with both. Each scheme runs in a fresh process,
which reports its peak resident memory (VmHWM) and, on CUDA, the peak allocated GPU memory.
The last line is ``RESULTS {json}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from machine import machine_info, machine_line  # sibling script

from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.sample.conditioning import Conditioning
from vqgan_cli.sample.schedule import max_rows
from vqgan_cli.sample.tokens import SamplingOptions, make_generators
from vqgan_cli.sample.window import sample_window

GRID = (52, 80)  # 832 x 1280 pixels at f16
CROP = (16, 16)
CODES = 1024


def release_gpt(device: str) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=CODES, block_size=512, n_layer=24, n_head=16, n_embd=1024)
    return GPT(cfg).eval().to(device)


def todo_mask(first: int, tokens: int) -> torch.Tensor:
    """Known everywhere except ``tokens`` positions in raster order from row ``first``, column
    ``W//2 - tokens//2`` when less than a row (the middle of an interior row), else whole rows."""
    known = torch.ones(GRID, dtype=torch.bool)
    start = first * GRID[1] + (max(GRID[1] // 2 - tokens // 2, 0) if tokens < GRID[1] else 0)
    known.view(-1)[start:start + tokens] = False
    return known


def child(mode: str, tokens: int | None, device: str, precision: str) -> None:
    """One scheme in this fresh process; prints its JSON line."""
    gpt = release_gpt(device)
    H, W = GRID
    labels = torch.from_numpy(render_landscape(3, H, W).labels.astype("int64"))[None].to(device)
    cond = Conditioning(grid=labels % CODES)
    init = torch.zeros(1, H, W, dtype=torch.long, device=device)
    # an interior stretch: whole fast bands start at multiples of 8 rows; 24 is in the middle
    known = None if tokens is None else todo_mask(24, tokens).to(device)
    sampled = H * W if known is None else int((~known).sum())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sample_window(gpt, cond, init, CROP, SamplingOptions(top_k=100), make_generators([0]), known=known,
                  mode=mode, precision=precision, memory_mib=4096)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    print(json.dumps({"mode": mode, "seconds": dt, "sampled": sampled, "peak_rss_mib": peak,
                      "gpu_peak_mib": gpu_peak}))


def run(mode: str, tokens: int | None, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--precision", args.precision,
           "--threads", str(args.threads)]
    if tokens is not None:
        cmd += ["--tokens", str(tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    total = GRID[0] * GRID[1]
    r["image_seconds"] = r["seconds"] * total / r["sampled"]
    r["extrapolated"] = r["sampled"] < total
    how = (f"EXTRAPOLATED from {r['sampled']} interior tokens ({r['sampled'] / GRID[1]:g} rows) in "
           f"{r['seconds']:.1f} s" if r["extrapolated"] else "the whole image, timed")
    gpu = "" if r["gpu_peak_mib"] is None else f", peak GPU memory {r['gpu_peak_mib']:.0f} MiB"
    print(f"  {mode:5s}: {r['image_seconds']:8.1f} s per 1280x832 image ({how}); peak RSS "
          f"{r['peak_rss_mib']:.0f} MiB{gpu}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact-tokens", type=int, default=16,
                    help="interior tokens sampled with exact (a window forward each)")
    ap.add_argument("--fast-bands", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="sample the whole image with both schemes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.tokens, args.device, args.precision)
        return
    print(machine_line(), flush=True)
    print(f"release-size prior (24 layers, 16 heads, 1024 wide, {CODES} codes, 16x16 crop, 256 "
          f"conditioning tokens), random weights, one 1280x832 image (80x52 tokens), "
          f"{args.device}, {args.precision}, top-k 100:", flush=True)
    results = {"machine": machine_info(), "device": args.device, "precision": args.precision}
    results["exact"] = run("exact", None if args.full else args.exact_tokens, args)
    results["fast"] = run("fast", None if args.full else args.fast_bands * max_rows(CROP) * GRID[1], args)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
