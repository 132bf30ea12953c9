#!/usr/bin/env python
"""Sampling speed and memory: cached vs plain decoding, blockwise vs per-token sliding windows.

    python benchmarks/sampling.py [--preset quickstart|issue] [--quick] [--threads T]
                                  [--per-token-positions N] [--skip-memory]

(a) tokens/s drawing 256 tokens (start-token conditioning) at batch 1 and 8, with the key/value
    cache and with a full forward per token (the reference's plain loop).
(b) one segmentation-conditioned 1280x832 sample (f8: a 160x104 token grid): seconds for the
    blockwise window and for the per-token window. The per-token scheme costs the same full
    window forward at every position, so it is timed on its first N positions and extrapolated
    to the whole grid; the output says so. Then the peak memory (RSS of a fresh process) of
    blockwise sampling at 1280x832 and at 2560x1664.

Presets: ``quickstart`` is recipes/quickstart_prior.yaml's shape (4 layers, 4 heads, 256 wide,
8x8-token crop, 8 labels, 256 codes); ``issue`` the issue's comparison model (8 layers, 8 heads,
256 wide, 16x16-token crop, block 512). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.sampling import SamplingOptions, make_generators, sample_sequence
from vqgan_cli.window import Conditioning, sample_blockwise, sample_per_token

PRESETS = {  # layers, heads, width, crop side (tokens), image vocab, labels
    "quickstart": (4, 4, 256, 8, 256, 8),
    "issue": (8, 8, 256, 16, 1024, 182),
}
FACTOR = 8


def build(preset: str, block: int) -> GPT:
    layers, heads, width, _, vocab, _ = PRESETS[preset]
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads,
                         n_embd=width)).eval()


def bench_cache(preset: str, n_tokens: int) -> None:
    gpt = build(preset, n_tokens)
    opts = SamplingOptions(top_k=100)
    print(f"(a) {n_tokens} tokens after a start token, preset {preset}")
    for batch in (1, 8):
        cond = torch.zeros(batch, 1, dtype=torch.long)
        row = []
        for cached in (True, False):
            t0 = time.perf_counter()
            out = sample_sequence(gpt, cond, n_tokens, opts, make_generators(list(range(batch))),
                                  cached=cached)
            dt = time.perf_counter() - t0
            row.append((dt, out))
        same = torch.equal(row[0][1], row[1][1])
        print(f"    batch {batch}: cached {row[0][0]:6.2f} s ({batch * n_tokens / row[0][0]:7.1f} tok/s)"
              f" | uncached {row[1][0]:6.2f} s ({batch * n_tokens / row[1][0]:7.1f} tok/s)"
              f" | speed-up {row[1][0] / row[0][0]:4.1f}x | identical tokens: {same}")


def seg_problem(preset: str, width: int,
                height: int) -> tuple[GPT, Conditioning, torch.Tensor, tuple[int, int]]:
    """A labels-conditioned prior and a built-in landscape's label grid at the given size."""
    from vqgan_cli.data.landscapes import render_landscape

    crop = PRESETS[preset][3]
    gpt = build(preset, 2 * crop * crop - 1)
    h, w = height // FACTOR, width // FACTOR
    # the scene rendered directly at token resolution (one label per f x f cell): the same kind
    # of map, without the full-size render's memory peak muddying the measurement
    labels = render_landscape(3, h, w).labels
    grid = torch.from_numpy(labels.astype("int64"))[None]
    return gpt, Conditioning(grid=grid), torch.zeros(1, h, w, dtype=torch.long), (crop, crop)


def bench_window(preset: str, positions: int) -> None:
    gpt, cond, init, crop = seg_problem(preset, 1280, 832)
    _, h, w = init.shape
    opts = SamplingOptions(top_k=100)
    print(f"(b) 1280x832 segmentation-conditioned sample: {w}x{h} tokens, crop {crop[1]}x{crop[0]} "
          f"tokens, preset {preset}")
    def per_token_subset() -> float:
        t0 = time.perf_counter()
        sample_per_token(gpt, cond, init, crop, opts, make_generators([0]), limit=positions)
        return time.perf_counter() - t0

    first = per_token_subset()  # timed before and after the blockwise runs (load drifts)
    times = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        sample_blockwise(gpt, cond, init, crop, opts, make_generators([0]), precision=precision)
        times[precision] = time.perf_counter() - t0
    block_s = times["fp32"]
    part = (first + per_token_subset()) / 2
    per_token_s = part / positions * h * w
    for precision, t in times.items():
        print(f"    blockwise {precision} (cached, wavefront batches): {t:7.1f} s "
              f"({h * w / t:.0f} tokens/s, {1000 * t / (h * w):.2f} ms/token)")
    print(f"    per-token (reference placement): EXTRAPOLATED from {positions} of {h * w} positions "
          f"timed ({part:.1f} s, mean of a run before and one after the blockwise runs; "
          f"{1000 * part / positions:.1f} ms per window forward): "
          f"{per_token_s:7.1f} s for the whole grid")
    print(f"    blockwise is {per_token_s / block_s:.0f}x faster in fp32 ({per_token_s / times['bf16']:.0f}x "
          f"in bf16); cost per output token = {block_s / (h * w) / (part / positions):.1%} of a "
          f"full-window forward (fp32)")


def _child(preset: str, width: int, height: int) -> None:
    """Run in a fresh process: print RSS before sampling and the peak after, in MiB."""
    gpt, cond, init, crop = seg_problem(preset, width, height)
    with open("/proc/self/statm") as fh:  # resident pages now (ru_maxrss is a lifetime peak)
        before = int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    t0 = time.perf_counter()
    sample_blockwise(gpt, cond, init, crop, SamplingOptions(top_k=100), make_generators([0]))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before": before, "peak": peak, "seconds": dt}))


def bench_memory(preset: str, threads: int | None) -> None:
    print("    peak memory of blockwise sampling (fresh process each; sampling only, decoding "
          "excluded: decode_tiles bounds that by its tile):")
    res = {}
    for width, height in ((1280, 832), (2560, 1664)):
        cmd = [sys.executable, __file__, "--child", f"{width}x{height}", "--preset", preset]
        if threads:
            cmd += ["--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        res[width] = r
        print(f"      {width}x{height}: peak RSS {r['peak']:7.1f} MiB (process before sampling "
              f"{r['before']:6.1f} MiB, +{r['peak'] - r['before']:.1f} MiB while sampling), "
              f"{r['seconds']:.1f} s")
    a, b = res[1280], res[2560]
    print(f"      ratio 2560x1664 / 1280x832: peak {b['peak'] / a['peak']:.2f}x, "
          f"sampling increment {(b['peak'] - b['before']) / max(a['peak'] - a['before'], 1e-9):.2f}x "
          f"(image has 4x the tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    ap.add_argument("--quick", action="store_true", help="64 tokens in (a), 20 positions in (b)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, loaded CPU more threads spin and "
                         "slow single-token steps down many times)")
    ap.add_argument("--per-token-positions", type=int, default=60)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--only", choices=("a", "b"), default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        w, h = map(int, args.child.split("x"))
        _child(args.preset, w, h)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on CPU")
    if args.only in (None, "a"):
        bench_cache(args.preset, 64 if args.quick else 256)
    if args.only in (None, "b"):
        bench_window(args.preset, 20 if args.quick else args.per_token_positions)
        if not args.skip_memory:
            bench_memory(args.preset, args.threads)


if __name__ == "__main__":
    main()
