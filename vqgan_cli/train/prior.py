"""Stage two: train the transformer prior on token shards, from a recipe.

The loop is :mod:`vqgan_cli.train.engine`'s; this module is the recipe, the model and its
optimiser, and the step body. What differs from stage one: one optimiser (AdamW, betas
(0.9, 0.95), decay on Linear weights only), an optional warm-up + cosine schedule, and losses
reported in nats and bits per token. The model's shape comes from the shards' manifest (see
:mod:`vqgan_cli.train.prior_data`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vqgan_cli import runtime as R
from vqgan_cli.checkpoints.format import read_weights
from vqgan_cli.checkpoints.load import save_prior
from vqgan_cli.config import ConfigError, spec, to_dict
from vqgan_cli.console import console
from vqgan_cli.models.gpt import GPTConfig, GPTSize, param_groups
from vqgan_cli.models.permuter import PERMUTERS
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig, token_nll
from vqgan_cli.runtime import Runtime, resolve_precision
from vqgan_cli.train.checkpointing import checkpoint_size
from vqgan_cli.train.config import ScheduleConfig, TrainConfig, betas_problems
from vqgan_cli.train.engine import StepOut, TrainLog, TrainState, accumulate_logs, all_finite, open_run, run
from vqgan_cli.train.loggers import RunLog
from vqgan_cli.train.optim import grad_scaler, learning_rate, optimizer_step, scheduled_lr
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
from vqgan_cli.train.signals import check_stop
from vqgan_cli.train.stream import BatchStream

LN2 = math.log(2.0)


@dataclass
class PriorModelConfig(GPTSize):
    """The GPT's size (the fields of :class:`GPTSize`, checked by it) and the training-time
    behaviour of the prior; vocabulary and block size are not here: they follow from the shards."""

    cond: str = spec("unconditional", choices=RECIPE_CONDS,
                     help="unconditional (start token) | class (shard labels) | spatial (shard cond grids)")
    sos_token: int = spec(0, ge=0, help="unconditional: the start token (shares the image vocabulary)")
    cond_dropout: float = spec(0.0, ge=0.0, lt=1.0,
                               help="replace a sample's conditioning by a null token "
                                    "(classifier-free guidance)")
    pkeep: float = spec(1.0, ge=0.0, le=1.0, help="keep each input image token with this probability")
    permuter: str = spec("identity", choices=tuple(PERMUTERS), help="token reading order")


@dataclass
class OptimConfig(ScheduleConfig):
    """AdamW as the reference trains its transformers, plus a schedule (the reference has none)."""

    weight_decay: float = spec(0.01, ge=0.0, help="on Linear weights only")
    betas: tuple[float, ...] = spec(default_factory=lambda: (0.9, 0.95))

    def check(self) -> list[str]:
        return betas_problems(self.betas)


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
def validate_prior(prior: Prior, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   amp: Any) -> dict[str, float]:  # noqa: ANN401 - an autocast or null context
    """Validation loss (nats and bits per image token) and next-token accuracy, eval mode; a
    signal stops it between batches (``Stopped``)."""
    was = prior.training
    prior.eval()
    total, correct, n = 0.0, 0, 0
    try:
        for c, z in batches:
            check_stop()
            seq = prior.training_sequences(c, z)
            with amp:
                logits = prior(seq.cond, seq.image).float()  # (B, Lz, V)
            total += float(token_nll(logits, seq.targets, reduction="sum"))
            correct += int((logits.argmax(-1) == seq.targets).sum())
            n += seq.targets.numel()
    finally:
        prior.train(was)
    loss = total / max(n, 1)
    return {"loss": loss, "bits_per_token": loss / LN2, "accuracy": correct / max(n, 1), "tokens": n}


def _val_batches(recipe: PriorRecipe, data: PriorData, cond: CondConfig,
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = build_split(data, recipe.data, validation=True, seed=recipe.train.seed, with_cond=data.cond.spatial)
    loader = torch.utils.data.DataLoader(ds, batch_size=recipe.train.batch_size, collate_fn=collate_tokens,
                                         num_workers=0,
                                         generator=torch.Generator().manual_seed(0))  # spare the global RNG
    out = []
    for batch in loader:
        if len(out) >= recipe.train.val_batches:
            break
        out.append((cond_input(batch, cond).to(device), batch["tokens"].to(device)))
    return out


class PriorStage:
    """The prior and its AdamW; ``data`` (the shards' description) is needed only for validation,
    the sample grids and the checkpoint's record of the shards: a benchmark passes None."""

    name = "train-prior"
    weights_name = "prior.safetensors"
    unit = "tok"

    def __init__(self, recipe: PriorRecipe, prior: Prior, rt: Runtime, data: PriorData | None = None):
        cfg, ocfg = self.cfg, self.ocfg = recipe.train, recipe.optim
        self.recipe, self.rt, self.data, self.model = recipe, rt, data, prior
        self.peak = learning_rate(cfg.base_lr, cfg.batch_size, cfg.accumulate, rt.world_size)
        self.lr = self.peak
        # fused: one kernel for all parameters instead of ~10 per tensor (same maths)
        self.opt = torch.optim.AdamW(param_groups(prior.gpt, ocfg.weight_decay), lr=self.peak,
                                     betas=tuple(ocfg.betas), fused=rt.device.type in ("cpu", "cuda"))
        self.precision = resolve_precision(cfg.precision, rt.device, key="train.precision")
        self.amp = R.autocast(rt.device, self.precision.name)
        self.scaler = grad_scaler(self.precision.name)
        self.items_per_step = cfg.batch_size * cfg.accumulate * rt.world_size * prior.config.gpt.block_size
        self.forward: nn.Module = prior
        self.log: RunLog | None = None
        self.run_dir = Path()
        self.info: dict = {}
        self.val_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.unigram = float("nan")
        self.samples: SampleGrids | None = None

    def checkpoint_size(self) -> tuple[int, int]:
        return checkpoint_size(self.model, [self.opt])

    def attach(self, forward: nn.Module, log: RunLog | None = None, run_dir: Path | None = None) -> None:
        self.forward = forward
        if log is None or run_dir is None or self.data is None:
            return
        pcfg, data = self.model.config, self.data
        self.log, self.run_dir = log, run_dir
        self.info = {**data.info, "grid": list(pcfg.grid), "run": str(run_dir)}
        if not self.rt.is_main:
            return
        self.val_inputs = _val_batches(self.recipe, data, pcfg.cond, self.rt.device)
        if self.val_inputs:
            self.unigram = unigram_entropy([z for _, z in self.val_inputs], pcfg.n_image_tokens)
        if "tensorboard" in self.cfg.loggers and self.val_inputs:
            with torch.random.fork_rng(devices=[]):  # building the tokenizer's modules draws from the
                # global RNG, after the resume restored it: a resumed run would then differ
                self.samples = SampleGrids(data.info.get("tokenizer"), self.rt.device, seed=self.cfg.seed)
        console.print(f"[bold]{run_dir}[/]: {self.model.gpt.num_params():,} GPT parameters, "
                      f"vocab {pcfg.gpt.vocab_size}, window {pcfg.grid[0]}x{pcfg.grid[1]} "
                      f"({pcfg.gpt.block_size} tokens), cond {pcfg.cond.kind}, {data.manifest.num_samples} "
                      f"samples; lr {self.peak:.3g}, device {self.rt.device}, {self.precision.name}")
        if not self.val_inputs:
            console.print("[yellow]no validation samples: raise data.val_fraction or give data.val[/]")

    def step(self, batches: Iterator[dict], step: int) -> StepOut:
        """Teacher-forced next-token loss over the micro-batches, at this step's learning rate."""
        cfg, ocfg, pcfg, rt = self.cfg, self.ocfg, self.model.config, self.rt
        self.model.train()
        self.lr = scheduled_lr(step, self.peak, ocfg.warmup_steps, cfg.max_steps, ocfg.schedule, ocfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.opt.zero_grad(set_to_none=True)
        finite, logs = True, {}
        for micro, batch in enumerate(batches):
            check_batch(batch, pcfg.grid, pcfg.n_image_tokens, pcfg.gpt.vocab_size)
            c = cond_input(batch, pcfg.cond).to(rt.device, non_blocking=True)
            z = batch["tokens"].to(rt.device, non_blocking=True)
            seq = self.model.training_sequences(c, z)
            with R.maybe_no_sync(self.forward, micro != cfg.accumulate - 1):
                with self.amp:
                    logits = self.forward(seq.cond, seq.image)  # (B, Lz, V)
                loss = token_nll(logits, seq.targets)
                finite = all_finite(loss, rt)
                if not finite:
                    break
                self.scaler.scale(loss / cfg.accumulate).backward()
            accumulate_logs(logs, {"loss": loss}, cfg.accumulate)
        return StepOut(finite, logs)

    def apply(self, step: int) -> dict[str, float]:
        norm = optimizer_step(self.opt, self.model, self.scaler, self.cfg.grad_clip)
        self.scaler.update()
        return {"grad_norm": norm} if norm is not None else {}

    def train_log(self, logs: dict[str, float], rate: float, state: TrainState) -> TrainLog:
        loss = logs.get("loss", float("nan"))
        record = {**logs, "bits_per_token": loss / LN2, "lr": self.lr, "tokens_per_s": rate,
                  "epoch": state.position.epoch}
        return TrainLog(record, f"loss {loss:.4f} ({loss / LN2:.3f} bits)")

    def images(self, step: int) -> None:
        """None between validations: the sample grids come with them (see :meth:`evaluate`)."""

    def evaluate(self, step: int) -> dict[str, float]:
        if self.log is None or not self.val_inputs:
            return {}
        val = validate_prior(self.model, self.val_inputs, self.amp)
        val.update(unigram_entropy=self.unigram, unigram_bits=self.unigram / LN2)
        check_stop()  # before the sample grids, which take a while too
        if self.samples is not None:
            png = self.run_dir / "images" / f"samples_step_{step:07d}.png"
            if self.samples.write(png, self.model, self.val_inputs) is not None:
                self.log.image("samples", png, step)
        return val

    def val_text(self, val: dict[str, float]) -> str:
        return (f"loss {val['loss']:.4f} nats ({val['bits_per_token']:.3f} bits/token; unigram entropy "
                f"{self.unigram:.4f}), accuracy {val['accuracy']:.3f}")

    def summary(self, final: Path | None) -> dict[str, Any]:
        return {"prior": str(final) if final is not None else "(not final)",
                "tokenizer": str(self.info.get("tokenizer"))}

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])

    def load_weights(self, path: Path) -> None:
        """The checkpoint's weights, after checking that the shards still describe this model."""
        saved = read_weights(path)
        now = to_dict(self.model.config)
        if saved.config != now:
            diff = [k for k in sorted(set(saved.config) | set(now)) if saved.config.get(k) != now.get(k)]
            raise ConfigError([f"{k}: the run's checkpoint {path.name} has {saved.config.get(k)!r}, the shards "
                               f"now give {now.get(k)!r}" for k in diff] +
                              ["the shards changed under this run: pass `overwrite` or use a new train.out_dir"])
        self.model.load_state_dict(saved.state_dict)

    def save_weights(self, path: Path, info: dict) -> None:
        save_prior(path, self.model, {**self.info, **info})


def train_prior(recipe: PriorRecipe, run_name: str, overwrite: bool = False) -> PriorTrainResult:
    """Train (or resume) the prior run of ``recipe``; returns where its weights are."""
    cfg = recipe.train
    data = resolve_data(recipe.data, recipe.model.cond, recipe.model.sos_token, recipe.model.cond_dropout,
                        cfg.batch_size)
    run_dir = Path(cfg.out_dir or f"runs/{recipe.name or run_name}")
    rt = open_run(cfg, to_dict(recipe), run_dir, overwrite)
    stage = PriorStage(recipe, build_prior(recipe, data).to(rt.device), rt, data)
    dataset = build_split(data, recipe.data, validation=False, seed=cfg.seed, with_cond=data.cond.spatial)
    stream = BatchStream(dataset, cfg.batch_size, recipe.data.workers, cfg.seed, rt, collate_tokens)
    res = run(stage, cfg, stream, run_dir, rt)
    return PriorTrainResult(res.run_dir, res.weights, res.steps, res.seconds, res.val, res.nonfinite,
                            res.stopped_by_signal)
