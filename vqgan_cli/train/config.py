"""Settings shared by both training stages: schedule, precision, checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqgan_cli.config import spec
from vqgan_cli.runtime import PRECISIONS


@dataclass
class TrainConfig:
    """How to train (not what): the loop machinery reads only this."""

    out_dir: str | None = spec(None, help="run folder; default runs/<recipe name>")
    max_steps: int = spec(1000, ge=1, help="optimiser steps in total (a resumed run continues to it)")
    batch_size: int = spec(8, ge=1, help="images per process per micro-batch")
    accumulate: int = spec(1, ge=1, help="micro-batches per optimiser step")
    base_lr: float = spec(4.5e-6, gt=0.0,
                          help="lr = base_lr x batch_size x accumulate x world_size (the reference's rule)")
    device: str = spec("auto", help="auto | cpu | cuda | cuda:N")
    precision: str = spec("auto", choices=PRECISIONS,
                          help="auto: bf16 where the hardware computes it natively (CPUs with avx512_bf16 or "
                               "AMX, GPUs that have it), fp16 on older GPUs, else fp32 | fp32 | bf16 | fp16")
    channels_last: bool = spec(False, help="NHWC memory format (faster convolutions with bf16)")
    compile: bool = spec(False, help="torch.compile the model")
    seed: int = spec(0, ge=0)
    threads: int | None = spec(None, ge=1, help="CPU threads for torch (default: torch's own choice)")
    ckpt_every: int = spec(500, ge=1, help="save a resumable checkpoint every K steps (and at the end)")
    keep_last: int = spec(3, ge=1, help="how many step checkpoints to keep")
    log_every: int = spec(10, ge=1, help="write metrics.jsonl every N steps")
    image_every: int = spec(500, ge=1, help="write a reconstruction grid every N steps")
    val_every: int = spec(500, ge=1, help="validate every V steps (and at the end)")
    val_batches: int = spec(8, ge=1, help="batches per validation")
    max_nonfinite: int = spec(10, ge=1,
                              help="consecutive non-finite losses (each step skipped) before the run stops")
    grad_clip: float | None = spec(None, gt=0.0, help="clip the gradient norm (None: no clipping)")
    loggers: list[str] = spec(default_factory=lambda: ["jsonl"],
                              help="jsonl (always on) and optionally tensorboard (events in <run>/tensorboard)")

    def check(self) -> list[str]:
        from vqgan_cli.train.loggers import logger_problems

        problems = logger_problems(self.loggers)
        if self.precision == "fp16" and not (self.device.startswith("cuda")
                                             or (self.device == "auto" and torch.cuda.is_available())):
            problems.append("precision: fp16 needs a CUDA device; use auto (bf16 where the CPU computes it "
                            "natively, else fp32), fp32 or bf16")
        return problems


def betas_problems(betas: tuple[float, ...]) -> list[str]:
    """Adam's two betas, each in [0, 1)."""
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        return [f"betas: expected two values in [0, 1), got {list(betas)}"]
    return []


@dataclass
class ScheduleConfig:
    """The learning-rate schedule over ``train.max_steps`` (the reference keeps it constant)."""

    warmup_steps: int = spec(0, ge=0, help="linear warm-up from 0 to the full lr")
    schedule: str = spec("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = spec(0.1, ge=0.0, le=1.0, help="cosine: final lr as a share of the peak")
