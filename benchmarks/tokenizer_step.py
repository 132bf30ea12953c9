#!/usr/bin/env python
"""Images/s of one full VQGAN training step (autoencoder + discriminator, LPIPS on), as ratios.

    python benchmarks/tokenizer_step.py [--quick] [--steps N] [--configs quickstart,f8,f16]

For each model configuration it times, in the same process and interleaved round by round:

- ``reference``: ``reference_vqgan.py``, plain eager fp32 NCHW in the reference's style (q/k/v
  1x1 convs + bmm attention, the autoencoder run twice per step);
- our step: the shipped ``TokenizerStage`` of ``vqgan_cli/train/tokenizer.py``, ``stage.step`` +
  ``stage.apply`` as the training engine calls them (one autoencoder forward, the discriminator
  step on the detached reconstruction, the non-finite check before each backward), as eager fp32
  NCHW, channels_last, bf16 autocast (NCHW and channels_last), and bf16 + ``torch.compile``
  (``compile_cl``, with channels_last too, runs when named in ``--variants``).

Each variant's warm-up steps are excluded; the time reported is the median of ``--steps`` steps,
and every ratio is reference time / variant time from this same run. The batch is a fixed
synthetic tensor: data loading is not timed. LPIPS uses a RANDOM VGG16 trunk (no download);
it costs exactly what the real one costs, but its values mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import reference_vqgan as ref  # sibling scripts: benchmarks/ is on sys.path when they run
import torch
from machine import default_precisions, load_average, machine_info, machine_line
from step_timing import Result, describe_error, table

import vqgan_cli.models.lpips as perceptual
from vqgan_cli.config import load_recipe
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.runtime import Runtime
from vqgan_cli.train.config import TrainConfig
from vqgan_cli.train.engine import wrap
from vqgan_cli.train.losses import LossConfig
from vqgan_cli.train.optim import learning_rate
from vqgan_cli.train.tokenizer import TokenizerRecipe, TokenizerStage

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "recipes" / "quickstart.yaml"
CONFIGS = ("quickstart", "f8", "f16")
CPU = Runtime(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass
class Bench:
    """One model configuration at its training size."""

    name: str
    model: TokenizerConfig
    loss: LossConfig
    batch: int
    size: int
    base_lr: float
    note: str


def quickstart_bench(path: Path = QUICKSTART) -> Bench:
    """The quickstart recipe's model, loss and batch, with LPIPS and the discriminator switched on."""
    recipe = load_recipe(TokenizerRecipe, path)
    # The recipe trains without LPIPS (no VGG16 weights on a fresh machine) and turns the
    # discriminator on at step 1500; the benchmark times the full step, so both are on.
    loss = replace(recipe.loss, perceptual_weight=recipe.loss.perceptual_weight or 1.0,
                   lpips_backbone=perceptual.RANDOM_BACKBONE, disc_start=0)
    ae, t = recipe.model.autoencoder, recipe.train
    return Bench("quickstart", recipe.model, loss, t.batch_size, recipe.data.size, t.base_lr,
                 f"{path.name}: ch {ae.ch}, ch_mult {tuple(ae.ch_mult)}, {ae.num_res_blocks} res block(s), "
                 f"disc ndf {loss.disc_ndf}; LPIPS + discriminator forced on; the recipe itself trains "
                 f"with {t.precision}, channels_last {str(t.channels_last).lower()}, "
                 f"compile {str(t.compile).lower()}")


def scale_bench(name: str, ch_mult: tuple[int, ...]) -> Bench:
    """ch 64, released defaults otherwise (2 res blocks, attention at 16, z 256, 1024 codes), 64x64."""
    ae = AutoencoderConfig(ch=64, ch_mult=ch_mult, resolution=64)
    model = TokenizerConfig(autoencoder=ae, quantizer=QuantizerConfig())
    loss = LossConfig(lpips_backbone=perceptual.RANDOM_BACKBONE, disc_start=0)
    return Bench(name, model, loss, 8, 64, 4.5e-6,
                 f"ch 64, ch_mult {ch_mult}, 2 res blocks, attn at 16, z/embed 256, 1024 codes, "
                 f"disc ndf 64 x 3 layers")


def get_bench(name: str) -> Bench:
    if name == "quickstart":
        return quickstart_bench()
    if name == "f8":
        return scale_bench("f8", (1, 2, 2, 4))
    if name == "f16":
        return scale_bench("f16", (1, 1, 2, 2, 4))
    raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    reference: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False


VARIANTS = (
    Variant("reference", "reference-style eager fp32 NCHW, AE x2", reference=True),
    Variant("eager", "ours eager fp32 NCHW"),
    Variant("cl", "ours fp32 channels_last", channels_last=True),
    Variant("bf16", "ours bf16 autocast NCHW", precision="bf16"),
    Variant("bf16_cl", "ours bf16 autocast + channels_last", precision="bf16", channels_last=True),
    Variant("compile", "ours bf16 autocast NCHW + torch.compile", precision="bf16", compile=True),
    Variant("compile_cl", "ours bf16 + channels_last + torch.compile", precision="bf16", channels_last=True,
            compile=True),
    Variant("compile_fp32", "ours fp32 NCHW + torch.compile", compile=True),
    Variant("compile_fp32_cl", "ours fp32 channels_last + torch.compile", channels_last=True, compile=True),
)
# bf16 rows only where the CPU computes bf16 natively: emulated, a bf16 step takes ~10x an fp32 one
DEFAULT_VARIANTS = (("reference", "eager", "cl", "bf16", "bf16_cl", "compile") if "bf16" in default_precisions()
                    else ("reference", "eager", "cl", "compile_fp32", "compile_fp32_cl"))


# ---------------------------------------------------------------------------------------------
# The two training steps


@contextlib.contextmanager
def shared_lpips(module: torch.nn.Module) -> Iterator[None]:
    """Make ``TokenizerLoss`` take a copy of one prebuilt LPIPS instead of building VGG16 again.

    Building the network costs about a second; a copy also gives every variant identical weights.
    """
    original = perceptual.build_lpips
    perceptual.build_lpips = lambda backbone=perceptual.TORCHVISION_BACKBONE: copy.deepcopy(module)
    try:
        yield
    finally:
        perceptual.build_lpips = original


class OursStep:
    """The shipped stage, one process, accumulate 1: ``stage.step`` then, when finite,
    ``stage.apply``, exactly as the training engine calls them."""

    def __init__(self, bench: Bench, variant: Variant, lpips: torch.nn.Module, seed: int):
        train = TrainConfig(batch_size=bench.batch, base_lr=bench.base_lr, precision=variant.precision,
                            channels_last=variant.channels_last, compile=variant.compile)
        recipe = TokenizerRecipe(model=bench.model, loss=bench.loss, train=train)
        torch.manual_seed(seed)  # every variant starts from the same weights
        with shared_lpips(lpips), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "cuda" GradScaler on a CPU: disabled, as in training
            self.stage = TokenizerStage(recipe, CPU)
        self.stage.attach(wrap(self.stage.model, CPU, variant.compile))
        self.model, self.disc = self.stage.model, self.stage.disc
        self.step_count = 0

    def __call__(self, batch: torch.Tensor) -> dict:
        out = self.stage.step(iter([{"image": batch}]), self.step_count)
        if out.finite:
            self.stage.apply(self.step_count)
        self.step_count += 1
        return {**out.logs, "finite": out.finite}


def reference_model(cfg: TokenizerConfig) -> ref.VQModel:
    ae, q = cfg.autoencoder, cfg.quantizer
    if q.kind != "vq" or q.codebook_dim or q.l2_normalize or q.ema:
        raise ValueError("the reference-style model has the plain VQ codebook only")
    return ref.VQModel(ch=ae.ch, ch_mult=tuple(ae.ch_mult), num_res_blocks=ae.num_res_blocks,
                       attn_resolutions=tuple(ae.attn_resolutions), in_channels=ae.in_channels,
                       out_channels=ae.out_channels, resolution=ae.resolution, z_channels=ae.z_channels,
                       n_embed=q.n_embed, embed_dim=q.embed_dim, dropout=ae.dropout, beta=q.beta,
                       legacy=q.beta_form == "legacy", norm=ae.norm)


def reference_loss(cfg: LossConfig, in_channels: int,
                   lpips: torch.nn.Module | None) -> ref.VQLPIPSWithDiscriminator:
    return ref.VQLPIPSWithDiscriminator(
        lpips if cfg.perceptual_weight > 0 else None, disc_start=cfg.disc_start,
        codebook_weight=cfg.codebook_weight, perceptual_weight=cfg.perceptual_weight,
        disc_in_channels=in_channels, disc_num_layers=cfg.disc_num_layers, disc_ndf=cfg.disc_ndf,
        disc_factor=cfg.disc_factor, disc_weight=cfg.disc_weight, disc_loss=cfg.disc_loss)


class ReferenceStep:
    """``reference_vqgan.reference_train_step`` with the weights of ``like`` (our eager model)."""

    def __init__(self, bench: Bench, lpips: torch.nn.Module, like: OursStep):
        self.model = reference_model(bench.model)
        self.loss = reference_loss(bench.loss, bench.model.autoencoder.in_channels, copy.deepcopy(lpips))
        self.model.load_state_dict(like.model.state_dict(), strict=True)
        self.loss.discriminator.load_state_dict(like.disc.state_dict(), strict=True)
        lr = learning_rate(bench.base_lr, bench.batch, 1, 1)
        self.opt_ae = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        self.step_count = 0

    def __call__(self, batch: torch.Tensor) -> dict:
        g, d = ref.reference_train_step(self.model, self.loss, self.opt_ae, self.opt_d, batch,
                                        self.step_count)
        self.step_count += 1
        return {"loss": g, "d_loss": d}


@torch.no_grad()
def reconstruction_gap(ours: OursStep, reference: ReferenceStep, batch: torch.Tensor) -> float:
    """max |x_hat_ours - x_hat_reference| in eval mode, fp32, from the same (untrained) weights."""
    ours.model.eval()
    reference.model.eval()
    try:
        a = ours.model(batch).x_hat
        b, _ = reference.model(batch)
    finally:
        ours.model.train()
        reference.model.train()
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# Timing


def run_config(bench: Bench, variants: list[Variant], steps: int, warmup: int, compile_warmup: int,
               seed: int, log: Callable[[str], None]) -> tuple[list[Result], float]:
    """Build every variant, check the reference against ours, then time them round-robin."""
    # A fresh compiler cache per config: the model classes' code objects are shared between
    # configs, and shapes seen for an earlier config would make dynamo recompile this one with
    # dynamic shapes, which a training run (one config per process) never does.
    torch._dynamo.reset()
    torch.manual_seed(seed)
    lpips = perceptual.build_lpips(perceptual.RANDOM_BACKBONE)
    gen = torch.Generator().manual_seed(seed)
    batch = torch.rand(bench.batch, bench.model.autoencoder.in_channels, bench.size, bench.size,
                       generator=gen) * 2 - 1

    runners: dict[str, Callable[[torch.Tensor], dict]] = {}
    results: dict[str, Result] = {v.key: Result(bench.name, v.key, v.label) for v in variants}
    ours_eager = OursStep(bench, Variant("eager", "ours eager fp32 NCHW"), lpips, seed)
    reference = ReferenceStep(bench, lpips, ours_eager)
    gap = reconstruction_gap(ours_eager, reference, batch)
    for v in variants:
        if v.reference:
            runners[v.key] = reference
        elif v.key == "eager":
            runners[v.key] = ours_eager
        else:
            try:
                runners[v.key] = OursStep(bench, v, lpips, seed)
            except Exception as e:  # noqa: BLE001 - report, don't crash the whole benchmark
                results[v.key].error = describe_error(e)

    def one(key: str, timed: bool) -> None:
        res = results[key]
        if res.error is not None:
            return
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            logs = runners[key](batch)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on this machine
            res.error = describe_error(e)
            log(f"  {bench.name}/{key}: failed ({res.error})")
            return
        if logs.get("finite") is False or not all(math.isfinite(float(val)) for val in logs.values()):
            log(f"  {bench.name}/{key}: non-finite loss in this step ({logs})")
        if timed:
            res.times.append(dt)
            res.cpu_times.append(cpu)
        else:
            res.warmup_s.append(dt)

    keys = [v.key for v in variants]
    for v in variants:  # warm-up, one variant after the other (compilation happens here)
        n = compile_warmup if v.compile else warmup
        if v.compile:
            torch._dynamo.utils.counters.clear()
        for _ in range(n):
            one(v.key, timed=False)
        if results[v.key].warmup_s:
            log(f"  {bench.name}/{v.key}: warm-up {', '.join(f'{t:.2f}' for t in results[v.key].warmup_s)} s")
        if v.compile and results[v.key].error is None:
            breaks = torch._dynamo.utils.counters["graph_break"]
            shown = "; ".join(f"{reason.splitlines()[0][:90]} (x{k})" for reason, k in breaks.most_common(2))
            tail = f": {shown}" if shown else ""
            log(f"  {bench.name}/{v.key}: {sum(breaks.values())} graph break(s){tail}")
    for r in range(steps):  # timed steps, interleaved so that drift hits every variant alike
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            one(key, timed=True)
    return [results[k] for k in keys], gap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 2, 1 warm-up + 2 timed steps, no torch.compile "
                        "(numbers mean little)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per variant (default 10; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per variant (default 2; --quick: 1)")
    p.add_argument("--compile-warmup", type=int, default=3, help="warm-up steps of the torch.compile variant")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--variants", default=None,
                   help="comma-separated, from " + ", ".join(v.key for v in VARIANTS)
                        + f" (default: {','.join(DEFAULT_VARIANTS)}; the reference is always run)")
    p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if steps < 1 or warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    wanted = [v.strip() for v in args.variants.split(",")] if args.variants else list(DEFAULT_VARIANTS)
    unknown = set(wanted) - {v.key for v in VARIANTS}
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}")
    variants = [v for v in VARIANTS if v.reference or v.key in wanted]
    if args.quick:
        variants = [v for v in variants if not v.compile]
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("vqgan_cli.models.lpips").setLevel(logging.ERROR)  # the random-trunk warning: said below
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings: counted and summarised instead
    batch = args.batch if args.batch is not None else (2 if args.quick else None)

    benches = {}
    for name in names:
        b = get_bench(name)
        benches[name] = replace(b, batch=batch) if batch else b

    print("VQGAN tokenizer training step")
    print(machine_line(), "(other busy processes on this machine distort timings)")
    print("s/step: median wall-clock seconds; vs reference: reference s/step / variant s/step; "
          "cpu s/step: median process CPU seconds (all threads)")
    print(f"median of {steps} timed step(s) after {warmup} warm-up step(s) "
          f"({args.compile_warmup} for torch.compile); variants interleaved round by round")
    print("a step = autoencoder + discriminator update, L1 + LPIPS + VQ + adaptive-weight GAN loss; "
          "synthetic batch, no data loading")
    print("LPIPS: RANDOM VGG16 trunk (vqgan_cli.models.lpips.build_lpips('random')): same cost as the "
          "real one, its values mean nothing")
    if args.quick:
        print("--quick: batch 2, no torch.compile: a smoke run, not a measurement")
    for b in benches.values():
        print(f"  {b.name}: {b.size}x{b.size}, batch {b.batch}; {b.note}")
    print(flush=True)

    all_results: list[Result] = []
    for name, bench in benches.items():
        print(f"[{name}] building and warming up ...", flush=True)
        results, gap = run_config(bench, variants, steps, warmup, args.compile_warmup, args.seed,
                                  lambda s: print(s, flush=True))
        print(f"  {name}: reference-style vs ours, same weights, eval fp32: max |x_hat diff| = {gap:.2e}",
              flush=True)
        all_results += results

    print()
    print(f"load average after: {load_average()}")
    print(table(all_results, {name: b.batch for name, b in benches.items()}))
    failed = [r for r in all_results if r.error]
    for r in failed:
        print(f"note: {r.config}/{r.variant} failed: {r.error}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine_info(),
            "steps": steps, "warmup": warmup, "quick": args.quick,
            "results": [{"config": r.config, "variant": r.variant, "label": r.label,
                         "batch": benches[r.config].batch, "times_s": r.times, "cpu_s": r.cpu_times,
                         "warmup_s": r.warmup_s,
                         "median_s": r.median, "error": r.error} for r in all_results],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
