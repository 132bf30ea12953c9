"""``vqgan demo``: a local web page to pick or paint a map and watch the sample appear.

Gradio is an optional extra (``pip install -e ".[demo]"``); nothing here imports it until the
page is built, so the rest of the package works without it. Modules: :mod:`.maps` (maps from a
built-in scene, an upload or a painting, label checks, colours), :mod:`.jobs` (one sampling run:
progress, partial decodes, Stop), :mod:`.app` (the page's handlers, testable without a browser),
:mod:`.page` (the Gradio layout and :func:`serve`).
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = 'vqgan demo needs Gradio, an optional extra: pip install -e ".[demo]"  (or: pip install "gradio>=5")'


class DemoUnavailable(RuntimeError):
    """Gradio is not installed; the message says how to install it."""


def gradio_available() -> bool:
    """Whether ``import gradio`` would work (checked without importing it)."""
    return importlib.util.find_spec("gradio") is not None


def serve(prior: str, tokenizer: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          device: str = "auto") -> None:
    """Load the models once and serve the page until Ctrl-C (see :func:`vqgan_cli.demo.page.serve`)."""
    if not gradio_available():
        raise DemoUnavailable(INSTALL_HINT)
    from vqgan_cli.demo.page import serve as _serve

    _serve(prior, tokenizer, host, port, device)


__all__ = ["INSTALL_HINT", "DemoUnavailable", "gradio_available", "serve"]
