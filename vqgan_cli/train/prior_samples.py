"""Stage two's pictures at validation: a few images sampled from the validation conditioning,
decoded by the tokenizer the shards name, under the validation images themselves (top row).

Drawn only when the run logs to TensorBoard (the numbers alone say little about a prior), with
fixed seeds, so the grids of successive validations show the same draws improving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vqgan_cli.images import save_grid
from vqgan_cli.models.prior import Prior
from vqgan_cli.sample.tokens import SamplingOptions, make_generators, sample_sequence


class SampleGrids:
    """Validation tokens (top) above samples with the same conditioning (bottom), as one PNG."""

    def __init__(self, tokenizer: str | None, device: torch.device, n: int = 4, seed: int = 0):
        from vqgan_cli.checkpoints.load import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer).to(device) if tokenizer and Path(tokenizer).exists() else None
        self.n = n
        self.seed = seed

    @torch.no_grad()
    def write(self, path: Path, prior: Prior, val_inputs: list) -> Path | None:
        """Sample and save; None when the tokenizer is unknown or the images are not RGB."""
        if self.tokenizer is None or self.tokenizer.config.modality != "image" or not val_inputs:
            return None
        c, z = val_inputs[0]  # c (B, Lc) conditioning tokens; z (B, h, w) raster image tokens
        c, z = c[: self.n], z[: self.n]
        was = prior.training
        prior.eval()
        opts = SamplingOptions(n_tokens=prior.config.n_image_tokens)
        seq = sample_sequence(prior.gpt, c, z[0].numel(), opts,
                              make_generators([self.seed + i for i in range(c.shape[0])]))  # (B, h*w)
        prior.train(was)
        drawn = prior.unpermute(seq).reshape(z.shape)  # (B, h, w) raster
        rows = [self.tokenizer.decode_indices(t.long()).float().clamp(-1, 1) for t in (z, drawn)]
        return save_grid(path, rows)
