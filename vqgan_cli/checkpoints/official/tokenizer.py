"""Official VQModel / GumbelVQ / segmentation / depth weights -> our :class:`VQGAN`.

Every architecture value is read off the tensor shapes (PAPER.md, "Checkpoint layout"):
``ch`` and ``in_channels`` from ``encoder.conv_in``, ``ch_mult`` from each level's first block,
``num_res_blocks`` from the block indices, attention levels from which ``down.{i}.attn`` exist,
``z_channels`` from ``encoder.conv_out``, ``embed_dim`` from ``quant_conv``, ``n_embed`` from the
codebook, Gumbel from ``quantize.proj``. The one value shapes cannot carry is the training
resolution, which only decides *where* attention sits: ``attn_resolutions`` are stated as
``resolution / 2^level`` (resolution 256 unless the YAML or caller says otherwise). When the
model's YAML is given its values are used, but each is checked against the shapes first.

``quantize.used`` (the reference's ``remap``) sets the quantizer's ``n_used`` to its length and
``unknown_index`` to the caller's choice; the quantizer does the remapping
(:mod:`vqgan_cli.models.quantizers`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from vqgan_cli.checkpoints.format import CheckpointError
from vqgan_cli.checkpoints.official.common import (
    drop_training_keys,
    get_param,
    mismatch,
    need,
    strict_load,
    target_name,
)
from vqgan_cli.config import ConfigError, from_dict, to_dict
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN

DEFAULT_RESOLUTION = 256
REFERENCE_GUMBEL_KL = 1e-8  # GumbelVQ's default and the released f8 value


def _level_ids(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


class _Shapes(NamedTuple):
    """What the weights say, with the key behind each value (for error messages)."""

    ae: AutoencoderConfig
    kind: str
    n_embed: int
    embed_dim: int
    attn_levels: tuple[int, ...]
    n_labels: int | None


def _read_shapes(state: dict[str, torch.Tensor], source: str, prefix: str,
                 resolution: int) -> _Shapes:
    def get(key: str, ndim: int | None = None) -> torch.Tensor:
        return need(state, key, source, prefix, ndim)

    conv_in = get("encoder.conv_in.weight", 4)
    ch, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels = _level_ids(state, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels {levels} are not 0..n-1 "
                              f"(keys {prefix}encoder.down.*)")
    ch_mult = []
    for i in levels:
        width = get(f"encoder.down.{i}.block.0.conv1.weight", 4).shape[0]
        if width % ch:
            raise CheckpointError(f"{source}: key {prefix}encoder.down.{i}.block.0.conv1.weight "
                                  f"has {width} channels, not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    n_blocks = len(_level_ids(state, r"encoder\.down\.0\.block\.(\d+)\."))
    enc_attn = tuple(i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in state))
    dec_attn = tuple(i for i in levels if any(k.startswith(f"decoder.up.{i}.attn.") for k in state))
    if enc_attn != dec_attn:
        raise CheckpointError(f"{source}: encoder attention at levels {list(enc_attn)} but decoder "
                              f"at {list(dec_attn)} (keys {prefix}encoder.down.*.attn / "
                              f"{prefix}decoder.up.*.attn); the architecture puts both at the "
                              "same resolutions")
    factor = 2 ** (len(levels) - 1)
    if resolution % factor:
        raise CheckpointError(f"{source}: resolution {resolution} is not a multiple of the "
                              f"downsampling factor {factor} read from the weights")
    z_channels = get("encoder.conv_out.weight", 4).shape[0]
    dec_z = get("decoder.conv_in.weight", 4).shape[1]
    if dec_z != z_channels:
        raise CheckpointError(f"{source}: key {prefix}decoder.conv_in.weight takes {dec_z} channels "
                              f"but encoder.conv_out gives {z_channels} (double_z is not a VQ layout)")
    out_channels = get("decoder.conv_out.weight", 4).shape[0]
    embed_dim = get("quant_conv.weight", 4).shape[0]
    if "quantize.embedding.weight" in state:
        kind, n_embed = "vq", get("quantize.embedding.weight", 2).shape[0]
    elif "quantize.embed.weight" in state:
        kind, n_embed = "gumbel", get("quantize.embed.weight", 2).shape[0]
    else:
        raise CheckpointError(f"{source}: missing key {prefix}quantize.embedding.weight "
                              f"(or {prefix}quantize.embed.weight for GumbelVQ)")
    # segmentation: the display-only colorize buffer names the label count; otherwise any
    # channel count other than RGB (3) or depth (1) can only be one-hot labels
    colorize = state.get("colorize")
    n_labels = None
    if colorize is not None and colorize.ndim == 4 and colorize.shape[1] == in_channels:
        n_labels = in_channels
    elif in_channels == out_channels and in_channels not in (1, 3):
        n_labels = in_channels
    ae = AutoencoderConfig(
        ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=n_blocks,
        attn_resolutions=tuple(resolution // 2 ** i for i in enc_attn),
        in_channels=in_channels, out_channels=out_channels, resolution=resolution,
        z_channels=z_channels, dropout=0.0)
    return _Shapes(ae, kind, n_embed, embed_dim, enc_attn, n_labels)


def _modality(s: _Shapes, segmentation: bool = False) -> tuple[str, int | None]:
    if segmentation or s.n_labels is not None:
        return "segmentation", s.n_labels if s.n_labels is not None else s.ae.in_channels
    if s.ae.in_channels == 1 and s.ae.out_channels == 1:
        return "depth", None
    return "image", None


def _make_config(modality: str, n_labels: int | None, ae: AutoencoderConfig,
                 qc: QuantizerConfig, source: str) -> TokenizerConfig:
    cfg = TokenizerConfig(modality=modality, n_labels=n_labels, autoencoder=ae, quantizer=qc)
    try:  # round trip through the recipe checker, so bad values get its messages
        return from_dict(TokenizerConfig, to_dict(cfg), source)
    except ConfigError as e:
        raise CheckpointError(f"{source}: the weights describe an unsupported tokenizer: "
                              + "; ".join(e.problems)) from None


def infer_tokenizer_config(state: dict[str, torch.Tensor], source: str = "<state_dict>",
                           resolution: int | None = None, prefix: str = "") -> TokenizerConfig:
    """The tokenizer config implied by an official VQModel/GumbelVQ state dict's shapes."""
    s = _read_shapes(state, source, prefix, resolution or DEFAULT_RESOLUTION)
    modality, n_labels = _modality(s)
    qc = QuantizerConfig(kind=s.kind, n_embed=s.n_embed, embed_dim=s.embed_dim)
    if s.kind == "gumbel":
        qc = replace(qc, kl_weight=REFERENCE_GUMBEL_KL)
    return _make_config(modality, n_labels, s.ae, qc, source)


_AE_FIELDS = {"ddconfig.ch": "ch", "ddconfig.in_channels": "in_channels", "ddconfig.out_ch": "out_channels",
              "ddconfig.ch_mult": "ch_mult", "ddconfig.num_res_blocks": "num_res_blocks",
              "ddconfig.z_channels": "z_channels", "ddconfig.attn_resolutions": "attn_resolutions"}
_Q_FIELDS = {"embed_dim": "embed_dim", "n_embed": "n_embed"}


def first_difference(model: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> str:
    """The first key where a model built from the YAML and the weights differ, both shapes."""
    for k, v in model.state_dict().items():
        if k not in state:
            return f"; first key that differs: {prefix}{k} {tuple(v.shape)} from the YAML is not in the weights"
        if tuple(state[k].shape) != tuple(v.shape):
            return (f"; first key that differs: {prefix}{k} has shape {tuple(state[k].shape)} in the "
                    f"weights, {tuple(v.shape)} from the YAML")
    return ""


def _shape_clash(s: _Shapes, key: str, yaml_value: Any, state: dict[str, torch.Tensor], prefix: str) -> str:
    """:func:`first_difference` for a tokenizer whose one YAML value ``key`` replaces the shapes'."""
    try:
        ae, q = s.ae, {"kind": s.kind, "n_embed": s.n_embed, "embed_dim": s.embed_dim}
        value = tuple(int(v) for v in yaml_value) if isinstance(yaml_value, (list, tuple)) else int(yaml_value)
        if key in _AE_FIELDS:
            ae = replace(ae, **{_AE_FIELDS[key]: value})
        elif key in _Q_FIELDS:
            q[_Q_FIELDS[key]] = value
        else:
            return ""
        modality, n_labels = _modality(s)
        if modality == "segmentation":
            n_labels = ae.in_channels
        with torch.device("meta"):
            model = VQGAN(TokenizerConfig(modality=modality, n_labels=n_labels, autoencoder=ae,
                                          quantizer=QuantizerConfig(**q)))
        return first_difference(model, state, prefix)
    except Exception:  # noqa: BLE001 - a YAML too broken to build: the message above says enough
        return ""


def tokenizer_config_from_yaml(model_yaml: dict, state: dict[str, torch.Tensor], source: str,
                               yaml_name: str, resolution: int | None = None, prefix: str = "",
                               yaml_path: str = "model.params") -> TokenizerConfig:
    """The YAML's tokenizer config, after checking every value against the tensor shapes."""
    params = model_yaml.get("params") or {}
    dd = get_param(params, "ddconfig")
    if not isinstance(dd, dict):
        raise CheckpointError(f"{yaml_name}: {yaml_path}.ddconfig is missing")
    res = int(dd.get("resolution", resolution or DEFAULT_RESOLUTION))
    if resolution is not None and resolution != res:
        raise CheckpointError(f"{yaml_name}: {yaml_path}.ddconfig.resolution is {res} but "
                              f"resolution={resolution} was asked for")
    s = _read_shapes(state, source, prefix, res)

    def check(key: str, yaml_value: Any, weights_value: Any, evidence: str) -> None:
        if yaml_value is not None and yaml_value != weights_value:
            e = mismatch(yaml_name, f"{yaml_path}.{key}", yaml_value, weights_value, evidence)
            raise CheckpointError(str(e) + _shape_clash(s, key, yaml_value, state, prefix)) from None

    p = prefix
    check("ddconfig.ch", dd.get("ch"), s.ae.ch, f"{p}encoder.conv_in.weight")
    check("ddconfig.in_channels", dd.get("in_channels"), s.ae.in_channels, f"{p}encoder.conv_in.weight")
    check("ddconfig.out_ch", dd.get("out_ch"), s.ae.out_channels, f"{p}decoder.conv_out.weight")
    ch_mult = dd.get("ch_mult")
    check("ddconfig.ch_mult", list(ch_mult) if ch_mult is not None else None, list(s.ae.ch_mult),
          f"{p}encoder.down.*.block.0.conv1.weight")
    check("ddconfig.num_res_blocks", dd.get("num_res_blocks"), s.ae.num_res_blocks,
          f"{p}encoder.down.0.block.*")
    check("ddconfig.z_channels", dd.get("z_channels"), s.ae.z_channels, f"{p}encoder.conv_out.weight")
    if dd.get("double_z"):
        raise mismatch(yaml_name, f"{yaml_path}.ddconfig.double_z", True, False,
                       f"{p}encoder.conv_out.weight has z_channels outputs")
    level_res = [res // 2 ** i for i in range(len(s.ae.ch_mult))]
    yaml_attn = dd.get("attn_resolutions")
    if yaml_attn is not None:
        effective = sorted({int(r) for r in yaml_attn if r in level_res}, reverse=True)
        check("ddconfig.attn_resolutions", effective, sorted(s.ae.attn_resolutions, reverse=True),
              f"{p}encoder.down.*.attn at resolution {res}")
    check("embed_dim", params.get("embed_dim"), s.embed_dim, f"{p}quant_conv.weight")
    if "target" in model_yaml and (target_name(model_yaml) == "GumbelVQ") != (s.kind == "gumbel"):
        raise mismatch(yaml_name, "model.target" if yaml_path == "model.params" else
                       f"{yaml_path.rsplit('.', 1)[0]}.target", model_yaml["target"],
                       "a GumbelVQ" if s.kind == "gumbel" else "a VQModel",
                       f"{p}quantize.* keys")
    kind = s.kind
    codebook = "quantize.embed.weight" if s.kind == "gumbel" else "quantize.embedding.weight"
    check("n_embed", params.get("n_embed"), s.n_embed, f"{p}{codebook}")
    segmentation = target_name(model_yaml) == "VQSegmentationModel" or "n_labels" in params
    modality, n_labels = _modality(s, segmentation)
    check("n_labels", params.get("n_labels"), n_labels, f"{p}encoder.conv_in.weight")
    ae = replace(s.ae, dropout=float(dd.get("dropout", 0.0)),
                 attn_resolutions=tuple(int(r) for r in (yaml_attn if yaml_attn is not None
                                                          else s.ae.attn_resolutions)))
    qc = QuantizerConfig(kind=kind, n_embed=s.n_embed, embed_dim=s.embed_dim)
    if kind == "gumbel":
        qc = replace(qc, kl_weight=float(params.get("kl_weight", REFERENCE_GUMBEL_KL)))
    return _make_config(modality, n_labels, ae, qc, yaml_name)


class OfficialTokenizer(NamedTuple):
    """An imported tokenizer and the entries deliberately left out of it."""

    model: VQGAN
    dropped: dict[str, torch.Tensor]  # loss.* (training only) and colorize (display only)


def build_tokenizer(state: dict[str, torch.Tensor], source: str, model_yaml: dict | None = None,
                    yaml_name: str = "", resolution: int | None = None, prefix: str = "",
                    unknown_index: int | str = "random",
                    yaml_path: str = "model.params") -> OfficialTokenizer:
    """Build and strictly load a VQGAN from an official (unprefixed) tokenizer state dict."""
    weights, dropped = drop_training_keys(state)
    if model_yaml is not None:
        cfg = tokenizer_config_from_yaml(model_yaml, weights, source, yaml_name or source,
                                         resolution, prefix, yaml_path)
    else:
        cfg = infer_tokenizer_config(weights, source, resolution, prefix)
    if "quantize.used" in weights:
        remap = replace(cfg.quantizer, n_used=weights["quantize.used"].numel(), unknown_index=unknown_index)
        cfg = replace(cfg, quantizer=remap)
    model = VQGAN(cfg)
    strict_load(model, weights, source, prefix)
    return OfficialTokenizer(model.eval(), dropped)
