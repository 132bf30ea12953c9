#!/usr/bin/env python
"""Training tokens/s of the prior (GPT forward + cross-entropy + backward + AdamW), as ratios.

    python benchmarks/prior_step.py [--quick] [--steps N] [--batch B] [--compile]

The model is the quickstart prior's size (``recipes/quickstart_prior.yaml``: its model section,
with the quickstart shards' shape: 256 codes, 8x8 tokens conditioned on an 8x8 label grid, so
127 input tokens). In the same process, interleaved round by round, it times:

- ``reference``: a plain eager fp32 GPT in minGPT style (``reference_gpt.py``: explicit q k^T,
  masked_fill with the causal mask buffer, softmax, att @ v), loaded with the very same weights as
  ours, stepped by minGPT's default (unfused) AdamW;
- ours: the shipped ``PriorStage`` of ``vqgan_cli/train/prior.py``, ``stage.step`` +
  ``stage.apply`` as the training engine calls them (``Prior.training_sequences``, the forward
  through ``F.scaled_dot_product_attention``, ``token_nll``, fused AdamW with the recipe's
  schedule and gradient clipping), in eager fp32 and, where the CPU computes bf16 natively (or
  with ``--bf16``), with bf16 autocast; ``--compile`` adds ``torch.compile`` at the precision
  ``auto`` picks on this machine.

Tokens/s counts every input position (batch x 127) per optimiser step. The median of
``--steps`` timed steps after warm-up is reported; every ratio is reference time / variant time
from this run. The token batch is fixed and synthetic: data loading is not timed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from machine import default_precisions, machine_line  # a sibling script: benchmarks/ is on sys.path when they run
from reference_gpt import reference_model  # a sibling script: benchmarks/ is on sys.path when they run

from vqgan_cli.config import load_recipe
from vqgan_cli.models.gpt import GPTConfig, param_groups
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig, token_nll
from vqgan_cli.runtime import Runtime
from vqgan_cli.train.engine import wrap
from vqgan_cli.train.prior import PriorRecipe, PriorStage

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "recipes" / "quickstart_prior.yaml"
VOCAB, GRID, N_LABELS = 256, (8, 8), 8  # the quickstart shards: 256 codes, 64x64 px at f8
CPU = Runtime(torch.device("cpu"))


def quickstart_prior(recipe: PriorRecipe) -> Prior:
    """The quickstart prior's GPT on the quickstart shards' shape."""
    m = recipe.model
    n = GRID[0] * GRID[1]
    gpt = GPTConfig(vocab_size=VOCAB, block_size=2 * n - 1, n_layer=m.n_layer, n_head=m.n_head,
                    n_embd=m.n_embd)
    cond = CondConfig(kind="labels", n_labels=N_LABELS, label_factor=8)
    return Prior(PriorConfig(gpt=gpt, cond=cond, grid=GRID, pkeep=m.pkeep, image_vocab=VOCAB))


Step = Callable[[dict], float]


def reference_step(prior: Prior) -> Step:
    """minGPT's forward on ``prior``'s weights, the same loss, minGPT's default (unfused) AdamW."""
    ref = reference_model(prior.gpt)
    opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=1e-4, betas=(0.9, 0.95), fused=False)
    n_cond = GRID[0] * GRID[1]

    def step(batch: dict) -> float:
        c, z = batch["cond"].reshape(len(batch["keys"]), -1), batch["tokens"].reshape(len(batch["keys"]), -1)
        opt.zero_grad(set_to_none=True)
        logits = ref(torch.cat((c, z), 1)[:, :-1])[:, n_cond - 1:]  # (B, Lz, V)
        loss = token_nll(logits, z)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def our_step(prior: Prior, recipe: PriorRecipe, precision: str, compile_: bool = False) -> Step:
    """The shipped stage: ``step`` then, when finite, ``apply``, as the engine calls them."""
    recipe = replace(recipe, train=replace(recipe.train, precision=precision, compile=compile_))
    stage = PriorStage(recipe, prior, CPU)
    stage.attach(wrap(prior, CPU, compile_))
    steps = itertools.count()

    def step(batch: dict) -> float:
        n = next(steps)
        out = stage.step(iter([batch]), n)
        if out.finite:
            stage.apply(n)
        return out.logs.get("loss", float("nan"))

    return step


def variants(prior: Prior, recipe: PriorRecipe, compile_: bool, precisions: list[str]) -> dict[str, Step]:
    out = {"reference fp32 (minGPT eager)": reference_step(prior),
           "ours fp32 (SDPA)": our_step(copy.deepcopy(prior), recipe, "fp32")}
    if "bf16" in precisions:
        out["ours bf16 autocast"] = our_step(copy.deepcopy(prior), recipe, "bf16")
    if compile_:
        auto = precisions[-1]
        out[f"ours {auto} + torch.compile"] = our_step(copy.deepcopy(prior), recipe, auto, compile_=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed steps, batch 2: checks that it runs")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (at auto's precision)")
    ap.add_argument("--bf16", action="store_true",
                    help="time bf16 autocast also where this CPU emulates it (about 10x slower than fp32 there)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    if args.quick:
        args.steps, args.warmup, args.batch = 2, 1, 2
    recipe = load_recipe(PriorRecipe, QUICKSTART)
    recipe = replace(recipe, train=replace(recipe.train, batch_size=args.batch))
    torch.manual_seed(0)
    prior = quickstart_prior(recipe).train()
    prior.config.pkeep = 1.0  # identical inputs for every variant: no token corruption
    g = torch.Generator().manual_seed(0)
    batch = {"keys": [str(i) for i in range(args.batch)],
             "cond": torch.randint(0, N_LABELS, (args.batch, *GRID), generator=g),
             "tokens": torch.randint(0, VOCAB, (args.batch, *GRID), generator=g)}
    precisions = default_precisions()
    if args.bf16 and "bf16" not in precisions:
        precisions.append("bf16")
    steps = variants(prior, recipe, args.compile, precisions)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn(batch)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):  # interleaved: load changes on a shared machine hit every variant
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn(batch)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * prior.config.gpt.block_size
    cfg = prior.config.gpt
    print(f"prior step, quickstart size: {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, "
          f"{prior.gpt.num_params():,} parameters; batch {args.batch} x {cfg.block_size} tokens; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    base = statistics.median(times[next(iter(times))])
    print(f"{'variant':32s} {'median s':>9s} {'tokens/s':>10s} {'vs reference':>13s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:32s} {med:9.4f} {tokens / med:10.0f} {base / med:12.2f}x")


if __name__ == "__main__":
    main()
