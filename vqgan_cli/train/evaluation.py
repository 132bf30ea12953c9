"""Validation of a tokenizer on held-out data: L1, PSNR, SSIM, LPIPS and codebook usage."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vqgan_cli.metrics import psnr, ssim
from vqgan_cli.models.vqgan import VQGAN


@torch.no_grad()
def evaluate_tokenizer(model: VQGAN, batches: Iterable[torch.Tensor], modality: str,
                       perceptual: torch.nn.Module | None = None,
                       autocast_ctx=None) -> dict[str, float]:
    """Average metrics over the given model-input batches; usage is over all their codes.

    Segmentation is scored by pixel accuracy of the argmax labels (PSNR means nothing there).
    """
    import contextlib

    was_training = model.training
    model.eval()
    n_embed = model.config.quantizer.n_embed
    seen = torch.zeros(n_embed, dtype=torch.bool)
    sums: dict[str, float] = {}
    count = 0
    for x in batches:
        with autocast_ctx or contextlib.nullcontext():
            out = model(x)
        x_hat = out.x_hat.float()
        xf = x.float()
        b = x.shape[0]
        seen[out.indices.flatten().cpu()] = True
        vals: dict[str, torch.Tensor] = {}
        if modality == "segmentation":
            vals["accuracy"] = (x_hat.argmax(1) == xf.argmax(1)).float().flatten(1).mean(1)
            vals["bce"] = torch.nn.functional.binary_cross_entropy_with_logits(
                x_hat, xf, reduction="none").flatten(1).mean(1)
        else:
            vals["l1"] = (xf - x_hat).abs().flatten(1).mean(1)
            vals["psnr"] = psnr(x_hat.clamp(-1, 1), xf)
            rgb = (lambda t: t.repeat(1, 3, 1, 1)) if xf.shape[1] == 1 else (lambda t: t)
            vals["ssim"] = ssim(rgb(x_hat.clamp(-1, 1)), rgb(xf))
            if perceptual is not None and modality == "image":
                vals["lpips"] = perceptual(xf, x_hat.clamp(-1, 1)).flatten()
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += b
    model.train(was_training)
    result = {k: v / max(count, 1) for k, v in sums.items()}
    result["codebook_usage"] = float(seen.float().mean())
    result["images"] = count
    return result
