"""Data layer: image sources, paired maps, transforms, the built-in landscapes and samplers.

Every sample is a dict (``image`` float (3,H,W) in [-1,1], optional ``seg`` int64 (H,W) and
``depth`` float (1,H,W), ``key``); :func:`collate` stacks them and reports skipped files.
"""

from __future__ import annotations


class DataError(Exception):
    """A data problem that must stop the run; the message names the file or source at fault."""


class BadFile(DataError):
    """One unreadable or invalid file; skipped (with a DataWarning) or raised per ``bad_files``."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DataWarning(UserWarning):
    """A bad file was skipped (``bad_files: skip``); the message names the file and why."""


from vqgan_cli.data.config import DataConfig  # noqa: E402
from vqgan_cli.data.dataset import build_dataset, collate, model_input  # noqa: E402
from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, Landscape, render_landscape  # noqa: E402
from vqgan_cli.data.maps import one_hot  # noqa: E402
from vqgan_cli.data.sampler import ResumableSampler  # noqa: E402

__all__ = [
    "BadFile", "DataConfig", "DataError", "DataWarning", "LANDSCAPE_CLASSES", "Landscape", "ResumableSampler",
    "build_dataset", "collate", "model_input", "one_hot", "render_landscape",
]
