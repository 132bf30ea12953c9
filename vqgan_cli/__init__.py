"""vqgan: Taming Transformers for High-Resolution Image Synthesis, as a toolkit."""

__version__ = "0.1.0"
