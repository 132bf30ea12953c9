#!/usr/bin/env python
"""Training tokens/s of the prior (GPT forward + cross-entropy + backward + AdamW), as ratios.

    python benchmarks/prior_step.py [--quick] [--steps N] [--batch B] [--compile]

The model is the quickstart prior's size (``recipes/quickstart_prior.yaml``: its model section,
with the quickstart shards' shape: 256 codes, 8x8 tokens conditioned on an 8x8 label grid, so
127 input tokens). In the same process, interleaved round by round, it times:

- ``reference``: a plain eager fp32 GPT in minGPT style (explicit q k^T, masked_fill with the
  causal mask buffer, softmax, att @ v), loaded with the very same weights as ours;
- ours (the step of ``vqgan_cli/train/prior.py``: ``Prior.training_sequences`` + forward through
  ``F.scaled_dot_product_attention``) in eager fp32 and with bf16 autocast; ``--compile`` adds
  bf16 + ``torch.compile``.

Tokens/s counts every input position (batch x 127) per optimiser step. The median of
``--steps`` timed steps after warm-up is reported; every ratio is reference time / variant time
from this run. The token batch is fixed and synthetic: data loading is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from vqgan_cli.config import load_recipe
from vqgan_cli.models.gpt import GPTConfig, param_groups
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig
from vqgan_cli.train.prior import PriorRecipe

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "recipes" / "quickstart_prior.yaml"
VOCAB, GRID, N_LABELS = 256, (8, 8), 8  # the quickstart shards: 256 codes, 64x64 px at f8


# ---- the baseline: minGPT as the reference release has it ----------------------------------------


class RefAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.key, self.query, self.value, self.proj = (nn.Linear(C, C) for _ in range(4))
        self.n_head = cfg.n_head
        self.register_buffer("mask", torch.tril(torch.ones(cfg.block_size, cfg.block_size))
                             .view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = self.query(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class RefBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = RefAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RefGPT(nn.Module):
    """minGPT's GPT with the same parameter names as ours, so one state dict fits both."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[RefBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, :idx.shape[1]])
        return self.head(self.ln_f(self.blocks(x)))


# ---- steps ---------------------------------------------------------------------------------------


def quickstart_prior() -> Prior:
    """The quickstart prior's GPT on the quickstart shards' shape."""
    m = load_recipe(PriorRecipe, QUICKSTART).model
    n = GRID[0] * GRID[1]
    gpt = GPTConfig(vocab_size=VOCAB, block_size=2 * n - 1, n_layer=m.n_layer, n_head=m.n_head,
                    n_embd=m.n_embd)
    cond = CondConfig(kind="labels", n_labels=N_LABELS, label_factor=8)
    return Prior(PriorConfig(gpt=gpt, cond=cond, grid=GRID, pkeep=m.pkeep, image_vocab=VOCAB))


def make_step(model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              amp: contextlib.AbstractContextManager,
              fused: bool = True) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One optimiser step; ours uses the loop's fused AdamW, the baseline minGPT's default one."""
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95), fused=fused)

    def step(c: torch.Tensor, z: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with amp:
            logits = fn(c, z)  # (B, Lz, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), z.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def variants(prior: Prior, compile_: bool) -> dict[str, Callable]:
    ref = RefGPT(prior.config.gpt)
    ref.load_state_dict(prior.gpt.state_dict())
    n_cond = GRID[0] * GRID[1]

    def ref_fn(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ref(torch.cat((c, z.reshape(z.shape[0], -1)), 1)[:, :-1])[:, n_cond - 1:]

    def ours(model: Prior) -> Callable:
        def fn(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            seq = model.training_sequences(c, z)
            return model(seq.cond, seq.image)
        return fn

    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    out = {"reference fp32 (minGPT eager)": make_step(ref, ref_fn, contextlib.nullcontext(), fused=False)}
    fp32, b16 = copy.deepcopy(prior), copy.deepcopy(prior)
    out["ours fp32 (SDPA)"] = make_step(fp32, ours(fp32), contextlib.nullcontext())
    out["ours bf16 autocast"] = make_step(b16, ours(b16), bf16)
    if compile_:
        comp = copy.deepcopy(prior)
        compiled = torch.compile(comp)

        def comp_fn(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            seq = comp.training_sequences(c, z)
            return compiled(seq.cond, seq.image)
        out["ours bf16 + torch.compile"] = make_step(comp, comp_fn, bf16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed steps, batch 2: checks that it runs")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time bf16 + torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup, args.batch = 2, 1, 2
    torch.manual_seed(0)
    prior = quickstart_prior().train()
    prior.config.pkeep = 1.0  # identical inputs for every variant: no token corruption
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, N_LABELS, (args.batch, GRID[0] * GRID[1]), generator=g)
    z = torch.randint(0, VOCAB, (args.batch, *GRID), generator=g)
    steps = variants(prior, args.compile)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn(c, z)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):  # interleaved: load changes on a shared machine hit every variant
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn(c, z)
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
