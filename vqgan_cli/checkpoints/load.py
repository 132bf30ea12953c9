"""One door for every model file: ``load_tokenizer`` / ``load_prior`` / ``convert_checkpoint``.

Both loaders take our safetensors checkpoints (self-describing: the config is in the file) and
official ``.ckpt`` files (read by :mod:`vqgan_cli.checkpoints.official.unpickler`, so no pickled code runs;
architecture from the shapes, or from the model's YAML checked against them). An official
Net2NetTransformer file also serves as a tokenizer: its ``first_stage_model`` is the image
tokenizer the prior was trained with.

``convert_checkpoint`` writes an official file in our format. Kept: the inference weights,
unchanged, so the converted model computes bit for bit what the source computes. Dropped
unless ``keep_training_state``: ``loss.*`` (discriminator, LPIPS), the display-only
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

from vqgan_cli.checkpoints.format import CheckpointError, read_weights, save_weights, weights_sha256
from vqgan_cli.checkpoints.official.common import read_model_yaml, split_prefix, strict_load
from vqgan_cli.checkpoints.official.prior import build_prior, is_transformer_state
from vqgan_cli.checkpoints.official.tokenizer import build_tokenizer, install_remap, remap_setting
from vqgan_cli.checkpoints.official.unpickler import RawCheckpoint, load_official_checkpoint
from vqgan_cli.checkpoints.resolve import label_shift_for, read_yaml_file, resolve_model
from vqgan_cli.config import ConfigError, from_dict, to_dict
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.prior import Prior, PriorConfig, build_order
from vqgan_cli.models.vqgan import VQGAN

TOKENIZER_FORMAT = "vqgan-tokenizer"
PRIOR_FORMAT = "vqgan-prior"
TRAINING_FORMAT = "vqgan-training-state"


def is_safetensors(path: str | Path) -> bool:
    """Whether a file starts like safetensors (u64 header length, then a JSON object)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
        size = p.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


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


def _our_tokenizer(state: dict[str, torch.Tensor], cfg: TokenizerConfig, unknown_index: Any,
                   prefix: str = "") -> VQGAN:
    model = VQGAN(cfg)
    if f"{prefix}quantize.used" in state:
        install_remap(model, state[f"{prefix}quantize.used"], unknown_index)
    return model


def load_tokenizer(path: str | Path, config: str | Path | dict | None = None,
                   resolution: int | None = None, *, unknown_index: int | str = "random") -> VQGAN:
    """A VQGAN in eval mode from our checkpoint or an official VQModel/GumbelVQ/transformer .ckpt.

    ``config``: the official model's YAML (path or mapping), checked against the weights.
    ``resolution``: training resolution of an official model without YAML (default 256); it
    only decides where attention layers sit. ``unknown_index``: see ``official_tokenizer``.
    A diffusers ``VQModel`` folder (ours exported, or one diffusers saved) loads too.
    """
    from vqgan_cli.checkpoints.diffusers import is_diffusers_folder, load_diffusers_tokenizer

    if is_diffusers_folder(path):
        return load_diffusers_tokenizer(path)
    r = resolve_model(path, config)
    path, config = r.path, (config if isinstance(config, dict) else r.config)
    if is_safetensors(path):
        state, cfg_dict, info = _ours(path, TOKENIZER_FORMAT, config)
        model = _our_tokenizer(state, _config(TokenizerConfig, cfg_dict, path),
                               info.get("unknown_index", unknown_index))
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
        cond_tok = None
        if cfg.cond.kind == "spatial":
            cond_tok = _our_tokenizer(state, cfg.cond.tokenizer,
                                      info.get("cond_unknown_index", unknown_index), "cond_tokenizer.")
        prior = Prior(cfg, permuter=permuter, cond_tokenizer=cond_tok)
        strict_load(prior, state, str(path))
        return prior.eval()
    raw = load_official_checkpoint(path)
    if not is_transformer_state(raw.state_dict):
        raise CheckpointError(f"{path}: no transformer.* keys: a tokenizer, not a prior "
                              "(use load_tokenizer)")
    model_yaml, yname = read_model_yaml(config)
    prior = build_prior(raw.state_dict, str(path), model_yaml, yname, n_head, cond_kind,
                        n_classes, resolution, unknown_index).prior
    _set_label_shift(prior, config)
    return prior


def _set_label_shift(prior: Prior, config: str | Path | dict | None) -> None:
    """The release's label convention for segmentation maps (its data config), on the prior."""
    tok = prior.cond_tokenizer
    if tok is not None and tok.config.modality == "segmentation":
        full = config if isinstance(config, dict) else read_yaml_file(config)
        prior.config.cond.label_shift = label_shift_for(full, tok.config.n_labels)


def save_tokenizer(path: str | Path, model: VQGAN, info: dict | None = None) -> Path:
    """Write a tokenizer in our format (atomically); the config goes into the file."""
    meta = dict(info or {})
    if (remap := remap_setting(model)) is not None:
        meta["unknown_index"] = remap
    return save_weights(path, model.state_dict(), TOKENIZER_FORMAT, to_dict(model.config), meta)


def save_prior(path: str | Path, prior: Prior, info: dict | None = None) -> Path:
    """Write a prior in our format (atomically): GPT, permuter buffers, conditioning tokenizer."""
    meta = dict(info or {})
    if prior.cond_tokenizer is not None and (remap := remap_setting(prior.cond_tokenizer)) is not None:
        meta["cond_unknown_index"] = remap
    return save_weights(path, prior.state_dict(), PRIOR_FORMAT, to_dict(prior.config), meta)


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


def _save_training_state(out: Path, dropped: dict[str, torch.Tensor], raw: RawCheckpoint) -> Path:
    tensors = {k: v.detach().clone() for k, v in dropped.items()}
    rest = {k: _flatten(v, k, tensors) for k, v in raw.extra.items()
            if k in ("optimizer_states", "lr_schedulers")}
    target = _side_file(out, "training")
    save_weights(target, tensors, TRAINING_FORMAT, {}, {"global_step": raw.global_step, **rest})
    return target


def convert_checkpoint(src: str | Path, out: str | Path, config: str | Path | dict | None = None,
                       keep_training_state: bool = False, *, n_head: int | None = None,
                       cond_kind: str | None = None, n_classes: int | None = None,
                       resolution: int | None = None, unknown_index: int | str = "random") -> Path:
    """Write an official tokenizer or transformer ``.ckpt`` in our format; returns ``out``."""
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
        _set_label_shift(built.prior, config)
        tok_path = _side_file(out, "tokenizer")
        save_tokenizer(tok_path, built.tokenizer, dict(info))
        info.update(tokenizer=tok_path.name,
                    tokenizer_sha256=weights_sha256(built.tokenizer.state_dict()))
        save_prior(out, built.prior, info)
        dropped = built.dropped
    else:
        tok = build_tokenizer(raw.state_dict, str(src), model_yaml, yname, resolution, "",
                              unknown_index)
        save_tokenizer(out, tok.model, info)
        dropped = tok.dropped
    if keep_training_state:
        _save_training_state(out, dropped, raw)
    return out
