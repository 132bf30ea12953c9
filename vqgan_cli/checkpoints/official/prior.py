"""Official Net2NetTransformer weights -> our :class:`Prior` (+ its first-stage tokenizer).

Key prefixes: ``first_stage_model.`` (the image tokenizer), ``cond_stage_model.`` (only when
conditioning is a VQ model: segmentation, depth, or the first stage itself), ``transformer.``
(minGPT) and, for non-identity orderings, ``permuter.{forward,backward}_shuffle_idx``.

From shapes: ``vocab_size`` and ``n_embd`` from ``tok_emb``, ``block_size`` from ``pos_emb``,
``n_layer`` from the block indices. ``n_head`` leaves no trace in any shape, so it comes from
the YAML or the caller. Start-token, class and coordinate conditioning have no weights either:
without a YAML a file without ``cond_stage_model.*`` is read as start-token conditioned
(``sos_token`` 0) unless the caller names the kind. Permuter buffers are compared with every
named ordering on the token grid; an order none reproduces is kept as given ("stored").
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from vqgan_cli.checkpoints.format import CheckpointError
from vqgan_cli.checkpoints.official.common import get_param, mismatch, need, split_prefix, strict_load, target_name
from vqgan_cli.checkpoints.official.tokenizer import DEFAULT_RESOLUTION, build_tokenizer, first_difference
from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.models.permuter import PERMUTERS, build_permuter
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig, StoredOrder
from vqgan_cli.models.vqgan import VQGAN

PREFIXES = ("first_stage_model.", "cond_stage_model.", "transformer.", "permuter.")
_PERMUTER_NAMES = {"Identity": "identity", "AlternateParsing": "alternate", "ZCurve": "zcurve",
                   "Subsample": "subsample", "SpiralIn": "spiral_in", "SpiralOut": "spiral_out",
                   "Random": "random"}
_P = "model.params"

# Where an official model's YAML lives, for the errors that need a setting only the YAML has.
CONFIG_HINT = ("the release keeps it in the run folder as configs/<date>-project.yaml, beside "
               "checkpoints/last.ckpt; pass it with `config` PATH")


def is_transformer_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a Net2NetTransformer's (rather than a tokenizer's)."""
    return any(k.startswith("transformer.") for k in state)


def infer_gpt_config(state: dict[str, torch.Tensor], source: str, n_head: int | None,
                     tcfg: dict | None = None, yaml_name: str = "") -> GPTConfig:
    """GPTConfig from ``transformer.*`` shapes; YAML values (``tcfg``) are checked against them."""
    p = "transformer."
    tok = need(state, "tok_emb.weight", source, p, 2)
    pos = need(state, "pos_emb", source, p, 3)
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: transformer blocks {layers} are not 0..n-1")
    vocab, n_embd, block = tok.shape[0], tok.shape[1], pos.shape[1]
    for i in layers:
        mask = state.get(f"blocks.{i}.attn.mask")
        if mask is not None and not mask.is_meta and mask.shape[-1] == block and not torch.equal(
                mask.reshape(block, block).bool(), torch.ones(block, block).tril().bool()):
            raise CheckpointError(f"{source}: key {p}blocks.{i}.attn.mask is not a causal mask "
                                  "(n_unmasked > 0 is not supported)")
    t = get_param(tcfg, "params", {}) or {}
    where = f"{_P}.transformer_config.params"
    for key, value, ev in (("vocab_size", vocab, "tok_emb.weight"), ("n_embd", n_embd, "tok_emb.weight"),
                           ("block_size", block, "pos_emb"), ("n_layer", len(layers), "blocks.*")):
        if t.get(key) is not None and t[key] != value:
            e = mismatch(yaml_name, f"{where}.{key}", t[key], value, p + ev)
            raise CheckpointError(str(e) + _gpt_clash(state, vocab, n_embd, block, len(layers), key, t[key]))
    if t.get("n_unmasked", 0):
        raise CheckpointError(f"{yaml_name}: {where}.n_unmasked={t['n_unmasked']} is not supported")
    heads = t.get("n_head", n_head)
    if n_head is not None and heads != n_head:
        raise mismatch(yaml_name, f"{where}.n_head", heads, n_head, "n_head option")
    if heads is None:
        raise CheckpointError(f"{source}: n_head cannot be read from tensor shapes; it needs the "
                              f"model's YAML: {CONFIG_HINT} (in Python: config=... or n_head=...)")
    if n_embd % int(heads):
        raise CheckpointError(f"{source}: n_embd {n_embd} (transformer.tok_emb.weight) is not a "
                              f"multiple of n_head {heads}")
    return GPTConfig(vocab_size=vocab, block_size=block, n_layer=len(layers), n_head=int(heads),
                     n_embd=n_embd, embd_pdrop=float(t.get("embd_pdrop", 0.0)),
                     resid_pdrop=float(t.get("resid_pdrop", 0.0)),
                     attn_pdrop=float(t.get("attn_pdrop", 0.0)))


def _gpt_clash(state: dict[str, torch.Tensor], vocab: int, n_embd: int, block: int, n_layer: int,
               key: str, yaml_value: Any) -> str:
    """The first key where the GPT the YAML describes differs from the weights, both shapes."""
    try:
        values = {"vocab_size": vocab, "n_embd": n_embd, "block_size": block, "n_layer": n_layer}
        values[key] = int(yaml_value)
        with torch.device("meta"):
            gpt = GPT(GPTConfig(n_head=1, **values))
        return first_difference(gpt, state, "transformer.")
    except Exception:  # noqa: BLE001 - a YAML too broken to build: the message above says enough
        return ""


def _grid(n: int, resolution: int, factor: int) -> tuple[int, int] | None:
    side = resolution // factor
    if side * side == n:
        return side, side
    root = math.isqrt(n)
    return (root, root) if root * root == n else None


def identify_permuter(fwd: torch.Tensor, bwd: torch.Tensor, grid: tuple[int, int] | None) -> str:
    """The name of the ordering these buffers hold on ``grid``, or ``"stored"``."""
    if grid is None:
        return "stored"
    for name in PERMUTERS:
        if name == "identity":
            continue
        try:
            p = build_permuter(name, *grid)
        except ValueError:
            continue
        if torch.equal(p.forward_shuffle_idx, fwd.long()) and torch.equal(
                p.backward_shuffle_idx, bwd.long()):
            return name
    return "stored"


def _cond_from_yaml(params: dict, yaml_name: str) -> CondConfig:
    node = params.get("cond_stage_config")
    key = params.get("cond_stage_key", "depth")
    sos = int(params.get("sos_token", 0))
    if params.get("unconditional") or node == "__is_unconditional__":
        return CondConfig(kind="sos", sos_token=sos, key=params.get("first_stage_key", "image"))
    if node == "__is_first_stage__":
        return CondConfig(kind="spatial", key=key)
    name, cp = target_name(node), get_param(node, "params", {}) or {}
    if name == "SOSProvider":
        return CondConfig(kind="sos", sos_token=int(cp.get("sos_token", sos)), key=key)
    if name == "Labelator":
        return CondConfig(kind="class", n_classes=int(cp["n_classes"]), key=key)
    if name == "CoordStage":
        return CondConfig(kind="coord", coord_n_embed=int(cp["n_embed"]),
                          coord_down_factor=int(cp["down_factor"]), key=key)
    if name in ("VQModel", "VQSegmentationModel", "GumbelVQ", "VQNoDiscModel"):
        return CondConfig(kind="spatial", key=key)
    if name == "DummyCondStage":
        raise CheckpointError(f"{yaml_name}: {_P}.cond_stage_config is DummyCondStage (key "
                              f"{key!r}): a scene-image transformer conditioned on object bounding "
                              "boxes, which is not supported yet")
    raise CheckpointError(f"{yaml_name}: {_P}.cond_stage_config target {name!r} is not supported")


class OfficialPrior(NamedTuple):
    """An imported prior, the first-stage tokenizer it was trained with, and what was dropped."""

    prior: Prior
    tokenizer: VQGAN
    dropped: dict[str, torch.Tensor]


def build_prior(state: dict[str, torch.Tensor], source: str, model_yaml: dict | None = None,
                yaml_name: str = "", n_head: int | None = None, cond_kind: str | None = None,
                n_classes: int | None = None, resolution: int | None = None,
                unknown_index: int | str = "random") -> OfficialPrior:
    """Build and strictly load a Prior (and its tokenizer) from a Net2NetTransformer state dict."""
    stray = sorted(k for k in state if not k.startswith(PREFIXES))
    if stray:
        raise CheckpointError(f"{source}: unexpected key(s) {', '.join(stray[:6])} "
                              "(a Net2NetTransformer has only " + ", ".join(PREFIXES) + " keys)")
    params: dict[str, Any] = (model_yaml or {}).get("params") or {}
    yname = yaml_name or source
    fs_yaml = params.get("first_stage_config") if model_yaml else None
    first = build_tokenizer(split_prefix(state, "first_stage_model."), source,
                            fs_yaml if isinstance(fs_yaml, dict) else None, yname, resolution,
                            "first_stage_model.", unknown_index,
                            f"{_P}.first_stage_config.params")
    dropped = {"first_stage_model." + k: v for k, v in first.dropped.items()}

    has_cond_weights = any(k.startswith("cond_stage_model.") for k in state)
    if model_yaml is not None:
        cond = _cond_from_yaml(params, yname)
        if (cond.kind == "spatial") != has_cond_weights:
            raise CheckpointError(
                f"{yname}: {_P}.cond_stage_config describes {cond.kind} conditioning but the "
                f"weights {'have' if has_cond_weights else 'have no'} cond_stage_model.* keys")
        if cond_kind is not None and cond_kind != cond.kind:
            raise mismatch(yname, f"{_P}.cond_stage_config", cond.kind, cond_kind, "cond_kind option")
    elif has_cond_weights:
        if cond_kind not in (None, "spatial"):
            raise CheckpointError(f"{source}: cond_kind={cond_kind!r} but the weights hold a "
                                  "conditioning tokenizer (cond_stage_model.* keys)")
        cond = CondConfig(kind="spatial")
    else:
        kind = cond_kind or "sos"
        if kind not in ("sos", "class"):
            raise CheckpointError(f"{source}: {kind} conditioning without weights needs the "
                                  f"model's YAML: {CONFIG_HINT} (in Python: config=...)")
        cond = CondConfig(kind=kind, n_classes=n_classes if kind == "class" else None)

    gpt_cfg = infer_gpt_config(split_prefix(state, "transformer."), source, n_head,
                               params.get("transformer_config"), yname)
    if cond.kind == "class" and cond.n_classes is None:
        cond.n_classes = gpt_cfg.vocab_size  # any class index below the vocabulary is a token
    cond_tok = None
    if cond.kind == "spatial":
        node = params.get("cond_stage_config")
        cs_yaml = node if isinstance(node, dict) else \
            fs_yaml if node == "__is_first_stage__" and isinstance(fs_yaml, dict) else None
        built = build_tokenizer(split_prefix(state, "cond_stage_model."), source, cs_yaml, yname,
                                resolution if cs_yaml is None else None,
                                "cond_stage_model.", unknown_index,
                                f"{_P}.cond_stage_config.params")
        cond_tok = built.model
        cond.tokenizer = cond_tok.config
        cond.downsample_size = int(params.get("downsample_cond_size", -1))
        dropped.update({"cond_stage_model." + k: v for k, v in built.dropped.items()})
    for name, tok in (("first_stage_model", first.model), ("cond_stage_model", cond_tok)):
        if tok is not None and tok.n_tokens > gpt_cfg.vocab_size:
            raise CheckpointError(f"{source}: {name} emits {tok.n_tokens} tokens but "
                                  f"transformer.tok_emb.weight has only {gpt_cfg.vocab_size} rows")

    fs_cfg = first.model.config.autoencoder
    res = fs_cfg.resolution if resolution is None else resolution
    perm_state = split_prefix(state, "permuter.")
    yaml_perm = params.get("permuter_config")
    yaml_perm_name = _PERMUTER_NAMES.get(target_name(yaml_perm)) if yaml_perm else None
    if yaml_perm and yaml_perm_name is None:
        raise CheckpointError(f"{yname}: {_P}.permuter_config target {target_name(yaml_perm)!r} "
                              "is not supported")
    grid = None
    if perm_state:
        need(perm_state, "forward_shuffle_idx", source, "permuter.", 1)
        fwd = perm_state["forward_shuffle_idx"]
        bwd = need(perm_state, "backward_shuffle_idx", source, "permuter.", 1)
        pp = get_param(yaml_perm, "params", {}) or {}
        grid = (int(pp["H"]), int(pp["W"])) if "H" in pp and "W" in pp else \
            _grid(fwd.numel(), res or DEFAULT_RESOLUTION, first.model.factor)
        perm_name = identify_permuter(fwd, bwd, grid)
        if yaml_perm_name is not None and yaml_perm_name != perm_name:
            raise mismatch(yname, f"{_P}.permuter_config.target", target_name(yaml_perm),
                           perm_name, "permuter.forward_shuffle_idx")
        permuter = build_permuter(perm_name, *grid) if perm_name != "stored" \
            else StoredOrder(fwd, bwd)
    else:
        if yaml_perm_name not in (None, "identity"):
            raise CheckpointError(f"{source}: missing key permuter.forward_shuffle_idx "
                                  f"({_P}.permuter_config names {target_name(yaml_perm)})")
        perm_name, permuter = "identity", build_permuter("identity", 1, 1)
        side = res // first.model.factor
        grid = (side, side)

    cfg = PriorConfig(gpt=gpt_cfg, cond=cond, grid=grid, permuter=perm_name,
                      first_stage_key=str(params.get("first_stage_key", "image")),
                      pkeep=float(params.get("pkeep", 1.0)))
    prior = Prior(cfg, permuter=permuter, cond_tokenizer=cond_tok)
    strict_load(prior.gpt, split_prefix(state, "transformer."), source, "transformer.")
    strict_load(prior.permuter, perm_state, source, "permuter.")
    return OfficialPrior(prior.eval(), first.model, dropped)
