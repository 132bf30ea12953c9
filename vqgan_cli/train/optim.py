"""Optimiser rules both stages share: the learning-rate scaling and schedule, loss scaling, and
one optimiser step (unscale, clip, step)."""

from __future__ import annotations

import math

import torch


def learning_rate(base_lr: float, batch_size: int, accumulate: int, world_size: int) -> float:
    """The reference's scaling rule: base_lr x batch x accumulation x processes."""
    return base_lr * batch_size * accumulate * world_size


def scheduled_lr(step: int, peak: float, warmup_steps: int, total_steps: int, schedule: str,
                 min_ratio: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``peak`` over
    ``warmup_steps``, then ``constant`` or a ``cosine`` decay to ``min_ratio * peak`` at
    ``total_steps``. Warm-up keeps early AdamW steps of a transformer from diverging."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; use constant or cosine")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def grad_scaler(precision: str) -> torch.amp.GradScaler:
    """Loss scaling, on for fp16 only: bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def optimizer_step(opt: torch.optim.Optimizer, module: torch.nn.Module,
                   scaler: torch.amp.GradScaler, clip: float | None) -> float | None:
    """Unscale, clip (when asked) and step; returns the gradient norm before clipping."""
    norm = None
    if clip is not None:
        scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), clip))
    scaler.step(opt)
    return norm
