#!/usr/bin/env python
"""Images/s of one full VQGAN training step (autoencoder + discriminator, LPIPS on), as ratios.

    python benchmarks/tokenizer_step.py [--quick] [--steps N] [--configs quickstart,f8,f16]

For each model configuration it times, in the same process and interleaved round by round:

- ``reference``: ``reference_vqgan.py``, plain eager fp32 NCHW in the reference's style (q/k/v
  1x1 convs + bmm attention, the autoencoder run twice per step);
- our step (the body of the loop in ``vqgan_cli/train/tokenizer.py``: one autoencoder forward,
  the discriminator step on the detached reconstruction) as eager fp32 NCHW, channels_last,
  bf16 autocast (NCHW and channels_last), and bf16 + ``torch.compile`` (``compile_cl``, with
  channels_last too, runs when named in ``--variants``).

Each variant's warm-up steps are excluded; the time reported is the median of ``--steps`` steps,
and every ratio is reference time / variant time from this same run. The batch is a fixed
synthetic tensor: data loading is not timed. LPIPS uses a RANDOM VGG16 trunk (no download);
it costs exactly what the real one costs, but its values mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import vqgan_cli.models.lpips as perceptual
from vqgan_cli import runtime as R
from vqgan_cli.config import load_recipe
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.train.loop import accumulate_logs as _accumulate
from vqgan_cli.train.loop import learning_rate
from vqgan_cli.train.loop import optimizer_step as _optimizer_step
from vqgan_cli.train.losses import LossConfig, TokenizerLoss
from vqgan_cli.train.tokenizer import TokenizerRecipe

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "recipes" / "quickstart.yaml"
CONFIGS = ("quickstart", "f8", "f16")


def _load_reference():
    """``reference_vqgan.py`` beside this file (benchmarks/ is not a package)."""
    name = "reference_vqgan"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


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
)
DEFAULT_VARIANTS = ("reference", "eager", "cl", "bf16", "bf16_cl", "compile")


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
    """The body of ``train_tokenizer``'s loop for one process, accumulate 1 (same calls, same order)."""

    def __init__(self, bench: Bench, variant: Variant, lpips: torch.nn.Module, seed: int):
        torch.manual_seed(seed)  # every variant starts from the same weights
        self.variant = variant
        self.model = VQGAN(bench.model)
        with shared_lpips(lpips):
            self.loss_fn = TokenizerLoss(bench.loss, bench.model.modality,
                                         bench.model.autoencoder.in_channels)
        if variant.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.loss_fn.to(memory_format=torch.channels_last)
        lr = learning_rate(bench.base_lr, bench.batch, 1, 1)
        self.opt_ae = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                       betas=(0.5, 0.9))
        self.disc = self.loss_fn.discriminator
        self.opt_d = (torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.9))
                      if self.disc is not None else None)
        self.train_model: torch.nn.Module = torch.compile(self.model) if variant.compile else self.model
        self.amp = R.autocast(R.Runtime(torch.device("cpu")), variant.precision)
        with warnings.catch_warnings():  # "cuda" scaler on a CPU machine: disabled, as in the loop
            warnings.simplefilter("ignore")
            self.scaler = torch.amp.GradScaler("cuda", enabled=variant.precision == "fp16")
        self.step_count = 0

    def __call__(self, batch: torch.Tensor) -> dict:
        model, core, loss_fn, disc, amp, scaler = (self.model, self.model, self.loss_fn, self.disc,
                                                   self.amp, self.scaler)
        step = self.step_count
        model.train()
        core.set_step(step)
        disc_factor = loss_fn.disc_factor_at(step)
        use_disc = loss_fn.uses_discriminator and disc_factor > 0
        self.opt_ae.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        logs: dict = {}
        x = batch
        if self.variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            out = self.train_model(x)
            gl = loss_fn.generator_loss(x, out.x_hat, out.q_loss, step, core.last_layer)
        finite = bool(torch.isfinite(gl.total))
        scaler.scale(gl.total).backward()
        if use_disc:
            with amp:
                dl = loss_fn.discriminator_loss(x, out.x_hat.detach(), step)
            finite = finite and bool(torch.isfinite(dl.total))
            scaler.scale(dl.total).backward()
            _accumulate(logs, {"d_loss": dl.total, "logits_real": dl.logits_real,
                               "logits_fake": dl.logits_fake}, 1)
        _accumulate(logs, {"loss": gl.total, "nll": gl.nll, "rec": gl.rec, "perceptual": gl.perceptual,
                           "g_loss": gl.g_loss, "adaptive_weight": gl.adaptive_weight,
                           "q_loss": gl.q_loss, "perplexity": out.perplexity}, 1)
        if finite:
            _optimizer_step(self.opt_ae, model, scaler, None)
            if use_disc:
                _optimizer_step(self.opt_d, disc, scaler, None)
            scaler.update()
        self.step_count += 1
        logs["finite"] = finite
        return logs


def reference_model(cfg: TokenizerConfig) -> ref.VQModel:
    ae, q = cfg.autoencoder, cfg.quantizer
    if q.kind != "vq" or q.codebook_dim or q.l2_normalize or q.ema:
        raise ValueError("the reference-style model has the plain VQ codebook only")
    return ref.VQModel(ch=ae.ch, ch_mult=tuple(ae.ch_mult), num_res_blocks=ae.num_res_blocks,
                       attn_resolutions=tuple(ae.attn_resolutions), in_channels=ae.in_channels,
                       out_channels=ae.out_channels, resolution=ae.resolution, z_channels=ae.z_channels,
                       n_embed=q.n_embed, embed_dim=q.embed_dim, dropout=ae.dropout, beta=q.beta,
                       legacy=q.beta_form == "legacy")


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


@dataclass
class Result:
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


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:160] if text else type(e).__name__


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
                results[v.key].error = _describe(e)

    def one(key: str, timed: bool) -> None:
        res = results[key]
        if res.error is not None:
            return
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            logs = runners[key](batch)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on this machine
            res.error = _describe(e)
            log(f"  {bench.name}/{key}: failed ({res.error})")
            return
        if not all(bool(torch.isfinite(torch.tensor(float(val)))) for val in logs.values()):
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


# ---------------------------------------------------------------------------------------------
# Report


def table(results: list[Result], benches: dict[str, Bench]) -> str:
    rows = [("config", "batch", "variant", "s/step", "images/s", "vs reference", "cpu s/step")]
    for res in results:
        bench = benches[res.config]
        base = next((r.median for r in results if r.config == res.config and r.variant == "reference"), None)
        if res.error is not None:
            rows.append((res.config, str(bench.batch), res.label, "failed", "-", "n/a (see below)", "-"))
            continue
        m = res.median
        ratio = f"{base / m:.2f}x" if base and m else "n/a"
        rows.append((res.config, str(bench.batch), res.label, f"{m:.3f}", f"{bench.batch / m:.1f}", ratio,
                     f"{res.cpu_median:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


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

    print(f"VQGAN tokenizer training step: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{cpu_name()}, CPU")
    print(f"load average before: {_load()} (other busy processes on this machine distort timings)")
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
    print(f"load average after: {_load()}")
    print(table(all_results, benches))
    failed = [r for r in all_results if r.error]
    for r in failed:
        print(f"note: {r.config}/{r.variant} failed: {r.error}")
    if args.json:
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "steps": steps, "warmup": warmup, "quick": args.quick,
            "results": [{"config": r.config, "variant": r.variant, "label": r.label,
                         "batch": benches[r.config].batch, "times_s": r.times, "cpu_s": r.cpu_times,
                         "warmup_s": r.warmup_s,
                         "median_s": r.median, "error": r.error} for r in all_results],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
