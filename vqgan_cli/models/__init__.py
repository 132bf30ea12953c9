"""nn.Modules and their configs only: the VQGAN (blocks, encoder/decoder, quantizers with the index
remap, discriminator), the GPT prior with its reading orders, and LPIPS. No optimiser, no file I/O."""

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
