"""Validation of a tokenizer on held-out data: L1, PSNR, SSIM, LPIPS and codebook usage.

The one implementation lives in :mod:`vqgan_cli.evaluate.tokenizer` (also behind
``vqgan evaluate tokenizer``); training validation calls it under its historical name."""

from __future__ import annotations

from vqgan_cli.evaluate.tokenizer import validate as evaluate_tokenizer

__all__ = ["evaluate_tokenizer"]
