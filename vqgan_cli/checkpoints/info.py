"""``vqgan info PATH``: what a checkpoint or run folder is, and the commands that take it.

Everything is read through the same loaders every command uses (:mod:`vqgan_cli.checkpoints.load` via
:func:`vqgan_cli.checkpoints.resolve.resolve_model`), so what ``info`` says is what ``sample`` will load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vqgan_cli.checkpoints.format import CheckpointError, is_safetensors, read_weights
from vqgan_cli.models.prior import Prior
from vqgan_cli.models.vqgan import VQGAN


def _params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def tokenizer_summary(tok: VQGAN) -> dict[str, Any]:
    cfg = tok.config
    ae, q = cfg.autoencoder, cfg.quantizer
    out: dict[str, Any] = {
        "modality": cfg.modality,
        "architecture": {"ch": ae.ch, "ch_mult": list(ae.ch_mult), "num_res_blocks": ae.num_res_blocks,
                         "attn_resolutions": list(ae.attn_resolutions), "z_channels": ae.z_channels,
                         "in_channels": ae.in_channels, "resolution": ae.resolution, "factor": tok.factor},
        "codebook": {"quantizer": q.kind, "n_embed": q.n_embed, "embed_dim": q.embed_dim,
                     "tokens": tok.n_tokens},
        "parameters": _params(tok),
    }
    if q.n_used is not None:
        out["codebook"]["remap"] = f"{q.n_used} used entries (quantize.used)"
    if cfg.modality == "segmentation":
        out["n_labels"] = cfg.n_labels
    return out


def conditioning_summary(prior: Prior) -> dict[str, Any]:
    c = prior.cond
    out: dict[str, Any] = {"kind": c.kind}
    if c.kind == "sos":
        out.update(input="none (unconditional)", sos_token=c.sos_token, vocabulary=1)
    elif c.kind == "class":
        out.update(input="--class N", n_classes=c.n_classes, vocabulary=c.n_classes)
    elif c.kind == "coord":
        out.update(input="none (coordinates of the sample size)", n_embed=c.coord_n_embed,
                   down_factor=c.coord_down_factor, vocabulary=(c.coord_n_embed or 0) + 1)
    elif c.kind == "labels":
        out.update(input="--cond labels.png", n_labels=c.n_labels, label_factor=c.label_factor,
                   vocabulary=c.n_labels)
    elif prior.cond_tokenizer is not None:
        t = tokenizer_summary(prior.cond_tokenizer)
        modality = t["modality"]
        out.update(input={"segmentation": "--cond seg.png", "depth": "--cond depth.png"}.get(
            modality, "--cond image.png"), modality=modality, vocabulary=t["codebook"]["tokens"],
            tokenizer=t)
        if modality == "segmentation":
            out.update(n_labels=t["n_labels"], label_shift=c.label_shift)
        if c.lowres_factor:
            out["lowres_factor"] = c.lowres_factor
    return out


def describe(path: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """A JSON-able description of a checkpoint file or run folder."""
    from vqgan_cli.checkpoints.load import PRIOR_FORMAT, load_prior, load_tokenizer
    from vqgan_cli.checkpoints.official.prior import is_transformer_state
    from vqgan_cli.checkpoints.official.unpickler import load_official_checkpoint
    from vqgan_cli.checkpoints.resolve import resolve_model

    r = resolve_model(path, config)
    ours = is_safetensors(r.path)
    info: dict[str, Any] = {"path": str(path), "checkpoint": str(r.path),
                            "format": "vqgan safetensors" if ours else "official .ckpt (Lightning)",
                            "config": {"path": str(r.config) if r.config else None, "from": r.origin}}
    if ours:
        w = read_weights(r.path)
        is_prior = w.format == PRIOR_FORMAT
        if w.info.get("converted_from"):
            info["converted_from"] = w.info["converted_from"]
    else:
        raw = load_official_checkpoint(r.path)
        is_prior = is_transformer_state(raw.state_dict)
        info["global_step"] = raw.global_step
    name = str(path)
    if not is_prior:
        tok = load_tokenizer(r.path, r.config)
        info.update(kind=f"{tok.config.modality} tokenizer", tokenizer=tok_summary_with(tok))
        info["commands"] = [f"vqgan reconstruct IMAGES --tokenizer {name}",
                            f"vqgan encode-dataset --tokenizer {name} --data DATA --out SHARDS"]
        if tok.config.modality != "image":
            info["commands"] = [f"vqgan encode-dataset --cond-tokenizer {name} ..."]
        if not ours:
            info["commands"].append(f"vqgan convert {name} OUT.safetensors")
        return info
    n_head_known = True
    try:
        prior = load_prior(r.path, r.config)
    except CheckpointError as e:
        if ours or r.config is not None or "n_head cannot be read" not in str(e):
            raise
        prior, n_head_known = load_prior(r.path, None, n_head=1), False
    g = prior.config.gpt
    info["kind"] = f"transformer prior ({prior.cond.kind} conditioning)"
    info["architecture"] = {"n_layer": g.n_layer, "n_head": g.n_head if n_head_known else None,
                            "n_embd": g.n_embd, "block_size": g.block_size, "vocab_size": g.vocab_size,
                            "order": prior.config.permuter,
                            "grid": list(prior.config.grid) if prior.config.grid else None}
    info["conditioning"] = conditioning_summary(prior)
    info["parameters"] = _params(prior.gpt, prior.cond_tokenizer)
    if not n_head_known:
        info["missing"] = ("n_head (and any YAML-only setting) needs the model's YAML: pass "
                           "--config PATH (releases keep it in configs/<date>-project.yaml)")
    if not ours:
        first = load_tokenizer(r.path, r.config)
        info["first_stage"] = tok_summary_with(first)
        info["parameters_with_first_stage"] = info["parameters"] + _params(first)
    else:
        tok = w.info.get("tokenizer")
        info["first_stage"] = {"recorded": tok if isinstance(tok, str) else (tok or {}).get("path")}
        held = w.info.get("held_out")  # what train-prior validated on (older priors lack it)
        if isinstance(held, dict):
            info["held_out"] = {"shards": w.info.get("shards"),
                                **{k: held[k] for k in ("val", "val_fraction") if k in held}}
    cond = {"sos": "", "coord": "", "class": " --class N", "labels": " --cond labels.png"}.get(
        prior.cond.kind, " --cond " + str(info["conditioning"].get("input", "MAP")).split()[-1])
    cfg = f" --config {r.config}" if r.origin == "--config" else ""
    info["commands"] = [f"vqgan sample --prior {name}{cfg}{cond}"]
    if prior.cond.lowres_factor:
        info["commands"] = [f"vqgan upscale IMAGE --prior {name} --scale {prior.cond.lowres_factor}"]
    if not ours:
        info["commands"] += [f"vqgan reconstruct IMAGES --tokenizer {name}{cfg}  (its first stage)",
                             f"vqgan convert {name} OUT.safetensors{cfg}"]
    return info


def tok_summary_with(tok: VQGAN) -> dict[str, Any]:
    return tokenizer_summary(tok)


def render(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows for the terminal."""
    def flat(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {flat(x)}" for k, x in v.items() if not isinstance(x, dict))
        if isinstance(v, list):
            return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else ", ".join(map(str, v))
        return str(v)

    rows = [("kind", info["kind"]), ("checkpoint", info["checkpoint"]), ("format", info["format"])]
    c = info["config"]
    rows.append(("YAML", f"{c['path']} ({c['from']})" if c["path"] else c["from"]))
    for key in ("architecture", "tokenizer", "conditioning", "first_stage", "held_out"):
        if key in info:
            rows.append((key.replace("_", " "), flat(info[key])))
            for sub in ("architecture", "codebook", "tokenizer"):
                if isinstance(info[key], dict) and isinstance(info[key].get(sub), dict):
                    rows.append((f"  {sub}", flat(info[key][sub])))
    for key in ("parameters", "parameters_with_first_stage", "global_step", "converted_from", "missing"):
        if key in info:
            v = info[key]
            rows.append((key.replace("_", " "), f"{v:,}" if isinstance(v, int) else str(v)))
    rows.append(("commands", "\n".join(info["commands"])))
    return rows
