"""Stage one: train a VQGAN tokenizer (images, segmentation maps or depth) from a recipe.

One autoencoder forward per step: the discriminator step reuses the detached reconstruction of
the generator step (the reference runs the autoencoder a second time for it). The discriminator
is not wrapped in DDP: it is called twice per step in different roles, so its gradients are
averaged by hand and its BatchNorm statistics broadcast from rank 0.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from vqgan_cli import runtime as R
from vqgan_cli.checkpoints.load import save_tokenizer
from vqgan_cli.config import spec, to_dict
from vqgan_cli.console import TrainProgress, console
from vqgan_cli.data import DataConfig, build_dataset, collate, model_input
from vqgan_cli.data.dataset import VAL_SEED_BASE
from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.data.transforms import image_to_tensor
from vqgan_cli.images import displayable, save_grid
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.train.checkpointing import CheckpointManager, checkpoint_size
from vqgan_cli.train.config import TrainConfig
from vqgan_cli.train.evaluation import evaluate_tokenizer
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
)
from vqgan_cli.train.losses import LossConfig, TokenizerLoss
from vqgan_cli.train.signals import StopRequest


@dataclass
class TokenizerRecipe:
    """A stage-one recipe: what to build (model, loss), from what (data), and how (train)."""

    name: str | None = spec(None, help="run name; default: the recipe file's stem")
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
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


def _val_batches(recipe: TokenizerRecipe, rt: R.Runtime, n_labels: int | None):
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


def train_tokenizer(recipe: TokenizerRecipe, run_name: str, overwrite: bool = False) -> TrainResult:
    """Train (or resume) the tokenizer run of ``recipe``; returns where its weights are."""
    cfg = recipe.train
    rt = R.setup_runtime(cfg.device, cfg.threads)
    run_dir = Path(cfg.out_dir or f"runs/{recipe.name or run_name}")
    prepare_run_dir(run_dir, to_dict(recipe), overwrite, rt)
    R.barrier(rt)
    modality = recipe.model.modality
    n_labels = recipe.model.n_labels

    R.seed_everything(cfg.seed)  # identical initial weights on every rank
    model = VQGAN(recipe.model).to(rt.device)
    loss_fn = TokenizerLoss(recipe.loss, modality, recipe.model.autoencoder.in_channels).to(rt.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    lr = learning_rate(cfg.base_lr, cfg.batch_size, cfg.accumulate, rt.world_size)
    opt_ae = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9))
    disc = loss_fn.discriminator  # None for tokenizers trained without the adversarial term
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if disc is not None else None

    ckpts = CheckpointManager(run_dir, cfg.keep_last)
    if rt.is_main:
        ckpts.check_space(*checkpoint_size(model, [opt_ae, opt_d], [disc]))  # warn before work when the disk is short
    metrics = RunLog(run_dir, cfg.loggers, enabled=rt.is_main)
    step, position, guard, skipped_total = 0, DataPosition(), NonFiniteGuard(cfg.max_nonfinite), 0
    latest = ckpts.latest()
    if latest is not None:
        from vqgan_cli.checkpoints.format import read_weights

        model.load_state_dict(read_weights(latest.weights).state_dict)
        state = ckpts.load(latest)
        opt_ae.load_state_dict(state["opt_ae"])
        if disc is not None:
            opt_d.load_state_dict(state["opt_d"])
            disc.load_state_dict(state["discriminator"])
        model.quantize.load_training_state(state["quantizer"])
        step = int(state["step"])
        position = DataPosition(int(state["epoch"]), int(state["batch"]))
        guard = NonFiniteGuard(cfg.max_nonfinite, int(state["nonfinite"]), int(state["nonfinite_in_a_row"]))
        skipped_total = int(state["skipped"])
        restore_rng(state["rng"], rt)
        metrics.truncate_after(step)
        if rt.is_main:
            console.print(f"[green]resuming[/] {run_dir} from step {step} ({latest.weights.name})")
    else:
        R.seed_everything(cfg.seed + 1000 * rt.rank)  # per-rank randomness from here on

    core = model
    train_model: torch.nn.Module = model
    if rt.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            broadcast_buffers=False)
    if cfg.compile:
        # The adaptive weight differentiates the same graph twice (retain_graph=True), which
        # compiled backwards only allow without donated buffers.
        torch._functorch.config.donated_buffer = False
        train_model = torch.compile(train_model, dynamic=False)  # static shapes: symbolic ones broke Inductor here

    dataset = build_dataset(recipe.data, "train", modality, n_labels, seed=cfg.seed)
    stream = BatchStream(dataset, cfg.batch_size, recipe.data.workers, cfg.seed, rt, collate, position)
    val_inputs = _val_batches(recipe, rt, n_labels) if rt.is_main else []
    large_inputs = _large_val_inputs(recipe) if rt.is_main else []
    amp = R.autocast(rt, cfg.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    stop = StopRequest()
    if rt.is_main:
        console.print(f"[bold]{run_dir}[/]: {sum(p.numel() for p in model.parameters()):,} parameters, "
                      f"lr {lr:.3g} (base {cfg.base_lr:g} x batch {cfg.batch_size} x accumulate "
                      f"{cfg.accumulate} x {rt.world_size} process(es)), device {rt.device}, {cfg.precision}")
        if recipe.loss.lpips_backbone == "random" and recipe.loss.perceptual_weight > 0:
            console.print("[yellow]loss.lpips_backbone=random: perceptual numbers mean nothing "
                          "(a random VGG); use it for tests only[/]")

    def save_checkpoint(at_step: int) -> None:
        rngs = gather_rng(rt)
        if not rt.is_main:
            return
        state = {"step": at_step, "epoch": stream.position.epoch, "batch": stream.position.batch,
                 "opt_ae": opt_ae.state_dict(), "quantizer": core.quantize.training_state(),
                 "rng": rngs,
                 "nonfinite": guard.total, "nonfinite_in_a_row": guard.in_a_row,
                 "skipped": skipped_total}
        if disc is not None:
            state.update(opt_d=opt_d.state_dict(), discriminator=disc.state_dict())
        ckpts.save(at_step, state, lambda p: save_tokenizer(p, core, {"step": at_step}))

    start_time, start_step = time.perf_counter(), step
    warned: set[str] = set()
    val_result: dict = {}
    window = {"t": time.perf_counter(), "step": step}
    stopped: int | None = None
    shown: tuple[float, str] = (0.0, "")
    try:
        with TrainProgress(cfg.max_steps, step, f"train-tokenizer {run_dir.name}", rt.is_main) as bar:
            while step < cfg.max_steps:
                if R.any_rank(stop.requested, rt):
                    stopped = stop.exit_code if stop.requested else 130
                    break
                model.train()
                core.set_step(step)
                disc_factor = loss_fn.disc_factor_at(step)
                use_disc = loss_fn.uses_discriminator and disc_factor > 0
                opt_ae.zero_grad(set_to_none=True)
                if opt_d is not None:
                    opt_d.zero_grad(set_to_none=True)
                finite, logs = True, {}
                for micro in range(cfg.accumulate):
                    batch = stream.next()
                    for msg in batch.get("skipped", []):
                        skipped_total += 1
                        if msg not in warned:
                            warned.add(msg)
                            bar.log(f"[yellow]skipped[/] {msg}")
                    x = model_input(batch, modality, n_labels).to(rt.device, non_blocking=True)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    last_micro = micro == cfg.accumulate - 1
                    with R.maybe_no_sync(train_model, not last_micro):
                        with amp:
                            out = train_model(x)
                            gl = loss_fn.generator_loss(x, out.x_hat, out.q_loss, step, core.last_layer)
                        finite = not R.any_rank(not bool(torch.isfinite(gl.total)), rt)
                        if not finite:
                            break
                        scaler.scale(gl.total / cfg.accumulate).backward()
                    if use_disc:
                        with amp:
                            dl = loss_fn.discriminator_loss(x, out.x_hat.detach(), step)
                        finite = not R.any_rank(not bool(torch.isfinite(dl.total)), rt)
                        if not finite:
                            break
                        scaler.scale(dl.total / cfg.accumulate).backward()
                        accumulate_logs(logs, {"d_loss": dl.total, "logits_real": dl.logits_real,
                                               "logits_fake": dl.logits_fake}, cfg.accumulate)
                    accumulate_logs(logs, {"loss": gl.total, "nll": gl.nll, "rec": gl.rec,
                                           "perceptual": gl.perceptual, "g_loss": gl.g_loss,
                                           "adaptive_weight": gl.adaptive_weight, "q_loss": gl.q_loss,
                                           "perplexity": out.perplexity}, cfg.accumulate)
                guard.record(finite, step)
                if finite:
                    optimizer_step(opt_ae, model, scaler, cfg.grad_clip)
                    if use_disc:
                        R.average_gradients(disc, rt)
                        optimizer_step(opt_d, disc, scaler, cfg.grad_clip)
                    scaler.update()
                else:
                    opt_ae.zero_grad(set_to_none=True)
                    if opt_d is not None:
                        opt_d.zero_grad(set_to_none=True)
                    bar.log(f"[red]non-finite loss at step {step}: step skipped "
                            f"({guard.in_a_row} in a row, {guard.total} in all)[/]")
                if disc is not None:
                    R.broadcast_buffers(disc, rt)
                step += 1

                if due(step, cfg.log_every, cfg.max_steps):
                    now = time.perf_counter()
                    rate = (step - window["step"]) * cfg.batch_size * cfg.accumulate * rt.world_size / max(
                        now - window["t"], 1e-9)
                    window = {"t": now, "step": step}
                    usage = core.quantize.usage()
                    metrics.write({"step": step, "split": "train", **logs, "disc_factor": disc_factor,
                                   "codebook_usage": usage, "lr": lr, "images_per_s": rate,
                                   "skipped_files": skipped_total, "nonfinite_steps": guard.total})
                    metrics.code_histogram("train/codes_used", core.quantize, step)
                    shown = (rate, f"loss {logs.get('loss', float('nan')):.4f} usage {usage:.2f}")
                bar.update(step, shown[0], "img", shown[1])
                if rt.is_main and due(step, cfg.image_every, cfg.max_steps) and val_inputs:
                    _write_grid(run_dir / "images" / f"step_{step:07d}.png", core, val_inputs[0][:8],
                                modality, amp)
                    metrics.image("reconstructions", run_dir / "images" / f"step_{step:07d}.png", step)
                if due(step, cfg.val_every, cfg.max_steps):
                    if rt.is_main and val_inputs:
                        val_result = evaluate_tokenizer(core, [v.to(rt.device) for v in val_inputs],
                                                        modality, loss_fn.perceptual_loss, amp)
                        if large_inputs:
                            large = evaluate_tokenizer(core, [v.to(rt.device) for v in large_inputs],
                                                       modality, loss_fn.perceptual_loss, amp)
                            val_result.update({f"large_{k}": v for k, v in large.items()})
                            _write_grid(run_dir / "images" / f"large_step_{step:07d}.png", core,
                                        large_inputs[0].to(rt.device), modality, amp)
                            metrics.image("reconstructions_large",
                                          run_dir / "images" / f"large_step_{step:07d}.png", step)
                        metrics.write({"step": step, "split": "val", **val_result})
                        bar.log(f"step {step} validation: " + ", ".join(
                            f"{k} {v:.4g}" for k, v in val_result.items() if k != "images"))
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

    final = run_dir / "tokenizer.safetensors"
    if rt.is_main and stopped is None:
        save_tokenizer(final, core, {"step": step, "run": str(run_dir), "val": val_result})
    seconds = time.perf_counter() - start_time
    result = TrainResult(run_dir, final, step, seconds, val_result, skipped_total, guard.total, stopped)
    if rt.is_main:
        draw_curves(run_dir)
        report_end("train-tokenizer summary", run_dir, step, start_step, seconds, guard.total, stopped,
                   {"skipped files": skipped_total,
                    "tokenizer": str(final) if stopped is None else "(not final)"}, val_result)
    return result


@torch.no_grad()
def _write_grid(path: Path, model: VQGAN, x: torch.Tensor, modality: str, amp) -> None:
    model.eval()
    with amp or contextlib.nullcontext():
        x_hat = model(x).x_hat.float()
    model.train()
    save_grid(path, [displayable(x, modality), displayable(x_hat.clamp(-1, 1)
                                                            if modality != "segmentation" else x_hat, modality)])
