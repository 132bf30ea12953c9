"""Loading and saving both stages: ``load_tokenizer`` / ``load_prior`` / ``save_*``.

Both loaders take our safetensors checkpoints (self-describing: the config is in the file) and
official ``.ckpt`` files (read by :mod:`vqgan_cli.checkpoints.official.unpickler`, so no pickled code runs;
architecture from the shapes, or from the model's YAML checked against them). An official
Net2NetTransformer file also serves as a tokenizer: its ``first_stage_model`` is the image
tokenizer the prior was trained with. Writing an official file in our format:
:mod:`vqgan_cli.checkpoints.convert`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vqgan_cli.checkpoints.format import CheckpointError, is_safetensors, read_weights, save_weights
from vqgan_cli.checkpoints.official.common import read_model_yaml, split_prefix, strict_load
from vqgan_cli.checkpoints.official.prior import build_prior, is_transformer_state
from vqgan_cli.checkpoints.official.tokenizer import build_tokenizer
from vqgan_cli.checkpoints.official.unpickler import load_official_checkpoint
from vqgan_cli.checkpoints.resolve import label_shift_for, read_yaml_file, resolve_model
from vqgan_cli.config import ConfigError, from_dict, to_dict
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.prior import Prior, PriorConfig, build_order
from vqgan_cli.models.vqgan import VQGAN

TOKENIZER_FORMAT = "vqgan-tokenizer"
PRIOR_FORMAT = "vqgan-prior"
TRAINING_FORMAT = "vqgan-training-state"


def _ours(path: Path, fmt: str, config: Any) -> tuple[dict[str, torch.Tensor], dict, dict]:
    w = read_weights(path)
    if w.format != fmt:
        other = "load_prior" if w.format == PRIOR_FORMAT else "load_tokenizer"
        raise CheckpointError(f"{path}: a {w.format!r} checkpoint, not {fmt!r} (use {other})")
    if config is not None:
        raise CheckpointError(f"{path}: our checkpoints carry their own config; do not pass one")
    return w.state_dict, w.config, w.info


def _config(cls: type, data: dict, path: Path) -> Any:
    try:
        return from_dict(cls, data, str(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid stored config: " + "; ".join(e.problems)) from None


def _legacy_remap(cfg: TokenizerConfig, state: dict[str, torch.Tensor], unknown_index: Any,
                  prefix: str = "") -> TokenizerConfig:
    """Files written before the remap was a quantizer option: ``quantize.used`` without
    ``n_used`` in the config, ``unknown_index`` in ``info``."""
    used = state.get(f"{prefix}quantize.used")
    if used is None or cfg.quantizer.n_used is not None:
        return cfg
    q = replace(cfg.quantizer, n_used=used.numel(), unknown_index=unknown_index)
    return replace(cfg, quantizer=q)


def load_tokenizer(path: str | Path, config: str | Path | dict | None = None,
                   resolution: int | None = None, *, unknown_index: int | str = "random") -> VQGAN:
    """A VQGAN in eval mode from our checkpoint or an official VQModel/GumbelVQ/transformer .ckpt.

    ``config``: the official model's YAML (path or mapping), checked against the weights.
    ``resolution``: training resolution of an official model without YAML (default 256); it
    only decides where attention layers sit. ``unknown_index``: the token of a code an official
    remapped tokenizer's table lacks (see :mod:`vqgan_cli.models.quantizers`).
    A diffusers ``VQModel`` folder (ours exported, or one diffusers saved) loads too.
    """
    from vqgan_cli.checkpoints.diffusers import is_diffusers_folder, load_diffusers_tokenizer

    if is_diffusers_folder(path):
        return load_diffusers_tokenizer(path)
    r = resolve_model(path, config)
    path, config = r.path, (config if isinstance(config, dict) else r.config)
    if is_safetensors(path):
        state, cfg_dict, info = _ours(path, TOKENIZER_FORMAT, config)
        cfg = _legacy_remap(_config(TokenizerConfig, cfg_dict, path), state,
                            info.get("unknown_index", unknown_index))
        model = VQGAN(cfg)
        strict_load(model, state, str(path))
        return model.eval()
    raw = load_official_checkpoint(path)
    model_yaml, yname = read_model_yaml(config)
    state, prefix, yaml_path = raw.state_dict, "", "model.params"
    if is_transformer_state(state):
        state, prefix = split_prefix(state, "first_stage_model."), "first_stage_model."
        yaml_path = "model.params.first_stage_config.params"
        if model_yaml is not None:
            model_yaml = (model_yaml.get("params") or {}).get("first_stage_config")
            if not isinstance(model_yaml, dict):
                raise CheckpointError(f"{yname}: model.params.first_stage_config is missing")
    return build_tokenizer(state, str(path), model_yaml, yname, resolution, prefix,
                           unknown_index, yaml_path).model


def load_prior(path: str | Path, config: str | Path | dict | None = None, *,
               n_head: int | None = None, cond_kind: str | None = None,
               n_classes: int | None = None, resolution: int | None = None,
               unknown_index: int | str = "random") -> Prior:
    """A Prior in eval mode from our checkpoint or an official Net2NetTransformer .ckpt.

    Official files without YAML need ``n_head`` (no shape carries it) and, for class
    conditioning, ``cond_kind="class"`` (start-token and class conditioning look alike).
    """
    r = resolve_model(path, config)
    path, config = r.path, (config if isinstance(config, dict) else r.config)
    if is_safetensors(path):
        state, cfg_dict, info = _ours(path, PRIOR_FORMAT, config)
        cfg: PriorConfig = _config(PriorConfig, cfg_dict, path)
        try:
            permuter = build_order(cfg, state)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if cfg.cond.kind == "spatial" and cfg.cond.tokenizer is not None:
            cfg.cond.tokenizer = _legacy_remap(cfg.cond.tokenizer, state,
                                               info.get("cond_unknown_index", unknown_index),
                                               "cond_tokenizer.")
        prior = Prior(cfg, permuter=permuter)
        strict_load(prior, state, str(path))
        return prior.eval()
    raw = load_official_checkpoint(path)
    if not is_transformer_state(raw.state_dict):
        raise CheckpointError(f"{path}: no transformer.* keys: a tokenizer, not a prior "
                              "(use load_tokenizer)")
    model_yaml, yname = read_model_yaml(config)
    prior = build_prior(raw.state_dict, str(path), model_yaml, yname, n_head, cond_kind,
                        n_classes, resolution, unknown_index).prior
    set_label_shift(prior, config)
    return prior


def set_label_shift(prior: Prior, config: str | Path | dict | None) -> None:
    """The release's label convention for segmentation maps (its data config), on the prior."""
    tok = prior.cond_tokenizer
    if tok is not None and tok.config.modality == "segmentation":
        full = config if isinstance(config, dict) else read_yaml_file(config)
        prior.config.cond.label_shift = label_shift_for(full, tok.config.n_labels)


def save_tokenizer(path: str | Path, model: VQGAN, info: dict | None = None) -> Path:
    """Write a tokenizer in our format (atomically); the config goes into the file."""
    return save_weights(path, model.state_dict(), TOKENIZER_FORMAT, to_dict(model.config), dict(info or {}))


def save_prior(path: str | Path, prior: Prior, info: dict | None = None) -> Path:
    """Write a prior in our format (atomically): GPT, permuter buffers, conditioning tokenizer."""
    return save_weights(path, prior.state_dict(), PRIOR_FORMAT, to_dict(prior.config), dict(info or {}))
