#!/usr/bin/env python
"""Sampling speed: our cached decoding against the reference's, and the sliding-window schemes
against the reference's window loop. Every ratio is measured within this one run.

    python benchmarks/sampling.py [--preset quickstart|issue] [--quick] [--threads T]
                                  [--band-rows N | --full] [--fast-table] [--skip-memory]

(a) 256 tokens after a start token at batch 1 and 8: ours (``sample_sequence``: preallocated
    key/value cache, fused query/key/value projection, functional decoding step) against a
    reference-style cached sampler: the reference's ``sample_with_past`` written here over
    minGPT's ``forward_with_past`` (``reference_gpt.py``; each step concatenates the list of past
    keys/values with ``torch.cat`` and attends with explicit matmuls and softmax; top-k by
    boolean-mask assignment as ``transformers.top_k_top_p_filtering``), loaded with the very same
    weights; and the plain loop (a full forward per token). One untimed run of each first. Then
    one profiled run of ours: its time inside matrix-product and attention kernels, and the
    bound that puts on the ratio to the reference style (``product_seconds``).
(b) a labels-conditioned 1280x832 sample (f8: a 160x104 token grid, 8x8-token crop, 64
    conditioning tokens per window) with a random-weight prior:
    - the reference loop (``window.sample_sequential``: a full window forward per token at
      batch 1) on the first ``--band-rows`` rows of the grid, timed once before and once after
      the batched schemes (the machine's load drifts) and EXTRAPOLATED to the whole grid: every
      position costs the same full-window forward, so time scales with the number of positions
      (``--full``: time the whole grid, 16,640 forwards, about 4-6 minutes in fp32);
    - ``--window exact`` and ``--window fast`` on the whole grid;
    at equal precision: fp32, and bf16 autocast where the CPU computes bf16 natively (``--bf16``
    adds it elsewhere, where it is emulated and about 10x slower). The reference loop and ``exact`` must draw the
    same tokens on the rows both computed (fp32); the script checks it.
    ``--fast-table``: ``fast``'s speed over segment lengths and band heights.
    Then the peak memory (RSS of a fresh process) of ``fast`` at 1280x832 and 2560x1664.

Presets: ``quickstart`` is recipes/quickstart_prior.yaml's shape (4 layers, 4 heads, 256 wide,
8x8-token crop, 8 labels, 256 codes); ``issue`` a larger model (8 layers, 8 heads, 256 wide,
16x16-token crop, block 511). Weights are random: speed does not depend on them. The last line
is ``RESULTS {json}`` with every number printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial

import torch
from machine import default_precisions, machine_info, machine_line  # sibling script
from reference_gpt import RefGPT, reference_model  # a sibling script: benchmarks/ is on sys.path
from torch.nn import functional as F

from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.sample.tokens import SamplingOptions, make_generators, sample_sequence
from vqgan_cli.sample.window import (
    Conditioning,
    max_rows,
    max_segment,
    plan_windows,
    precision_context,
    sample_sequential,
    sample_window,
)

PRESETS = {  # layers, heads, width, crop side (tokens), image vocab, labels
    "quickstart": (4, 4, 256, 8, 256, 8),
    "issue": (8, 8, 256, 16, 1024, 182),
}
FACTOR = 8
RESULTS: dict = {}
PRECISIONS = default_precisions()  # fp32, and bf16 where this CPU computes it natively (or --bf16)


def build(preset: str, block: int) -> GPT:
    layers, heads, width, _, vocab, _ = PRESETS[preset]
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads,
                         n_embd=width)).eval()


# ---- (a) the reference's cached sampling: minGPT forward_with_past (reference_gpt.py) + sample_with_past


def reference_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The reference's top-k (``transformers.top_k_top_p_filtering`` with top_p 1): the logits
    below the k-th largest set to -inf by boolean-mask assignment, in place."""
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    logits[remove] = float("-inf")
    return logits


@torch.no_grad()
def sample_with_past(x: torch.Tensor, model: RefGPT, steps: int, opts: SamplingOptions,
                     generator: torch.Generator) -> torch.Tensor:
    """The reference's loop: ``past`` is a list of every step's presents, concatenated whole
    (torch.cat along the sequence) at every step; logits / temperature, its top-k, softmax,
    multinomial."""
    sample, cond_len, past = x, x.shape[1], None
    for n in range(steps):
        cat = torch.cat(past, dim=-2) if past is not None else None
        logits, present = model.forward_with_past(x, past=cat, past_length=n + cond_len - 1)
        past = [present] if past is None else past + [present]
        probs = F.softmax(reference_filter(logits[:, -1, :] / opts.temperature, opts.top_k), dim=-1)
        x = torch.multinomial(probs, num_samples=1, generator=generator)
        sample = torch.cat((sample, x), dim=1)
    return sample[:, cond_len:]


def _timed(fn) -> tuple[float, object]:  # noqa: ANN001
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


PRODUCT_KERNELS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def product_seconds(fn) -> float:  # noqa: ANN001
    """Seconds ``fn`` spends inside matrix-product and attention kernels (profiler self time).
    Both samplers compute these products for the same shapes; what a faster sampler can remove
    is the rest, so the reference's time over this one bounds the ratio any eager sampler of the
    same arithmetic can reach."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_KERNELS) / 1e6


def bench_cache(preset: str, n_tokens: int) -> None:
    gpt = build(preset, n_tokens)
    ref = reference_model(gpt)
    opts = SamplingOptions(top_k=100)
    print(f"(a) {n_tokens} tokens after a start token, preset {preset}; seconds (tokens/s)")
    RESULTS["cache"] = {}
    for precision in PRECISIONS:
        for batch in (1, 8):
            cond = torch.zeros(batch, 1, dtype=torch.long)
            gens = list(range(batch))

            def ref_run(cond: torch.Tensor = cond) -> object:
                return sample_with_past(cond, ref, n_tokens, opts, torch.Generator().manual_seed(0))

            def ours(cond: torch.Tensor = cond, gens: list[int] = gens, cached: bool = True,
                     compiled: bool = False) -> object:
                return sample_sequence(gpt, cond, n_tokens, opts, make_generators(gens), cached=cached,
                                       compiled=compiled)

            # both models under the same precision; interleaved, so load drifts hit both alike;
            # one untimed run of each first (kernel set-up, allocator; compilation, timed apart)
            with precision_context(gpt, precision), precision_context(ref, precision):
                ref_run(), ours()
                warm, _ = _timed(lambda: ours(compiled=True))
                first = [_timed(f)[0] for f in (ref_run, ours, lambda: ours(compiled=True))]
                p, _ = _timed(lambda: ours(cached=False))  # noqa: B023 - called right here
                second = [_timed(f)[0] for f in (ref_run, ours, lambda: ours(compiled=True))]
                products = product_seconds(lambda: ours(compiled=True))
            r, o, c = ((a + b) / 2 for a, b in zip(first, second, strict=True))
            n = batch * n_tokens
            print(f"    {precision} batch {batch}: compiled {c:6.2f} s ({n / c:7.1f}) | eager {o:6.2f} s "
                  f"({n / o:7.1f}) | reference-style cached {r:6.2f} s ({n / r:7.1f}) | plain loop {p:6.2f} s "
                  f"({n / p:7.1f}) | compiled/reference {r / c:4.2f}x, eager/reference {r / o:4.2f}x, "
                  f"compiled/plain {p / c:4.1f}x; first compiled run {warm:5.1f} s (compilation)")
            print(f"      compiled spends {products:5.2f} s ({products / c:3.0%}) in matrix products and "
                  f"attention kernels, which the reference computes too: with no other cost at all, "
                  f"ours/reference would be at most {r / products:4.2f}x")
            RESULTS["cache"][f"{precision}_b{batch}"] = {
                "compiled": c, "eager": o, "reference": r, "plain": p, "compile_seconds": warm - c,
                "ratio_reference": r / c, "ratio_reference_eager": r / o, "ratio_plain": p / c,
                "products": products, "bound": r / products}


# ---- (b) sliding windows -------------------------------------------------------------------------


def seg_problem(preset: str, width: int,
                height: int) -> tuple[GPT, Conditioning, torch.Tensor, tuple[int, int]]:
    """A labels-conditioned prior and a built-in landscape's label grid at the given size."""
    from vqgan_cli.data.landscapes import render_landscape

    crop = PRESETS[preset][3]
    gpt = build(preset, 2 * crop * crop - 1)
    h, w = height // FACTOR, width // FACTOR
    # the scene rendered directly at token resolution (one label per f x f cell)
    labels = render_landscape(3, h, w).labels
    grid = torch.from_numpy(labels.astype("int64"))[None]
    return gpt, Conditioning(grid=grid), torch.zeros(1, h, w, dtype=torch.long), (crop, crop)


class CountForwards:
    """Counts full forwards of a GPT (the reference loop calls ``gpt(seq)`` once per token)."""

    def __init__(self, gpt: GPT):
        self.n = 0
        self.handle = gpt.register_forward_hook(self)

    def __call__(self, *args) -> None:  # noqa: ANN002
        self.n += 1


def bench_window(preset: str, size: tuple[int, int], band_rows: int | None, fast_table: bool) -> None:
    gpt, cond, init, crop = seg_problem(preset, *size)
    _, h, w = init.shape
    opts = SamplingOptions(top_k=100)
    n_pos = h * w
    full = band_rows is None or band_rows >= h
    rows = h if full else band_rows
    seg = max_segment(crop)
    exact_plan = plan_windows((h, w), crop)
    fast_plan = plan_windows((h, w), crop, None, seg, max_rows(crop))
    print(f"(b) {size[0]}x{size[1]} labels-conditioned sample: {w}x{h} tokens, crop {crop[1]}x{crop[0]}, "
          f"preset {preset}, one image")
    print(f"    schedule: exact {exact_plan.n_steps} steps of window forwards for {n_pos} tokens; fast "
          f"(segment {seg}, rows {max_rows(crop)}) {fast_plan.n_steps} steps of "
          f"{len({u.tile for u in fast_plan.units})} cached windows")
    res: dict = {"grid": [h, w], "crop": list(crop), "positions": n_pos, "timed_rows": rows,
                 "exact_steps": exact_plan.n_steps, "fast_steps": fast_plan.n_steps, "segment": seg}

    def reference(precision: str) -> tuple[float, torch.Tensor, int]:
        counter = CountForwards(gpt)
        with precision_context(gpt, precision):
            t, out = _timed(lambda: sample_sequential(gpt, cond, init, crop, opts, make_generators([0]),
                                                      limit=None if full else rows * w))
        counter.handle.remove()
        return t, out, counter.n

    for precision in PRECISIONS:
        t_ref1, ref_tokens, forwards = reference(precision)
        t_exact, exact_tokens = _timed(partial(sample_window, gpt, cond, init, crop, opts, make_generators([0]),
                                               mode="exact", precision=precision))
        t_fast, _ = _timed(partial(sample_window, gpt, cond, init, crop, opts, make_generators([0]),
                                   mode="fast", precision=precision))
        t_ref2 = t_ref1 if full else reference(precision)[0]
        part = (t_ref1 + t_ref2) / 2
        t_ref = part * n_pos / (rows * w)
        same = bool(torch.equal(ref_tokens[:, :rows], exact_tokens[:, :rows]))
        what = ("the whole grid, timed" if full else
                f"EXTRAPOLATED from its first {rows} rows ({forwards} window forwards, {part:.1f} s: mean "
                f"of a run before and one after the batched runs; {1000 * part / forwards:.1f} ms each)")
        print(f"    {precision}: reference loop {t_ref:7.1f} s for the whole grid, {what}")
        check = (f"tokens identical to the loop's on the {rows} rows both drew: {same}" if precision == "fp32"
                 else "(bf16 rounding differs between batch shapes: tokens not compared)")
        print(f"    {precision}: exact {t_exact:7.1f} s ({n_pos / t_exact:.0f} tokens/s) = "
              f"{t_ref / t_exact:.2f}x the reference loop; {check}")
        print(f"    {precision}: fast  {t_fast:7.1f} s ({n_pos / t_fast:.0f} tokens/s) = "
              f"{t_ref / t_fast:.1f}x the reference loop, {t_exact / t_fast:.1f}x exact")
        res[precision] = {"reference": t_ref, "reference_part": part, "forwards": forwards,
                          "exact": t_exact, "fast": t_fast, "exact_ratio": t_ref / t_exact,
                          "fast_ratio": t_ref / t_fast, "identical": same}
    RESULTS["window"] = res
    if fast_table:
        bench_fast_table(gpt, cond, init, crop, opts, res)


def bench_fast_table(gpt: GPT, cond: Conditioning, init: torch.Tensor, crop: tuple[int, int],
                     opts: SamplingOptions, res: dict) -> None:
    print("    fast over segment length x band height (seconds, one image):")
    print("    | segment | rows | steps | windows | " + " | ".join(f"{p} s" for p in PRECISIONS) + " |")
    print("    |---|---|---|---|" + "---|" * len(PRECISIONS))
    table = []
    for seg in sorted({2, 3, 4, max_segment(crop)}):
        for rows in (1, max_rows(crop)):
            plan = plan_windows(init.shape[1:], crop, None, seg, rows)
            times = {}
            for precision in PRECISIONS:
                times[precision], _ = _timed(partial(
                    sample_window, gpt, cond, init, crop, opts, make_generators([0]), mode="fast",
                    segment=seg, rows=rows, precision=precision))
            tiles = len({u.tile for u in plan.units})
            print(f"    | {seg} | {rows} | {plan.n_steps} | {tiles} | "
                  + " | ".join(f"{times[p]:.1f}" for p in PRECISIONS) + " |")
            table.append({"segment": seg, "rows": rows, "steps": plan.n_steps, "windows": tiles, **times})
    res["fast_table"] = table


def _child(preset: str, width: int, height: int) -> None:
    """Run in a fresh process: print RSS before sampling and the peak after, in MiB."""
    gpt, cond, init, crop = seg_problem(preset, width, height)
    with open("/proc/self/statm") as fh:  # resident pages now (ru_maxrss is a lifetime peak)
        before = int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    t0 = time.perf_counter()
    sample_window(gpt, cond, init, crop, SamplingOptions(top_k=100), make_generators([0]), mode="fast",
                  precision=PRECISIONS[-1])
    dt = time.perf_counter() - t0
    # VmHWM: this process image's own peak (ru_maxrss would start from the parent's at fork)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    print(json.dumps({"before": before, "peak": peak, "seconds": dt}))


def bench_memory(preset: str, threads: int | None) -> None:
    print(f"    peak memory of fast sampling, {PRECISIONS[-1]} (fresh process each; sampling only):")
    res = {}
    for width, height in ((1280, 832), (2560, 1664)):
        cmd = [sys.executable, __file__, "--child", f"{width}x{height}", "--preset", preset]
        if threads:
            cmd += ["--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        res[f"{width}x{height}"] = r
        print(f"      {width}x{height}: peak RSS {r['peak']:7.1f} MiB (process before sampling "
              f"{r['before']:6.1f} MiB, +{r['peak'] - r['before']:.1f} MiB while sampling), "
              f"{r['seconds']:.1f} s")
    RESULTS["memory"] = res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 32 tokens in (a), a 256x192 image and 2 timed rows in (b)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, loaded CPU more threads spin and "
                         "slow single-token steps down many times)")
    ap.add_argument("--band-rows", type=int, default=4, help="rows of the reference loop timed")
    ap.add_argument("--full", action="store_true", help="time the reference loop on the whole grid")
    ap.add_argument("--fast-table", action="store_true", help="fast over segment lengths and band heights")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--only", choices=("a", "b"), default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="time bf16 also where this CPU emulates it (about 10x slower than fp32 there)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bf16 and "bf16" not in PRECISIONS:
        PRECISIONS.append("bf16")
    if args.child:
        w, h = map(int, args.child.split("x"))
        _child(args.preset, w, h)
        return
    print(machine_line(), flush=True)
    if args.only in (None, "a"):
        bench_cache(args.preset, 32 if args.quick else 256)
    if args.only in (None, "b"):
        size = (256, 192) if args.quick else (1280, 832)
        bench_window(args.preset, size, None if args.full else (2 if args.quick else args.band_rows),
                     args.fast_table)
        if not (args.skip_memory or args.quick):
            bench_memory(args.preset, args.threads)
    print(f"load average after: {open('/proc/loadavg').read().split()[0]}")
    RESULTS["precisions"], RESULTS["machine"] = PRECISIONS, machine_info()
    print("RESULTS " + json.dumps(RESULTS))


if __name__ == "__main__":
    main()
