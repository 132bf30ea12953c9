"""Our tokenizers as diffusers ``VQModel`` folders, and such folders as our tokenizers.

A diffusers folder is ``config.json`` (``_class_name: VQModel``) beside
``diffusion_pytorch_model.safetensors``. Both directions are written and read here without
importing diffusers: the architectures are the same network (the reference's encoder/decoder,
GroupNorm 32 with eps 1e-6, single-head attention, one nearest-neighbour codebook), so only
parameter names differ, plus the 1x1 attention convolutions that diffusers stores as Linear
weights. What VQModel cannot express is refused by name instead of exported approximately.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vqgan_cli.checkpoints.format import CheckpointError
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose VQModel reads every key we write


class DiffusersError(CheckpointError):
    """A tokenizer diffusers cannot express, or a folder we cannot read; the message says which."""


def is_diffusers_folder(path: str | Path) -> bool:
    p = Path(path)
    if not (p / CONFIG).is_file():
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("_class_name") == "VQModel"
    except (json.JSONDecodeError, AttributeError):
        return False


def _refusals(model: VQGAN) -> list[str]:
    cfg, ae, q = model.config, model.config.autoencoder, model.config.quantizer
    why = []
    if cfg.modality != "image":
        why.append(f"model.modality: {cfg.modality} (diffusers' VQModel has no segmentation/depth head)")
    if ae.norm != "group":
        why.append(f"model.autoencoder.norm: {ae.norm} (VQModel normalises with GroupNorm only; its "
                   "norm_type 'spatial' is a decoder conditioned on the codes, not a per-pixel LayerNorm)")
    if q.kind != "vq":
        why.append(f"model.quantizer.kind: {q.kind} (VQModel has one nearest-neighbour codebook, no Gumbel)")
    if q.codebook_dim:
        why.append(f"model.quantizer.codebook_dim: {q.codebook_dim} (VQModel has no low-dimensional codes)")
    if q.l2_normalize:
        why.append("model.quantizer.l2_normalize: true (VQModel compares unnormalised codes)")
    if ae.ch_mult[0] != 1:
        why.append(f"model.autoencoder.ch_mult: starts with {ae.ch_mult[0]}, VQModel's first level keeps "
                   "conv_in's width (the first multiplier must be 1)")
    if q.n_used is not None:
        why.append("the tokenizer remaps its indices (an official release's 'used' codes); VQModel's "
                   "remap reads a file path: export the tokenizer without remapping")
    return why


def _attn_levels(ae: AutoencoderConfig) -> list[bool]:
    return [ae.resolution // 2**i in ae.attn_resolutions for i in range(len(ae.ch_mult))]


def diffusers_config(model: VQGAN) -> dict:
    """VQModel's config.json for ``model`` (raises DiffusersError listing what it cannot express)."""
    why = _refusals(model)
    if why:
        raise DiffusersError("diffusers' VQModel cannot express this tokenizer:\n"
                             + "\n".join(f"  - {w}" for w in why))
    ae, q = model.config.autoencoder, model.config.quantizer
    attn = _attn_levels(ae)
    return {
        "_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": ae.in_channels, "out_channels": ae.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [ae.ch * m for m in ae.ch_mult], "layers_per_block": ae.num_res_blocks,
        "act_fn": "silu", "latent_channels": ae.z_channels, "sample_size": ae.resolution,
        "num_vq_embeddings": q.n_embed, "norm_num_groups": 32, "vq_embed_dim": q.embed_dim,
        "scaling_factor": 1.0, "norm_type": "group", "mid_block_add_attention": True,
        "lookup_from_codebook": False, "force_upcast": False,
    }


_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_key(key: str, n_levels: int) -> str:
    """Our parameter name -> VQModel's (the decoder's levels run in reverse order there)."""
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.", key)
    key = key.replace(".block.", ".resnets.").replace(".attn.", ".attentions.")
    key = key.replace(".downsample.conv.", ".downsamplers.0.conv.").replace(".upsample.conv.", ".upsamplers.0.conv.")
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    m = re.match(r"^(.*\.attentions\.\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$", key)
    if m:
        key = f"{m[1]}.{_ATTN[m[2]]}.{m[3]}"
    return key


def _our_state(model: VQGAN) -> dict[str, torch.Tensor]:
    """Inference weights only: EMA statistics of the codebook are training state."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("quantize.ema_")}


def export_diffusers(model: VQGAN, out_dir: str | Path) -> Path:
    """Write ``model`` as a folder ``diffusers.VQModel.from_pretrained(out_dir)`` loads."""
    config = diffusers_config(model)
    n = len(model.config.autoencoder.ch_mult)
    tensors = {}
    for k, v in _our_state(model).items():
        dk = diffusers_key(k, n)
        is_attn_linear = re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", dk)
        tensors[dk] = (v[:, :, 0, 0] if is_attn_linear else v).detach().float().contiguous().cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _our_config(cfg: dict, where: str) -> TokenizerConfig:
    problems = []

    def want(key: str, ok: object, default: object) -> None:
        if cfg.get(key, default) != ok:
            problems.append(f"{key}: {cfg.get(key, default)!r} (we read {ok!r} only)")

    want("act_fn", "silu", "silu")
    want("norm_type", "group", "group")
    want("norm_num_groups", 32, 32)
    want("mid_block_add_attention", True, True)
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
    attn_down = [t == "AttnDownEncoderBlock2D" for t in down]
    attn_up = [t == "AttnUpDecoderBlock2D" for t in reversed(up)]
    if not set(down) <= {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"} or \
            not set(up) <= {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}:
        problems.append(f"down/up_block_types: {down} / {up} (we read (Attn)Down/UpEncoder/DecoderBlock2D)")
    elif attn_down != attn_up:
        problems.append(f"down/up_block_types: attention at different levels in encoder {down} and "
                        f"decoder {up} (ours mirror each other)")
    channels = list(cfg.get("block_out_channels", [64]))
    ch = channels[0]
    if len(channels) != len(down) or len(up) != len(down) or any(c % ch for c in channels):
        problems.append(f"block_out_channels: {channels} (one per level, multiples of the first)")
    if problems:
        raise DiffusersError(f"{where}: a VQModel we cannot read:\n" + "\n".join(f"  - {p}" for p in problems))
    factor = 2 ** (len(channels) - 1)
    res = int(cfg.get("sample_size", 32))
    res = res if res % factor == 0 else factor * 16  # the resolution only places attention
    latent = int(cfg.get("latent_channels", 3))
    ae = AutoencoderConfig(ch=ch, ch_mult=tuple(c // ch for c in channels),
                           num_res_blocks=int(cfg.get("layers_per_block", 1)),
                           attn_resolutions=tuple(res // 2**i for i, a in enumerate(attn_down) if a),
                           in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
                           resolution=res, z_channels=latent)
    q = QuantizerConfig(n_embed=int(cfg.get("num_vq_embeddings", 256)),
                        embed_dim=int(cfg.get("vq_embed_dim") or latent))
    return TokenizerConfig(modality="image", autoencoder=ae, quantizer=q)


def load_diffusers_tokenizer(path: str | Path) -> VQGAN:
    """A diffusers VQModel folder (ours exported, or one diffusers saved) as our VQGAN, eval mode."""
    folder = Path(path)
    cfg = _our_config(json.loads((folder / CONFIG).read_text()), str(folder))
    if (folder / WEIGHTS).is_file():
        state = load_file(str(folder / WEIGHTS))
    elif (folder / WEIGHTS_BIN).is_file():
        state = torch.load(folder / WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise DiffusersError(f"{folder}: no {WEIGHTS} (nor {WEIGHTS_BIN}) beside config.json")
    model = VQGAN(cfg)
    n = len(cfg.autoencoder.ch_mult)
    ours = _our_state(model)
    wanted = {diffusers_key(k, n): k for k in ours}
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise DiffusersError(f"{folder}: weights do not match config.json: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    loaded = {}
    for dk, k in wanted.items():
        t = state[dk]
        loaded[k] = t.reshape(ours[k].shape).to(ours[k].dtype)
    model.load_state_dict(loaded, strict=True)
    return model.eval()
