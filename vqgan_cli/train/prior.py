"""Stage two: train the transformer prior on token shards, from a recipe.

The loop is the stage-one loop's twin and shares its machinery (run folder, resumable batch
stream, DDP and autocast helpers, atomic step checkpoints, non-finite guard, signals, metrics,
progress). What differs: one optimiser (AdamW, betas (0.9, 0.95), decay on Linear weights
only), an optional warm-up + cosine schedule, and losses reported in nats and bits per token.
The model's shape comes from the shards' manifest (see :mod:`vqgan_cli.train.prior_data`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from vqgan_cli import runtime as R
from vqgan_cli.checkpoints.load import save_prior
from vqgan_cli.config import ConfigError, spec, to_dict
from vqgan_cli.console import TrainProgress, console
from vqgan_cli.models.gpt import GPTConfig, param_groups
from vqgan_cli.models.permuter import PERMUTERS
from vqgan_cli.models.prior import Prior, PriorConfig
from vqgan_cli.train.checkpointing import CheckpointManager, checkpoint_size
from vqgan_cli.train.config import TrainConfig
from vqgan_cli.train.loggers import RunLog, draw_curves
from vqgan_cli.train.loop import (
    BatchStream,
    DataPosition,
    NonFiniteGuard,
    accumulate_logs,
    due,
    gather_rng,
    learning_rate,
    optimizer_step,
    prepare_run_dir,
    report_end,
    restore_rng,
    scheduled_lr,
)
from vqgan_cli.train.prior_data import (
    RECIPE_CONDS,
    PriorData,
    ShardDataConfig,
    build_split,
    check_batch,
    collate_tokens,
    cond_input,
    resolve_data,
    unigram_entropy,
)
from vqgan_cli.train.prior_samples import SampleGrids
from vqgan_cli.train.signals import StopRequest

LN2 = math.log(2.0)


@dataclass
class PriorModelConfig:
    """The GPT's size and the training-time behaviour of the prior; vocabulary and block size
    are not here: they follow from the shards."""

    n_layer: int = spec(24, ge=1)
    n_head: int = spec(16, ge=1)
    n_embd: int = spec(1024, ge=1)
    embd_pdrop: float = spec(0.0, ge=0.0, lt=1.0)
    resid_pdrop: float = spec(0.0, ge=0.0, lt=1.0)
    attn_pdrop: float = spec(0.0, ge=0.0, lt=1.0)
    cond: str = spec("unconditional", choices=RECIPE_CONDS,
                     help="unconditional (start token) | class (shard labels) | spatial (shard cond grids)")
    sos_token: int = spec(0, ge=0, help="unconditional: the start token (shares the image vocabulary)")
    cond_dropout: float = spec(0.0, ge=0.0, lt=1.0,
                               help="replace a sample's conditioning by a null token "
                                    "(classifier-free guidance)")
    pkeep: float = spec(1.0, ge=0.0, le=1.0, help="keep each input image token with this probability")
    permuter: str = spec("identity", choices=tuple(PERMUTERS), help="token reading order")

    def check(self) -> list[str]:
        if self.n_embd % self.n_head:
            return [f"n_embd: must be a multiple of n_head ({self.n_head}), got {self.n_embd}"]
        return []


@dataclass
class OptimConfig:
    """AdamW as the reference trains its transformers, plus a schedule (the reference has none)."""

    weight_decay: float = spec(0.01, ge=0.0, help="on Linear weights only")
    betas: tuple[float, ...] = spec(default_factory=lambda: (0.9, 0.95))
    warmup_steps: int = spec(0, ge=0, help="linear warm-up from 0 to the full lr")
    schedule: str = spec("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = spec(0.1, ge=0.0, le=1.0, help="cosine: final lr as a share of the peak")

    def check(self) -> list[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            return [f"betas: expected two values in [0, 1), got {list(self.betas)}"]
        return []


@dataclass
class PriorRecipe:
    """A stage-two recipe: the prior's size (model), its token shards (data), how to train."""

    name: str | None = spec(None, help="run name; default: the recipe file's stem")
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: ShardDataConfig = field(default_factory=ShardDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class PriorTrainResult(NamedTuple):
    run_dir: Path
    prior: Path
    steps: int
    seconds: float
    val: dict
    nonfinite: int
    stopped_by_signal: int | None  # exit code when a signal ended the run early


def prior_config(recipe: PriorRecipe, data: PriorData) -> PriorConfig:
    """The PriorConfig the recipe and the shards define together."""
    m = recipe.model
    h, w = data.grid
    n_cond = h * w if data.cond.spatial else 1
    gpt = GPTConfig(vocab_size=data.vocab_size, block_size=n_cond + h * w - 1, n_layer=m.n_layer,
                    n_head=m.n_head, n_embd=m.n_embd, embd_pdrop=m.embd_pdrop,
                    resid_pdrop=m.resid_pdrop, attn_pdrop=m.attn_pdrop)
    return PriorConfig(gpt=gpt, cond=data.cond, grid=(h, w), permuter=m.permuter, pkeep=m.pkeep,
                       image_vocab=data.image_vocab, cond_dropout=m.cond_dropout)


def build_prior(recipe: PriorRecipe, data: PriorData) -> Prior:
    """A freshly initialised prior; a spatial conditioning VQGAN comes in frozen with its weights."""
    prior = Prior(prior_config(recipe, data), cond_tokenizer=data.cond_tokenizer)
    if prior.cond_tokenizer is not None:
        prior.cond_tokenizer.eval().requires_grad_(False)
    return prior


@torch.no_grad()
def evaluate_prior(prior: Prior, batches: list[tuple[torch.Tensor, torch.Tensor]], amp) -> dict:  # noqa: ANN001
    """Validation loss (nats and bits per image token) and next-token accuracy, eval mode."""
    was = prior.training
    prior.eval()
    total, correct, n = 0.0, 0, 0
    for c, z in batches:
        seq = prior.training_sequences(c, z)
        with amp:
            logits = prior(seq.cond, seq.image).float()  # (B, Lz, V)
        total += float(F.cross_entropy(logits.flatten(0, 1), seq.targets.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == seq.targets).sum())
        n += seq.targets.numel()
    prior.train(was)
    loss = total / max(n, 1)
    return {"loss": loss, "bits_per_token": loss / LN2, "accuracy": correct / max(n, 1), "tokens": n}


def _val_batches(recipe: PriorRecipe, data: PriorData, cond, device: torch.device) -> list:  # noqa: ANN001
    ds = build_split(data, recipe.data, validation=True, seed=recipe.train.seed,
                     with_cond=data.cond.spatial)
    loader = torch.utils.data.DataLoader(ds, batch_size=recipe.train.batch_size, collate_fn=collate_tokens,
                                         num_workers=0,
                                         generator=torch.Generator().manual_seed(0))  # spare the global RNG
    out = []
    for batch in loader:
        if len(out) >= recipe.train.val_batches:
            break
        out.append((cond_input(batch, cond).to(device), batch["tokens"].to(device)))
    return out


def _check_resume(path: Path, cfg: PriorConfig) -> None:
    from vqgan_cli.checkpoints.format import read_weights

    saved, now = read_weights(path).config, to_dict(cfg)
    if saved != now:
        diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        raise ConfigError([f"{k}: the run's checkpoint {path.name} has {saved.get(k)!r}, the shards now "
                           f"give {now.get(k)!r}" for k in diff] +
                          ["the shards changed under this run: pass --overwrite or use a new train.out_dir"])


def train_prior(recipe: PriorRecipe, run_name: str, overwrite: bool = False) -> PriorTrainResult:
    """Train (or resume) the prior run of ``recipe``; returns where its weights are."""
    cfg, ocfg = recipe.train, recipe.optim
    data = resolve_data(recipe.data, recipe.model.cond, recipe.model.sos_token, recipe.model.cond_dropout,
                        cfg.batch_size)
    rt = R.setup_runtime(cfg.device, cfg.threads)
    run_dir = Path(cfg.out_dir or f"runs/{recipe.name or run_name}")
    prepare_run_dir(run_dir, to_dict(recipe), overwrite, rt)
    R.barrier(rt)

    R.seed_everything(cfg.seed)  # identical initial weights on every rank
    prior = build_prior(recipe, data).to(rt.device)
    pcfg = prior.config
    peak = learning_rate(cfg.base_lr, cfg.batch_size, cfg.accumulate, rt.world_size)
    # fused: one kernel for all parameters instead of ~10 per tensor (same maths)
    opt = torch.optim.AdamW(param_groups(prior.gpt, ocfg.weight_decay), lr=peak, betas=tuple(ocfg.betas),
                            fused=rt.device.type in ("cpu", "cuda"))
    ckpts = CheckpointManager(run_dir, cfg.keep_last)
    if rt.is_main:
        ckpts.check_space(*checkpoint_size(prior, [opt]))  # warn before work when the disk is short
    metrics = RunLog(run_dir, cfg.loggers, enabled=rt.is_main)
    step, position, guard = 0, DataPosition(), NonFiniteGuard(cfg.max_nonfinite)
    latest = ckpts.latest()
    if latest is not None:
        from vqgan_cli.checkpoints.format import read_weights

        _check_resume(latest.weights, pcfg)
        prior.load_state_dict(read_weights(latest.weights).state_dict)
        state = ckpts.load(latest)
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        position = DataPosition(int(state["epoch"]), int(state["batch"]))
        guard = NonFiniteGuard(cfg.max_nonfinite, int(state["nonfinite"]), int(state["nonfinite_in_a_row"]))
        restore_rng(state["rng"], rt)
        metrics.truncate_after(step)
        if rt.is_main:
            console.print(f"[green]resuming[/] {run_dir} from step {step} ({latest.weights.name})")
    else:
        R.seed_everything(cfg.seed + 1000 * rt.rank)  # per-rank randomness (pkeep, dropout) from here on

    core = prior
    train_model: torch.nn.Module = prior
    if rt.distributed:
        train_model = DistributedDataParallel(
            prior, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            broadcast_buffers=False)
    if cfg.compile:
        train_model = torch.compile(train_model, dynamic=False)  # static shapes: symbolic ones broke Inductor here

    dataset = build_split(data, recipe.data, validation=False, seed=cfg.seed, with_cond=data.cond.spatial)
    stream = BatchStream(dataset, cfg.batch_size, recipe.data.workers, cfg.seed, rt, collate_tokens, position)
    val_inputs = _val_batches(recipe, data, pcfg.cond, rt.device) if rt.is_main else []
    unigram = unigram_entropy([z for _, z in val_inputs], pcfg.n_image_tokens) if val_inputs else float("nan")
    amp = R.autocast(rt, cfg.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    stop = StopRequest()
    samples = SampleGrids(data.info.get("tokenizer"), rt.device, seed=cfg.seed) \
        if rt.is_main and "tensorboard" in cfg.loggers and val_inputs else None
    seq_len = pcfg.gpt.block_size
    info = {**data.info, "grid": list(pcfg.grid), "run": str(run_dir)}
    if rt.is_main:
        console.print(f"[bold]{run_dir}[/]: {prior.gpt.num_params():,} GPT parameters, "
                      f"vocab {pcfg.gpt.vocab_size}, "
                      f"window {pcfg.grid[0]}x{pcfg.grid[1]} ({seq_len} tokens), cond {pcfg.cond.kind}, "
                      f"{data.manifest.num_samples} samples; lr {peak:.3g}, device {rt.device}, "
                      f"{cfg.precision}")
        if not val_inputs:
            console.print("[yellow]no validation samples: raise data.val_fraction or give data.val[/]")

    def save_checkpoint(at_step: int) -> None:
        rngs = gather_rng(rt)
        if not rt.is_main:
            return
        state = {"step": at_step, "epoch": stream.position.epoch, "batch": stream.position.batch,
                 "opt": opt.state_dict(), "rng": rngs, "nonfinite": guard.total,
                 "nonfinite_in_a_row": guard.in_a_row}
        ckpts.save(at_step, state, lambda p: save_prior(p, core, {**info, "step": at_step}))

    start_time, start_step = time.perf_counter(), step
    val_result: dict = {}
    window = {"t": time.perf_counter(), "step": step}
    stopped: int | None = None
    shown: tuple[float, str] = (0.0, "")
    try:
        with TrainProgress(cfg.max_steps, step, f"train-prior {run_dir.name}", rt.is_main) as bar:
            while step < cfg.max_steps:
                if R.any_rank(stop.requested, rt):
                    stopped = stop.exit_code if stop.requested else 130
                    break
                prior.train()
                lr = scheduled_lr(step, peak, ocfg.warmup_steps, cfg.max_steps, ocfg.schedule,
                                  ocfg.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                finite, logs = True, {}
                for micro in range(cfg.accumulate):
                    batch = stream.next()
                    check_batch(batch, pcfg.grid, pcfg.n_image_tokens, pcfg.gpt.vocab_size)
                    c = cond_input(batch, pcfg.cond).to(rt.device, non_blocking=True)
                    z = batch["tokens"].to(rt.device, non_blocking=True)
                    seq = core.training_sequences(c, z)
                    with R.maybe_no_sync(train_model, micro != cfg.accumulate - 1):
                        with amp:
                            logits = train_model(seq.cond, seq.image)  # (B, Lz, V)
                        loss = F.cross_entropy(logits.flatten(0, 1).float(), seq.targets.flatten())
                        finite = not R.any_rank(not bool(torch.isfinite(loss)), rt)
                        if not finite:
                            break
                        scaler.scale(loss / cfg.accumulate).backward()
                    accumulate_logs(logs, {"loss": loss}, cfg.accumulate)
                guard.record(finite, step)
                if finite:
                    norm = optimizer_step(opt, prior, scaler, cfg.grad_clip)
                    scaler.update()
                    if norm is not None:
                        logs["grad_norm"] = norm
                else:
                    opt.zero_grad(set_to_none=True)
                    bar.log(f"[red]non-finite loss at step {step}: step skipped "
                            f"({guard.in_a_row} in a row, {guard.total} in all)[/]")
                step += 1

                if due(step, cfg.log_every, cfg.max_steps):
                    now = time.perf_counter()
                    per_step = cfg.batch_size * cfg.accumulate * rt.world_size * seq_len
                    tokens = (step - window["step"]) * per_step
                    rate = tokens / max(now - window["t"], 1e-9)
                    window = {"t": now, "step": step}
                    loss_now = logs.get("loss", float("nan"))
                    metrics.write({"step": step, "split": "train", **logs, "bits_per_token": loss_now / LN2,
                                   "lr": lr, "tokens_per_s": rate, "epoch": stream.position.epoch,
                                   "nonfinite_steps": guard.total})
                    shown = (rate, f"loss {loss_now:.4f} ({loss_now / LN2:.3f} bits)")
                bar.update(step, shown[0], "tok", shown[1])
                if due(step, cfg.val_every, cfg.max_steps):
                    if rt.is_main and val_inputs:
                        val_result = evaluate_prior(core, val_inputs, amp)
                        val_result.update(unigram_entropy=unigram, unigram_bits=unigram / LN2)
                        metrics.write({"step": step, "split": "val", **val_result})
                        if samples is not None:
                            png = run_dir / "images" / f"samples_step_{step:07d}.png"
                            if samples.write(png, core, val_inputs) is not None:
                                metrics.image("samples", png, step)
                        bar.log(f"step {step} validation: loss {val_result['loss']:.4f} nats "
                                f"({val_result['bits_per_token']:.3f} bits/token; unigram entropy "
                                f"{unigram:.4f}), accuracy {val_result['accuracy']:.3f}")
                    R.barrier(rt)
                if due(step, cfg.ckpt_every, cfg.max_steps):
                    save_checkpoint(step)
        if stopped is not None:
            save_checkpoint(step)
    finally:
        metrics.close()
        stop.close()
        stream.close()
        R.shutdown(rt)

    final = run_dir / "prior.safetensors"
    if rt.is_main and stopped is None:
        save_prior(final, core, {**info, "step": step, "val": val_result})
    seconds = time.perf_counter() - start_time
    if rt.is_main:
        draw_curves(run_dir)
        report_end("train-prior summary", run_dir, step, start_step, seconds, guard.total, stopped,
                   {"prior": str(final) if stopped is None else "(not final)",
                    "tokenizer": str(info["tokenizer"])}, val_result)
    return PriorTrainResult(run_dir, final, step, seconds, val_result, guard.total, stopped)
