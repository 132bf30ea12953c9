"""Shared pieces of the official-release import: prefixes, YAML reading, strict loading.

The release's modules are Lightning models whose state dicts mix inference weights with
training-only ones (``loss.*``: discriminator and LPIPS) and display-only buffers
(``colorize``: a random projection used to draw segmentation maps). Those are dropped and
reported; everything else must match our modules exactly, key for key and shape for shape.
See :mod:`vqgan_cli.checkpoints.official.tokenizer` and :mod:`vqgan_cli.checkpoints.official.prior`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vqgan_cli.checkpoints.format import CheckpointError

TRAINING_ONLY_PREFIXES = ("loss.",)
DISPLAY_ONLY_KEYS = ("colorize",)
MAX_LISTED = 6


def split_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def drop_training_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                  dict[str, torch.Tensor]]:
    """(inference weights, dropped training/display-only entries) of a VQModel state dict."""
    keep, dropped = {}, {}
    for k, v in state.items():
        if k.startswith(TRAINING_ONLY_PREFIXES) or k in DISPLAY_ONLY_KEYS:
            dropped[k] = v
        else:
            keep[k] = v
    return keep, dropped


def _listed(keys: list[str], prefix: str) -> str:
    shown = ", ".join(prefix + k for k in keys[:MAX_LISTED])
    more = f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return shown + more


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                prefix: str = "") -> None:
    """Load ``state`` into ``model`` requiring the exact key set and shapes.

    ``prefix`` is how the keys were spelled in the file, so errors name the file's own keys.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {_listed(missing, prefix)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {_listed(unexpected, prefix)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key {prefix}{k} has shape {tuple(state[k].shape)}, "
                                  f"the model needs {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def need(state: dict[str, torch.Tensor], key: str, source: str, prefix: str = "",
         ndim: int | None = None) -> torch.Tensor:
    """A tensor the shape inference relies on, or a clear error naming it."""
    if key not in state:
        raise CheckpointError(f"{source}: missing key {prefix}{key}")
    t = state[key]
    if ndim is not None and t.ndim != ndim:
        raise CheckpointError(f"{source}: key {prefix}{key} has shape {tuple(t.shape)}, "
                              f"expected {ndim} dimensions")
    return t


def read_model_yaml(config: str | Path | dict | None) -> tuple[dict | None, str]:
    """The ``model`` section of a release YAML (path or parsed mapping) and a name for errors."""
    if config is None:
        return None, ""
    if isinstance(config, dict):
        data, name = config, "config"
    else:
        p = Path(config)
        if not p.is_file():
            raise CheckpointError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{p}: YAML syntax error ({e})") from None
        name = str(p)
    if not isinstance(data, dict):
        raise CheckpointError(f"{name}: expected a mapping with a 'model' section")
    model = data.get("model", data)
    if not isinstance(model, dict) or "params" not in model:
        raise CheckpointError(f"{name}: no model.params section (not a release config)")
    return model, name


def get_param(params: dict, key: str, default: Any = None) -> Any:
    """``params[key]`` tolerant of missing sections."""
    return params.get(key, default) if isinstance(params, dict) else default


def target_name(node: Any) -> str:
    """Last component of a ``target: a.b.Class`` entry (or the string itself)."""
    if isinstance(node, dict):
        node = node.get("target", "")
    return str(node).rsplit(".", 1)[-1]


def mismatch(source: str, key: str, yaml_value: Any, weights_value: Any, evidence: str) -> CheckpointError:
    """The error for a YAML value the tensor shapes contradict."""
    return CheckpointError(f"{source}: {key} is {yaml_value!r} but the weights say "
                           f"{weights_value!r} ({evidence})")
