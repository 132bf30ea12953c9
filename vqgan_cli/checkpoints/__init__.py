"""Model files: our safetensors format with atomic writes, loading and saving both stages, conversion.
Official releases and diffusers folders come in through ``official/`` and ``diffusers.py``."""
