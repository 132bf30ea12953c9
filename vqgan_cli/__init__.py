"""vqgan: Taming Transformers for High-Resolution Image Synthesis, as a toolkit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_prior", "load_tokenizer"]

if TYPE_CHECKING:
    from vqgan_cli.checkpoints.load import load_prior, load_tokenizer


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import vqgan_cli` (and the CLI's --help) stays free of torch.
    if name in ("load_tokenizer", "load_prior"):
        from vqgan_cli.checkpoints import load as loading

        return getattr(loading, name)
    raise AttributeError(f"module 'vqgan_cli' has no attribute {name!r}")
