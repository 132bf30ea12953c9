"""Tokenizer models: blocks, encoder/decoder, quantizers, the VQGAN and its discriminator."""

from vqgan_cli.models.autoencoder import Decoder, Encoder
from vqgan_cli.models.discriminator import PatchDiscriminator
from vqgan_cli.models.quantizers import GumbelQuantizer, Quantized, VectorQuantizer, build_quantizer
from vqgan_cli.models.vqgan import VQGAN, Encoded, VQGANOutput

__all__ = [
    "VQGAN",
    "Decoder",
    "Encoded",
    "Encoder",
    "GumbelQuantizer",
    "PatchDiscriminator",
    "Quantized",
    "VQGANOutput",
    "VectorQuantizer",
    "build_quantizer",
]
