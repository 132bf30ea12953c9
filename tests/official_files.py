"""Official-release files built the way Lightning writes them, from the tiny models of ``factory``.

Our model's state dict under the official prefixes plus ``loss.*`` weights, optimiser states, a
callback object of a class from a module that no longer exists at load time, and an
``argparse.Namespace`` of hyper-parameters; the YAML ``model`` node a release would carry; and the
assertions that a loaded model computes exactly what its source computes. Shared by the loader,
official and CLI tests.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
import yaml
from factory import gpt_config, seeded, tokenizer, tokenizer_config

from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig
from vqgan_cli.models.vqgan import VQGAN

RES = 16

# ---- building official-layout files ------------------------------------------------------------

KINDS = {  # the four tokenizer layouts of the releases, at f = 2 on 16 px
    "vq": lambda: tokenizer_config(resolution=RES),
    "gumbel": lambda: tokenizer_config(resolution=RES, kind="gumbel", kl_weight=1e-8),
    "segmentation": lambda: tokenizer_config(resolution=RES, modality="segmentation", n_labels=182),
    "depth": lambda: tokenizer_config(resolution=RES, modality="depth"),
}


def make_tokenizer(cfg: TokenizerConfig, seed: int = 0) -> VQGAN:
    """A tokenizer whose codebook is spread like a trained one, so many codes get used."""
    return tokenizer(cfg, seed=seed, spread=True)


def model_input(cfg: TokenizerConfig, b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = cfg.autoencoder.in_channels
    if cfg.modality == "segmentation":
        labels = torch.randint(0, c, (b, RES, RES), generator=g)
        return torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()
    return torch.rand(b, c, RES, RES, generator=g) * 2 - 1


def loss_weights(prefix: str = "") -> dict[str, torch.Tensor]:
    """Stand-ins for the discriminator and LPIPS weights a VQModel carries (training only)."""
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=g),
            f"{prefix}loss.discriminator.main.0.bias": torch.randn(64, generator=g),
            f"{prefix}loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1, generator=g),
            f"{prefix}loss.logvar": torch.zeros(())}


def tokenizer_state(model: VQGAN, prefix: str = "", with_loss: bool = True) -> dict[str, torch.Tensor]:
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if model.config.modality == "segmentation":
        g = torch.Generator().manual_seed(0)
        state[prefix + "colorize"] = torch.randn(3, model.config.n_labels, 1, 1, generator=g)
    if with_loss:
        state.update(loss_weights(prefix))
    return state


def save_lightning(path: Path, state: dict[str, torch.Tensor], legacy: bool = False) -> Path:
    """torch.save a dict shaped like a Lightning checkpoint, with objects of a module that is
    deleted before anyone loads the file."""
    mod = types.ModuleType("fake_lightning_cb")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = torch.tensor(0.5)
            self.monitor = "val/rec_loss"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    sys.modules[mod.__name__] = mod
    try:
        ckpt = {
            "epoch": 3, "global_step": 5, "pytorch-lightning_version": "1.0.8",
            "state_dict": OrderedDict(state),
            "optimizer_states": [{"state": {0: {"step": 5, "exp_avg": torch.ones(4)}},
                                  "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [],
            "callbacks": {ModelCheckpoint: ModelCheckpoint()},
            "hyper_parameters": argparse.Namespace(base_learning_rate=4.5e-6, batch_size=2),
        }
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    finally:
        del sys.modules[mod.__name__]
    return path


def ddconfig(cfg: TokenizerConfig) -> dict:
    ae = cfg.autoencoder
    return {"double_z": False, "z_channels": ae.z_channels, "resolution": ae.resolution,
            "in_channels": ae.in_channels, "out_ch": ae.out_channels, "ch": ae.ch,
            "ch_mult": list(ae.ch_mult), "num_res_blocks": ae.num_res_blocks,
            "attn_resolutions": list(ae.attn_resolutions), "dropout": ae.dropout}


def tokenizer_yaml(cfg: TokenizerConfig) -> dict:
    """The ``model`` node of a release config for this tokenizer."""
    target = {"vq": "taming.models.vqgan.VQModel", "gumbel": "taming.models.vqgan.GumbelVQ"}[
        cfg.quantizer.kind]
    params = {"embed_dim": cfg.quantizer.embed_dim, "n_embed": cfg.quantizer.n_embed,
              "ddconfig": ddconfig(cfg), "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}
    if cfg.modality == "segmentation":
        target = "taming.models.vqgan.VQSegmentationModel"
        params["n_labels"] = cfg.n_labels
    if cfg.quantizer.kind == "gumbel":
        params["kl_weight"] = 1e-8
        params["temperature_scheduler_config"] = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"}
    return {"target": target, "params": params}


def write_yaml(path: Path, model_node: dict) -> Path:
    path.write_text(yaml.safe_dump({"model": model_node}))
    return path


def assert_same_tokenizer(src: VQGAN, got: VQGAN, cfg: TokenizerConfig,
                          lossless_tokens: bool = True) -> None:
    assert not got.training
    assert set(got.state_dict()) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    x = model_input(cfg)
    with torch.no_grad():
        a, b = src.encode(x), got.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.z_q, b.z_q)
        assert torch.equal(src.decode(a.z_q), got.decode(b.z_q))
        assert torch.equal(src.decode_indices(a.indices), got.decode_indices(b.indices))
        # invariant: indices -> codes -> decode equals encode -> decode (z_q is straight-through,
        # z + (e - z), so the two differ by float32 rounding at most); not for a remap whose
        # unknown codes all become one token
        if lossless_tokens:
            torch.testing.assert_close(got.decode_indices(b.indices), got.decode(b.z_q),
                                       rtol=1e-5, atol=1e-5)


# ---- Net2NetTransformer --------------------------------------------------------------------------

GRID = RES // 2  # f = 2 for the tiny tokenizers


def make_prior_case(cond: str, permuter: str = "identity", seed: int = 0, sos_token: int = 3):
    """(source Prior, source first stage, official state dict, YAML model node)."""
    first = make_tokenizer(KINDS["vq"](), seed)
    n_img = GRID * GRID
    cond_cfg, cond_tok, block, yaml_cond = CondConfig(kind=cond), None, n_img, None
    if cond == "sos":
        cond_cfg.sos_token = sos_token
        yaml_cond = {"target": "taming.modules.util.SOSProvider", "params": {"sos_token": sos_token}}
    elif cond == "class":
        cond_cfg.n_classes = 10
        yaml_cond = {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}
    elif cond == "spatial":
        seg_cfg = tokenizer_config(resolution=RES, modality="segmentation", n_labels=182, n_embed=12)
        cond_tok = make_tokenizer(seg_cfg, seed + 1)
        cond_cfg.tokenizer, cond_cfg.key = seg_cfg, "segmentation"
        block = 2 * n_img - 1
        yaml_cond = tokenizer_yaml(seg_cfg)
    elif cond == "coord":
        cond_cfg.coord_n_embed, cond_cfg.coord_down_factor = 16, 2
        block = 2 * n_img - 1
        yaml_cond = {"target": "taming.modules.misc.coord.CoordStage",
                     "params": {"n_embed": 16, "down_factor": 2}}
    gpt = gpt_config(vocab_size=20, block_size=block, n_layer=2)  # 2 heads, 32 wide
    cfg = PriorConfig(gpt=gpt, cond=cond_cfg, grid=(GRID, GRID), permuter=permuter)
    with seeded(seed + 2):
        prior = Prior(cfg, cond_tokenizer=cond_tok).eval()
    state = {"transformer." + k: v.clone() for k, v in prior.gpt.state_dict().items()}
    state.update({"permuter." + k: v.clone() for k, v in prior.permuter.state_dict().items()})
    state.update(tokenizer_state(first, "first_stage_model.", with_loss=False))
    if cond_tok is not None:
        state.update(tokenizer_state(cond_tok, "cond_stage_model.", with_loss=False))
    names = {"identity": "Identity", "alternate": "AlternateParsing", "random": "Random"}
    node = {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_key": cond_cfg.key, "first_stage_key": "image",
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
            "vocab_size": 20, "block_size": block, "n_layer": 2, "n_head": 2, "n_embd": 32}},
        "first_stage_config": tokenizer_yaml(first.config),
        "cond_stage_config": yaml_cond}}
    if permuter in names:
        node["params"]["permuter_config"] = {
            "target": f"taming.modules.transformer.permuter.{names[permuter]}",
            "params": {"H": GRID, "W": GRID}}
    return prior, first, state, node


def cond_input(cond: str, b: int = 2) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(7)
    if cond == "class":
        return torch.randint(0, 10, (b,), generator=g)
    if cond == "spatial":
        labels = torch.randint(0, 182, (b, RES, RES), generator=g)
        return torch.nn.functional.one_hot(labels, 182).permute(0, 3, 1, 2).float()
    if cond == "coord":
        return torch.rand(b, 1, RES, RES, generator=g)
    return None


def assert_same_prior(src: Prior, got: Prior, first_src: VQGAN, first_got: VQGAN, cond: str) -> None:
    assert not got.training
    assert set(got.state_dict()) == set(src.state_dict())
    assert got.config.gpt == src.config.gpt
    assert got.cond.kind == cond
    x = model_input(first_src.config)
    with torch.no_grad():
        c = cond_input(cond)
        c_src, c_got = src.cond_tokens(c, batch_size=2), got.cond_tokens(c, batch_size=2)
        assert torch.equal(c_src, c_got)
        z_src = src.permute(first_src.encode(x).indices)
        z_got = got.permute(first_got.encode(x).indices)
        assert torch.equal(z_src, z_got)
        assert torch.equal(src(c_src, z_src), got(c_got, z_got))
        tokens = torch.cat((c_got, z_got), 1)[:, :-1]
        assert torch.equal(src.gpt(tokens), got.gpt(tokens))
        assert torch.equal(got.unpermute(z_got).view(2, GRID, GRID), first_got.encode(x).indices)
