"""Validation during tokenizer training: the reconstruction metrics of held-out batches.

In ``train`` (not ``evaluate``) because training calls it; the per-image numbers are
:func:`vqgan_cli.metrics.batch_metrics`, shared with ``vqgan evaluate tokenizer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from vqgan_cli.metrics import batch_metrics, code_counts, codebook_usage
from vqgan_cli.train.signals import check_stop


@torch.no_grad()
def validate(model, batches: Iterable[torch.Tensor], modality: str,  # noqa: ANN001 - a VQGAN
             perceptual: torch.nn.Module | None = None, autocast_ctx=None) -> dict[str, float]:
    """Training validation: means of :func:`batch_metrics` over the batches, codebook usage over
    all their codes, and ``images``. A signal stops it between batches (``Stopped``)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.n_tokens, dtype=torch.long)
    sums: dict[str, float] = {}
    count = 0
    try:
        for x in batches:
            check_stop()  # a long validation must not outlast SIGTERM's grace period
            with autocast_ctx or contextlib.nullcontext():
                out = model(x)
            counts += code_counts(out.indices.cpu(), counts.numel())
            for k, v in batch_metrics(x, out.x_hat, modality, perceptual).items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
            count += x.shape[0]
    finally:
        model.train(was_training)
    result = {k: v / max(count, 1) for k, v in sums.items()}
    result["codebook_usage"] = codebook_usage(counts)
    result["images"] = count
    return result
