"""Data layer: image sources, paired maps, transforms, the built-in landscapes and samplers.

Every sample is a dict (``image`` float (3,H,W) in [-1,1], optional ``seg`` int64 (H,W) and
``depth`` float (1,H,W), ``key``); :func:`collate` stacks them and reports skipped files.
"""

from __future__ import annotations

from vqgan_cli.data.config import DataConfig
from vqgan_cli.data.dataset import build_dataset, collate, model_input
from vqgan_cli.data.errors import BadFile, DataError, DataWarning
from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, Landscape, render_landscape
from vqgan_cli.data.maps import one_hot
from vqgan_cli.data.sampler import ResumableSampler

__all__ = [
    "BadFile", "DataConfig", "DataError", "DataWarning", "LANDSCAPE_CLASSES", "Landscape", "ResumableSampler",
    "build_dataset", "collate", "model_input", "one_hot", "render_landscape",
]
