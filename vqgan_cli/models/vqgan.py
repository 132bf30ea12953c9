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
        self._compiled: tuple | None = None  # (latent, decode) under torch.compile: compile_parts()

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

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, embed_dim, h, w), before quantization

    def quantize_latent(self, x: torch.Tensor) -> Quantized:
        """x (B, C, H, W) -> the quantizer's full output, loss included."""
        return self.quantize(self._latent(x))

    def compile_parts(self) -> None:
        """``torch.compile`` the convolutional halves of the training forward, not the quantizer:
        its codebook bookkeeping (usage counts, dead-code restarts) would break the graph. Only
        :meth:`forward` in training mode uses them; evaluation at other sizes stays eager, so
        validation at new shapes never recompiles. State-dict keys are unchanged."""
        self._compiled = (torch.compile(self._latent, dynamic=False), torch.compile(self.decode, dynamic=False))

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
        latent, decode = self._compiled if self._compiled and self.training else (self._latent, self.decode)
        q = self.quantize(latent(x))
        return VQGANOutput(decode(q.z_q), q.loss, q.indices, q.perplexity)
