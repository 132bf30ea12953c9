"""``vqgan convert``: official checkpoints in our format, and our tokenizers as diffusers folders.

Kept: the inference weights, unchanged, so the converted model computes bit for bit what the
source computes (nothing from the pickle runs: :mod:`vqgan_cli.checkpoints.official.unpickler`).
Dropped unless ``keep_training_state``: ``loss.*`` (discriminator, LPIPS), the display-only
``colorize`` buffer and the optimiser states; with it they go to ``<out>.training.safetensors``
(tensors flattened to dotted keys; non-tensor values such as ``step`` or ``param_groups`` in
its ``info`` metadata), kept for inspection or a hand-made resume, never needed to sample.
A transformer converts to two files: the prior at ``out`` and its first-stage tokenizer at
``<out>.tokenizer.safetensors`` (named, with its weight hash, in the prior's ``info``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vqgan_cli.checkpoints.format import CheckpointError, is_safetensors, save_weights, weights_sha256
from vqgan_cli.checkpoints.load import (
    TRAINING_FORMAT,
    load_tokenizer,
    save_prior,
    save_tokenizer,
    set_label_shift,
)
from vqgan_cli.checkpoints.official.common import read_model_yaml
from vqgan_cli.checkpoints.official.prior import build_prior, is_transformer_state
from vqgan_cli.checkpoints.official.tokenizer import build_tokenizer
from vqgan_cli.checkpoints.official.unpickler import RawCheckpoint, load_official_checkpoint
from vqgan_cli.checkpoints.resolve import resolve_model


def _side_file(out: Path, tag: str) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + f".{tag}.safetensors")


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors of a nested structure into ``tensors`` (dotted keys); JSON-able rest."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().clone()  # own storage: safetensors refuses shared ones
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def training_state_file(out: str | Path) -> Path:
    """Where ``convert_checkpoint(..., keep_training_state=True)`` puts the loss weights and
    optimiser states beside ``out``."""
    return _side_file(Path(out), "training")


def _save_training_state(out: Path, dropped: dict[str, torch.Tensor], raw: RawCheckpoint) -> Path:
    tensors = {k: v.detach().clone() for k, v in dropped.items()}
    rest = {k: _flatten(v, k, tensors) for k, v in raw.extra.items()
            if k in ("optimizer_states", "lr_schedulers")}
    target = training_state_file(out)
    save_weights(target, tensors, TRAINING_FORMAT, {}, {"global_step": raw.global_step, **rest})
    return target


def convert_checkpoint(src: str | Path, out: str | Path, config: str | Path | dict | None = None,
                       keep_training_state: bool = False, *, n_head: int | None = None,
                       cond_kind: str | None = None, n_classes: int | None = None,
                       resolution: int | None = None, unknown_index: int | str = "random") -> Path:
    """Write an official tokenizer or transformer ``.ckpt`` in our format; returns ``out``."""
    return convert(src, out, config, keep_training_state, n_head=n_head, cond_kind=cond_kind, n_classes=n_classes,
                   resolution=resolution, unknown_index=unknown_index)[0]


def convert(src: str | Path, out: str | Path, config: str | Path | dict | None = None,
            keep_training_state: bool = False, *, to: str = "ours", n_head: int | None = None,
            cond_kind: str | None = None, n_classes: int | None = None, resolution: int | None = None,
            unknown_index: int | str = "random") -> list[Path]:
    """Convert ``src`` and return every file or folder written, the main one first.

    ``to="ours"``: our safetensors checkpoint; a transformer's first-stage tokenizer goes beside it
    (``OUT.tokenizer.safetensors``), and with ``keep_training_state`` the loss weights and optimiser
    states (``OUT.training.safetensors``). ``to="diffusers"``: a tokenizer as a ``VQModel`` folder
    that ``diffusers.VQModel.from_pretrained`` reads."""
    if to == "diffusers":
        from vqgan_cli.checkpoints.diffusers import export_diffusers

        cfg = None if config is None else config if isinstance(config, dict) else str(config)
        return [export_diffusers(load_tokenizer(src, cfg, resolution), Path(out))]
    if to != "ours":
        raise CheckpointError(f"`to` must be ours or diffusers, got {to!r}")
    r = resolve_model(src, config)
    src, out, config = r.path, Path(out), (config if isinstance(config, dict) else r.config)
    if is_safetensors(src):
        raise CheckpointError(f"{src}: already in our format (nothing to convert)")
    raw = load_official_checkpoint(src)
    model_yaml, yname = read_model_yaml(config)
    info: dict[str, Any] = {"converted_from": src.name, "global_step": raw.global_step}
    if is_transformer_state(raw.state_dict):
        built = build_prior(raw.state_dict, str(src), model_yaml, yname, n_head, cond_kind,
                            n_classes, resolution, unknown_index)
        set_label_shift(built.prior, config)
        tok_path = _side_file(out, "tokenizer")
        save_tokenizer(tok_path, built.tokenizer, dict(info))
        info.update(tokenizer=tok_path.name,
                    tokenizer_sha256=weights_sha256(built.tokenizer.state_dict()))
        save_prior(out, built.prior, info)
        written = [out, tok_path]
        dropped = built.dropped
    else:
        tok = build_tokenizer(raw.state_dict, str(src), model_yaml, yname, resolution, "",
                              unknown_index)
        save_tokenizer(out, tok.model, info)
        written = [out]
        dropped = tok.dropped
    if keep_training_state:
        written.append(_save_training_state(out, dropped, raw))
    return written
