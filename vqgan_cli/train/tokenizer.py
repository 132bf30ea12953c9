"""Stage one: train a VQGAN tokenizer (images, segmentation maps or depth) from a recipe.

The loop is :mod:`vqgan_cli.train.engine`'s; this module is the recipe, the models and
optimisers, and the step body. One autoencoder forward per step: the discriminator step reuses
the detached reconstruction of the generator step (the reference runs the autoencoder a second
time for it). The discriminator is not wrapped in DDP: it is called twice per step in different
roles, so its gradients are averaged by hand and its BatchNorm statistics broadcast from rank 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vqgan_cli import runtime as R
from vqgan_cli.checkpoints.format import read_weights
from vqgan_cli.checkpoints.load import save_tokenizer
from vqgan_cli.config import spec, to_dict
from vqgan_cli.console import console
from vqgan_cli.data import DataConfig, build_dataset, collate, model_input
from vqgan_cli.data.dataset import VAL_SEED_BASE
from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.data.transforms import image_to_tensor
from vqgan_cli.images import displayable, save_grid
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.runtime import Runtime, resolve_precision
from vqgan_cli.train.checkpointing import checkpoint_size
from vqgan_cli.train.config import ScheduleConfig, TrainConfig, betas_problems
from vqgan_cli.train.engine import StepOut, TrainLog, TrainState, accumulate_logs, all_finite, open_run, run
from vqgan_cli.train.loggers import RunLog
from vqgan_cli.train.losses import LossConfig, TokenizerLoss
from vqgan_cli.train.optim import grad_scaler, learning_rate, optimizer_step, scheduled_lr
from vqgan_cli.train.stream import BatchStream
from vqgan_cli.train.validation import validate


@dataclass
class TokenizerOptim(ScheduleConfig):
    """Adam for the autoencoder and the discriminator: the reference's betas, plus a schedule."""

    betas: tuple[float, ...] = spec(default_factory=lambda: (0.5, 0.9),
                                    help="Adam betas of both optimisers (the reference: 0.5, 0.9)")

    def check(self) -> list[str]:
        return betas_problems(self.betas)


@dataclass
class TokenizerRecipe:
    """A stage-one recipe: what to build (model, loss), from what (data), and how (train)."""

    name: str | None = spec(None, help="run name; default: the recipe file's stem")
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: TokenizerOptim = field(default_factory=TokenizerOptim)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> list[str]:
        problems = []
        f = self.model.autoencoder.factor
        if self.data.size % f:
            problems.append(f"data.size: {self.data.size} is not a multiple of the model's factor {f}")
        if self.model.modality == "segmentation" and self.loss.perceptual_weight > 0:
            problems.append("loss.perceptual_weight: segmentation tokenizers use BCE only; set it to 0")
        return problems


class TrainResult(NamedTuple):
    run_dir: Path
    tokenizer: Path
    steps: int
    seconds: float
    val: dict
    skipped: int
    nonfinite: int
    stopped_by_signal: int | None  # exit code when a signal ended the run early


def _val_batches(recipe: TokenizerRecipe, n_labels: int | None) -> list[torch.Tensor]:
    ds = build_dataset(recipe.data, "val", recipe.model.modality, n_labels, seed=recipe.train.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=recipe.train.batch_size, shuffle=False,
                                         num_workers=0, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))  # spare the global RNG
    out = []
    for i, batch in enumerate(loader):
        if i >= recipe.train.val_batches:
            break
        if batch.get("image") is None and batch.get("seg") is None and batch.get("depth") is None:
            continue
        out.append(model_input(batch, recipe.model.modality, n_labels))
    return out


def _large_val_inputs(recipe: TokenizerRecipe) -> list[torch.Tensor]:
    """Held-out built-in scenes at ``data.val_scene`` (width, height), one (1, 3, H, W) each: the
    scale a tokenizer is used at, decoded whole (the crops of training are not)."""
    data = recipe.data
    if data.val_scene is None or recipe.model.modality != "image" or not data.train.startswith("builtin:"):
        return []
    width, height = data.val_scene
    return [image_to_tensor(render_landscape(VAL_SEED_BASE + k, height, width).image)[None]
            for k in range(data.val_scene_count)]


class TokenizerStage:
    """The autoencoder, its loss (with the discriminator) and their two Adam optimisers."""

    name = "train-tokenizer"
    weights_name = "tokenizer.safetensors"
    unit = "img"

    def __init__(self, recipe: TokenizerRecipe, rt: Runtime):
        cfg = self.cfg = recipe.train
        self.recipe, self.rt = recipe, rt
        self.modality, self.n_labels = recipe.model.modality, recipe.model.n_labels
        self.model = VQGAN(recipe.model).to(rt.device)
        self.loss_fn = TokenizerLoss(recipe.loss, self.modality, recipe.model.autoencoder.in_channels).to(rt.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.loss_fn.to(memory_format=torch.channels_last)
        self.peak = self.lr = learning_rate(cfg.base_lr, cfg.batch_size, cfg.accumulate, rt.world_size)
        self.schedule = recipe.optim
        betas = tuple(recipe.optim.betas)
        self.opt_ae = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
                                       betas=betas)
        self.disc = self.loss_fn.discriminator  # None for tokenizers trained without the adversarial term
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.lr, betas=betas) \
            if self.disc is not None else None
        self.precision = resolve_precision(cfg.precision, rt.device, key="train.precision")
        self.amp = R.autocast(rt.device, self.precision.name)
        self.scaler = grad_scaler(self.precision.name)
        self.items_per_step = cfg.batch_size * cfg.accumulate * rt.world_size
        self.forward: nn.Module = self.model
        self.log: RunLog | None = None
        self.run_dir = Path()
        self.val_inputs: list[torch.Tensor] = []
        self.large_inputs: list[torch.Tensor] = []
        self.skipped = 0  # files the data skipped, in all
        self._warned: set[str] = set()
        self._disc_factor = 0.0
        self._use_disc = False

    def checkpoint_size(self) -> tuple[int, int]:
        return checkpoint_size(self.model, [self.opt_ae, self.opt_d], [self.disc])

    def attach(self, forward: nn.Module, log: RunLog | None = None, run_dir: Path | None = None) -> None:
        if self.cfg.compile:
            # The adaptive weight differentiates the same graph twice (retain_graph=True), which
            # compiled backwards only allow without donated buffers.
            torch._functorch.config.donated_buffer = False
        self.forward = forward
        if log is None or run_dir is None:
            return
        self.log, self.run_dir = log, run_dir
        if not self.rt.is_main:
            return
        self.val_inputs = _val_batches(self.recipe, self.n_labels)
        self.large_inputs = _large_val_inputs(self.recipe)
        cfg = self.cfg
        console.print(f"[bold]{run_dir}[/]: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                      f"lr {self.peak:.3g} (base {cfg.base_lr:g} x batch {cfg.batch_size} x accumulate "
                      f"{cfg.accumulate} x {self.rt.world_size} process(es)), device {self.rt.device}, "
                      f"{self.precision.name}")
        if self.recipe.loss.lpips_backbone == "random" and self.recipe.loss.perceptual_weight > 0:
            console.print("[yellow]loss.lpips_backbone=random: perceptual numbers mean nothing "
                          "(a random VGG); use it for tests only[/]")

    def step(self, batches: Iterator[dict], step: int) -> StepOut:
        """Generator loss and backward, then the discriminator's on the detached reconstruction."""
        acc, rt = self.cfg.accumulate, self.rt
        self.model.train()
        self.model.set_step(step)
        self._disc_factor = self.loss_fn.disc_factor_at(step)
        self._use_disc = self.loss_fn.uses_discriminator and self._disc_factor > 0
        sched = self.schedule
        self.lr = scheduled_lr(step, self.peak, sched.warmup_steps, self.cfg.max_steps, sched.schedule,
                               sched.min_lr_ratio)
        for opt in (self.opt_ae, self.opt_d):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = self.lr
        self.opt_ae.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        finite, logs, notes = True, {}, []
        for micro, batch in enumerate(batches):
            notes += self._skipped(batch)
            x = model_input(batch, self.modality, self.n_labels).to(rt.device, non_blocking=True)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with R.maybe_no_sync(self.forward, micro != acc - 1):
                with self.amp:
                    out = self.forward(x)
                    gl = self.loss_fn.generator_loss(x, out.x_hat, out.q_loss, step, self.model.last_layer)
                finite = all_finite(gl.total, rt)
                if not finite:
                    break
                self.scaler.scale(gl.total / acc).backward()
            if self._use_disc:
                with self.amp:
                    dl = self.loss_fn.discriminator_loss(x, out.x_hat.detach(), step)
                finite = all_finite(dl.total, rt)
                if not finite:
                    break
                self.scaler.scale(dl.total / acc).backward()
                accumulate_logs(logs, {"d_loss": dl.total, "logits_real": dl.logits_real,
                                       "logits_fake": dl.logits_fake}, acc)
            accumulate_logs(logs, {"loss": gl.total, "nll": gl.nll, "rec": gl.rec, "perceptual": gl.perceptual,
                                   "g_loss": gl.g_loss, "adaptive_weight": gl.adaptive_weight,
                                   "q_loss": gl.q_loss, "perplexity": out.perplexity}, acc)
        if self.disc is not None:
            R.broadcast_buffers(self.disc, rt)  # BatchNorm statistics: rank 0's everywhere
        return StepOut(finite, logs, tuple(notes))

    def _skipped(self, batch: dict) -> list[str]:
        """Count the files the data skipped; name each kind of problem once."""
        notes = []
        for msg in batch.get("skipped", []):
            self.skipped += 1
            if msg not in self._warned:
                self._warned.add(msg)
                notes.append(f"[yellow]skipped[/] {msg}")
        return notes

    def apply(self, step: int) -> dict[str, float]:
        optimizer_step(self.opt_ae, self.model, self.scaler, self.cfg.grad_clip)
        if self._use_disc:
            R.average_gradients(self.disc, self.rt)  # not DDP-wrapped: see the module doc
            optimizer_step(self.opt_d, self.disc, self.scaler, self.cfg.grad_clip)
        self.scaler.update()
        return {}

    def train_log(self, logs: dict[str, float], rate: float, state: TrainState) -> TrainLog:
        usage = self.model.quantize.usage()
        if self.log is not None:
            self.log.code_histogram("train/codes_used", self.model.quantize, state.step)
        record = {**logs, "disc_factor": self._disc_factor, "codebook_usage": usage, "lr": self.lr,
                  "images_per_s": rate, "skipped_files": self.skipped}
        return TrainLog(record, f"loss {logs.get('loss', float('nan')):.4f} usage {usage:.2f}")

    def images(self, step: int) -> None:
        if self.log is None or not self.val_inputs:
            return
        png = self.run_dir / "images" / f"step_{step:07d}.png"
        _write_grid(png, self.model, self.val_inputs[0][:8], self.modality, self.amp)
        self.log.image("reconstructions", png, step)

    def evaluate(self, step: int) -> dict[str, float]:
        if self.log is None or not self.val_inputs:
            return {}
        device = self.rt.device
        val = validate(self.model, [v.to(device) for v in self.val_inputs], self.modality,
                       self.loss_fn.perceptual_loss, self.amp)
        if self.large_inputs:
            large = validate(self.model, [v.to(device) for v in self.large_inputs], self.modality,
                             self.loss_fn.perceptual_loss, self.amp)
            val.update({f"large_{k}": v for k, v in large.items()})
            png = self.run_dir / "images" / f"large_step_{step:07d}.png"
            _write_grid(png, self.model, self.large_inputs[0].to(device), self.modality, self.amp)
            self.log.image("reconstructions_large", png, step)
        return val

    def val_text(self, val: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in val.items() if k != "images")

    def summary(self, final: Path | None) -> dict[str, Any]:
        return {"skipped files": self.skipped, "tokenizer": str(final) if final is not None else "(not final)"}

    def state_dict(self) -> dict:
        state = {"opt_ae": self.opt_ae.state_dict(), "quantizer": self.model.quantize.training_state(),
                 "skipped": self.skipped}
        if self.disc is not None:
            state.update(opt_d=self.opt_d.state_dict(), discriminator=self.disc.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt_ae.load_state_dict(state["opt_ae"])
        if self.disc is not None:
            self.opt_d.load_state_dict(state["opt_d"])
            self.disc.load_state_dict(state["discriminator"])
        self.model.quantize.load_training_state(state["quantizer"])
        self.skipped = int(state["skipped"])

    def load_weights(self, path: Path) -> None:
        self.model.load_state_dict(read_weights(path).state_dict)

    def save_weights(self, path: Path, info: dict) -> None:
        save_tokenizer(path, self.model, info)


def train_tokenizer(recipe: TokenizerRecipe, run_name: str, overwrite: bool = False) -> TrainResult:
    """Train (or resume) the tokenizer run of ``recipe``; returns where its weights are."""
    cfg = recipe.train
    run_dir = Path(cfg.out_dir or f"runs/{recipe.name or run_name}")
    rt = open_run(cfg, to_dict(recipe), run_dir, overwrite)
    stage = TokenizerStage(recipe, rt)
    dataset = build_dataset(recipe.data, "train", recipe.model.modality, recipe.model.n_labels, seed=cfg.seed)
    stream = BatchStream(dataset, cfg.batch_size, recipe.data.workers, cfg.seed, rt, collate)
    res = run(stage, cfg, stream, run_dir, rt)
    return TrainResult(res.run_dir, res.weights, res.steps, res.seconds, res.val, stage.skipped, res.nonfinite,
                       res.stopped_by_signal)


@torch.no_grad()
def _write_grid(path: Path, model: VQGAN, x: torch.Tensor, modality: str, amp) -> None:
    model.eval()
    with amp or contextlib.nullcontext():
        x_hat = model(x).x_hat.float()
    model.train()
    save_grid(path, [displayable(x, modality), displayable(x_hat.clamp(-1, 1)
                                                            if modality != "segmentation" else x_hat, modality)])
