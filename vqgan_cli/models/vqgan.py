"""The VQGAN tokenizer: encoder, quantizer and decoder assembled; no optimiser, loss or I/O.

``x_hat = decoder(post_quant_conv(quantize(quant_conv(encoder(x)))))`` (PAPER.md, stage one).
Attribute names are the official ones, so a released VQModel/GumbelVQ state dict (minus its
``loss.*`` keys) loads strictly. The same class serves segmentation (one-hot in, logits out) and
depth tokenizers: only the channel counts in the config differ.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vqgan_cli.models.autoencoder import Decoder, Encoder
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.quantizers import Quantized, build_quantizer


class Encoded(NamedTuple):
    """An input's quantized latent and its tokens."""

    z_q: torch.Tensor  # (B, embed_dim, h, w)
    indices: torch.Tensor  # (B, h, w) int64, raster order


class VQGANOutput(NamedTuple):
    """One autoencoding pass: what the training loss needs."""

    x_hat: torch.Tensor  # (B, out_channels, H, W), unbounded
    q_loss: torch.Tensor  # scalar quantizer loss
    indices: torch.Tensor  # (B, h, w)
    perplexity: torch.Tensor  # scalar


class VQGAN(nn.Module):
    """Image (or label/depth map) <-> grid of codebook indices, downsampled by ``factor``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        problems = cfg.check() + cfg.autoencoder.check() + cfg.quantizer.check()
        if problems:
            raise ValueError("invalid tokenizer config:\n" + "\n".join(f"  - {p}" for p in problems))
        self.config = cfg
        ae, qc = cfg.autoencoder, cfg.quantizer
        self.encoder = Encoder(ae)
        self.decoder = Decoder(ae)
        self.quant_conv = nn.Conv2d(ae.z_channels, qc.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(qc.embed_dim, ae.z_channels, 1)
        # The quantizer sees quant_conv's output, hence embed_dim (equal to z_channels in every
        # release; see quantizers.py for the Gumbel reference's naming).
        self.quantize = build_quantizer(qc, qc.embed_dim)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor f: the token grid is (H/f, W/f)."""
        return self.config.autoencoder.factor

    @property
    def n_tokens(self) -> int:
        """Token ids the tokenizer emits: its codebook size, or the remapped range."""
        return self.quantize.n_tokens

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def set_step(self, step: int) -> None:
        """Tell the quantizer the global step (Gumbel temperature annealing)."""
        self.quantize.set_step(step)

    def quantize_latent(self, x: torch.Tensor) -> Quantized:
        """x (B, C, H, W) -> the quantizer's full output, loss included."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode(self, x: torch.Tensor) -> Encoded:
        """x (B, C, H, W) in [-1, 1] (one-hot for segmentation) -> z_q and tokens."""
        q = self.quantize_latent(x)
        return Encoded(q.z_q, q.indices)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) -> x_hat (B, out_channels, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> x_hat; what a prior's samples go through."""
        return self.decode(self.quantize.codes(indices))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        q = self.quantize_latent(x)
        return VQGANOutput(self.decode(q.z_q), q.loss, q.indices, q.perplexity)
