"""Official-release layouts (VQModel, GumbelVQ, segmentation, depth, Net2NetTransformer) load
strictly, with and without their YAML, and compute exactly what the source weights compute.

The files are built the way Lightning writes them: our model's state dict under the official
prefixes plus ``loss.*`` weights, optimiser states, a callback object of a class from a module
that no longer exists at load time, and an ``argparse.Namespace`` of hyper-parameters.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

from vqgan_cli.checkpoints.format import CheckpointError
from vqgan_cli.checkpoints.load import load_prior, load_tokenizer
from vqgan_cli.checkpoints.official.tokenizer import infer_tokenizer_config
from vqgan_cli.config import to_dict
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.gpt import GPTConfig
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig, StoredOrder
from vqgan_cli.models.vqgan import VQGAN

RES = 16


# ---- building official-layout files ------------------------------------------------------------

def tiny_tokenizer_config(kind: str = "vq", modality: str = "image", channels: int = 3,
                          n_embed: int = 16) -> TokenizerConfig:
    ae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                           in_channels=channels, out_channels=channels, resolution=RES,
                           z_channels=8)
    qc = QuantizerConfig(kind=kind, n_embed=n_embed, embed_dim=8,
                         **({"kl_weight": 1e-8} if kind == "gumbel" else {}))
    return TokenizerConfig(modality=modality, n_labels=channels if modality == "segmentation" else None,
                           autoencoder=ae, quantizer=qc)


KINDS = {
    "vq": lambda: tiny_tokenizer_config(),
    "gumbel": lambda: tiny_tokenizer_config(kind="gumbel"),
    "segmentation": lambda: tiny_tokenizer_config(modality="segmentation", channels=182),
    "depth": lambda: tiny_tokenizer_config(modality="depth", channels=1),
}


def make_tokenizer(cfg: TokenizerConfig, seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN(cfg).eval()
    with torch.no_grad():  # a codebook spread like a trained one, so many codes get used
        book = model.quantize.embedding if cfg.quantizer.kind == "vq" else model.quantize.embed
        book.weight.normal_()
    return model


def model_input(cfg: TokenizerConfig, b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = cfg.autoencoder.in_channels
    if cfg.modality == "segmentation":
        labels = torch.randint(0, c, (b, RES, RES), generator=g)
        return torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()
    return torch.rand(b, c, RES, RES, generator=g) * 2 - 1


def loss_weights(prefix: str = "") -> dict[str, torch.Tensor]:
    """Stand-ins for the discriminator and LPIPS weights a VQModel carries (training only)."""
    return {f"{prefix}loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            f"{prefix}loss.discriminator.main.0.bias": torch.randn(64),
            f"{prefix}loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
            f"{prefix}loss.logvar": torch.zeros(())}


def tokenizer_state(model: VQGAN, prefix: str = "", with_loss: bool = True) -> dict[str, torch.Tensor]:
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if model.config.modality == "segmentation":
        state[prefix + "colorize"] = torch.randn(3, model.config.n_labels, 1, 1)
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


# ---- tokenizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("with_yaml", [False, True], ids=["shapes", "yaml"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tokenizer_loads_strictly_and_matches(tmp_path, kind, with_yaml):
    cfg = KINDS[kind]()
    src = make_tokenizer(cfg)
    path = save_lightning(tmp_path / "model.ckpt", tokenizer_state(src))
    if with_yaml:
        got = load_tokenizer(path, config=write_yaml(tmp_path / "model.yaml", tokenizer_yaml(cfg)))
    else:
        got = load_tokenizer(path, resolution=RES)
    assert to_dict(got.config) == to_dict(cfg)
    assert_same_tokenizer(src, got, cfg)


def test_legacy_pickle_checkpoint_loads(tmp_path):
    cfg = KINDS["vq"]()
    src = make_tokenizer(cfg)
    path = save_lightning(tmp_path / "legacy.ckpt", tokenizer_state(src), legacy=True)
    assert_same_tokenizer(src, load_tokenizer(path, resolution=RES), cfg)


def test_released_shapes_infer_released_configs():
    """Full-size f16-1024 and Gumbel f8-8192 layouts (shapes only, on the meta device)."""
    f8 = TokenizerConfig(autoencoder=AutoencoderConfig(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,)),
                         quantizer=QuantizerConfig(kind="gumbel", n_embed=8192, kl_weight=1e-8))
    for cfg in (TokenizerConfig(), f8):
        with torch.device("meta"):
            state = VQGAN(cfg).state_dict()
        assert to_dict(infer_tokenizer_config(state)) == to_dict(cfg)
    assert len(state) > 300


def test_remap_buffer_maps_tokens_like_the_reference(tmp_path):
    cfg = KINDS["vq"]()
    src = make_tokenizer(cfg)
    used = torch.tensor([3, 5, 7, 9, 11, 0, 2])
    state = tokenizer_state(src)
    state["quantize.used"] = used
    path = save_lightning(tmp_path / "remap.ckpt", state)
    got = load_tokenizer(path, resolution=RES, unknown_index="extra")
    assert "quantize.used" in got.state_dict()
    x = model_input(cfg, b=4)
    with torch.no_grad():
        raw = src.encode(x).indices
        tokens = got.encode(x).indices
        pos = {int(c): i for i, c in enumerate(used.tolist())}
        expected = torch.tensor([pos.get(int(c), len(used)) for c in raw.flatten()]).view_as(raw)
        assert torch.equal(tokens, expected)
        assert got.quantize.n_tokens == len(used) + 1
        # decoding a token decodes the code it stands for; the extra token decodes as used[0]
        codes = torch.where(tokens == len(used), 0, tokens)
        assert torch.equal(got.decode_indices(tokens), src.decode_indices(used[codes]))
    rnd = load_tokenizer(path, resolution=RES)  # the reference's default: random unknowns
    t = rnd.encode(x).indices
    assert t.min() >= 0 and t.max() < len(used)
    known = expected < len(used)
    assert torch.equal(t[known], expected[known])


# ---- errors --------------------------------------------------------------------------------------

def _vq_file(tmp_path: Path, edit) -> Path:
    state = tokenizer_state(make_tokenizer(KINDS["vq"]()))
    edit(state)
    return save_lightning(tmp_path / "broken.ckpt", state)


def test_missing_key_is_named(tmp_path):
    path = _vq_file(tmp_path, lambda s: s.pop("decoder.up.1.block.0.conv2.bias"))
    with pytest.raises(CheckpointError,
                       match=r"broken\.ckpt.*missing.*decoder\.up\.1\.block\.0\.conv2\.bias"):
        load_tokenizer(path, resolution=RES)


def test_unexpected_key_is_named(tmp_path):
    path = _vq_file(tmp_path, lambda s: s.__setitem__("encoder.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"broken\.ckpt.*unexpected.*encoder\.extra\.weight"):
        load_tokenizer(path, resolution=RES)


def test_misshaped_key_is_named(tmp_path):
    path = _vq_file(tmp_path, lambda s: s.__setitem__("encoder.mid.attn_1.q.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"broken\.ckpt.*encoder\.mid\.attn_1\.q\.bias.*\(5,\)"):
        load_tokenizer(path, resolution=RES)


@pytest.mark.parametrize("section,key,value", [
    ("ddconfig", "ch", 64), ("ddconfig", "ch_mult", [1, 4]), ("ddconfig", "num_res_blocks", 2),
    ("ddconfig", "attn_resolutions", [16]), ("ddconfig", "z_channels", 16),
    ("ddconfig", "out_ch", 1), ("params", "n_embed", 1024), ("params", "embed_dim", 256),
])
def test_yaml_disagreeing_with_shapes_names_the_key(tmp_path, section, key, value):
    cfg = KINDS["vq"]()
    path = save_lightning(tmp_path / "m.ckpt", tokenizer_state(make_tokenizer(cfg)))
    node = tokenizer_yaml(cfg)
    (node["params"]["ddconfig"] if section == "ddconfig" else node["params"])[key] = value
    dotted = f"model.params.ddconfig.{key}" if section == "ddconfig" else f"model.params.{key}"
    with pytest.raises(CheckpointError, match=rf"m\.yaml: {dotted.replace('.', chr(92) + '.')} is"):
        load_tokenizer(path, config=write_yaml(tmp_path / "m.yaml", node))


def test_yaml_gumbel_target_on_vq_weights(tmp_path):
    cfg = KINDS["vq"]()
    path = save_lightning(tmp_path / "m.ckpt", tokenizer_state(make_tokenizer(cfg)))
    node = tokenizer_yaml(KINDS["gumbel"]())
    with pytest.raises(CheckpointError, match=r"model\.target"):
        load_tokenizer(path, config=write_yaml(tmp_path / "m.yaml", node))


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
        seg_cfg = tiny_tokenizer_config(modality="segmentation", channels=182, n_embed=12)
        cond_tok = make_tokenizer(seg_cfg, seed + 1)
        cond_cfg.tokenizer, cond_cfg.key = seg_cfg, "segmentation"
        block = 2 * n_img - 1
        yaml_cond = tokenizer_yaml(seg_cfg)
    elif cond == "coord":
        cond_cfg.coord_n_embed, cond_cfg.coord_down_factor = 16, 2
        block = 2 * n_img - 1
        yaml_cond = {"target": "taming.modules.misc.coord.CoordStage",
                     "params": {"n_embed": 16, "down_factor": 2}}
    gpt = GPTConfig(vocab_size=20, block_size=block, n_layer=2, n_head=2, n_embd=32)
    cfg = PriorConfig(gpt=gpt, cond=cond_cfg, grid=(GRID, GRID), permuter=permuter)
    torch.manual_seed(seed + 2)
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


CASES = [("sos", "identity"), ("class", "identity"), ("spatial", "alternate"),
         ("coord", "identity"), ("sos", "random")]


@pytest.mark.parametrize("with_yaml", [False, True], ids=["shapes", "yaml"])
@pytest.mark.parametrize("cond,permuter", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_transformer_loads_strictly_and_matches(tmp_path, cond, permuter, with_yaml):
    # the start token leaves no trace in the weights: without YAML it is read as 0
    src, first, state, node = make_prior_case(cond, permuter, sos_token=3 if with_yaml else 0)
    path = save_lightning(tmp_path / "transformer.ckpt", state)
    if with_yaml:
        yml = write_yaml(tmp_path / "transformer.yaml", node)
        got = load_prior(path, config=yml)
        tok = load_tokenizer(path, config=yml)
    else:
        if cond == "coord":  # no weights say "coordinates": the YAML is required, and says so
            with pytest.raises(CheckpointError, match="YAML"):
                load_prior(path, n_head=2, cond_kind="coord")
            return
        got = load_prior(path, n_head=2, cond_kind="class" if cond == "class" else None,
                         n_classes=10 if cond == "class" else None, resolution=RES)
        tok = load_tokenizer(path, resolution=RES)
    assert got.config.permuter == permuter
    if cond == "spatial":
        assert to_dict(got.cond.tokenizer) == to_dict(src.cond.tokenizer)
    if with_yaml:
        assert to_dict(got.config) == to_dict(src.config)
    assert to_dict(tok.config) == to_dict(first.config)
    assert_same_tokenizer(first, tok, first.config)
    assert_same_prior(src, got, first, tok, cond)


def test_first_stage_as_cond_stage(tmp_path):
    """``cond_stage_config: __is_first_stage__``: the same VQ model under both prefixes."""
    _, first, state, node = make_prior_case("sos")
    state.update({"cond_stage_model." + k[len("first_stage_model."):]: v
                  for k, v in state.items() if k.startswith("first_stage_model.")})
    node["params"]["cond_stage_config"] = "__is_first_stage__"
    node["params"]["cond_stage_key"] = "image"
    path = save_lightning(tmp_path / "t.ckpt", state)
    got = load_prior(path, config=write_yaml(tmp_path / "t.yaml", node))
    assert got.cond.kind == "spatial" and to_dict(got.cond.tokenizer) == to_dict(first.config)
    x = model_input(first.config)
    assert torch.equal(got.cond_tokens(x), first.encode(x).indices.reshape(2, -1))


def test_unrecognised_order_is_kept_as_stored(tmp_path):
    src, first, state, _ = make_prior_case("sos")
    order = torch.randperm(GRID * GRID, generator=torch.Generator().manual_seed(5))
    state["permuter.forward_shuffle_idx"] = order
    state["permuter.backward_shuffle_idx"] = torch.argsort(order)
    path = save_lightning(tmp_path / "t.ckpt", state)
    got = load_prior(path, n_head=2, resolution=RES)
    assert got.config.permuter == "stored" and isinstance(got.permuter, StoredOrder)
    z = torch.arange(GRID * GRID).repeat(2, 1)
    assert torch.equal(got.permute(z), z[:, order])
    assert torch.equal(got.unpermute(got.permute(z)), z)


def test_n_head_required_without_yaml(tmp_path):
    _, _, state, _ = make_prior_case("sos")
    path = save_lightning(tmp_path / "t.ckpt", state)
    with pytest.raises(CheckpointError, match=r"t\.ckpt: n_head cannot be read"):
        load_prior(path)


def test_transformer_yaml_disagreeing_names_key(tmp_path):
    _, _, state, node = make_prior_case("sos")
    node["params"]["transformer_config"]["params"]["n_layer"] = 3
    path = save_lightning(tmp_path / "t.ckpt", state)
    with pytest.raises(CheckpointError, match=r"transformer_config\.params\.n_layer is 3"):
        load_prior(path, config=write_yaml(tmp_path / "t.yaml", node))


def test_transformer_stray_and_misshaped_keys(tmp_path):
    _, _, state, _ = make_prior_case("spatial", "alternate")
    bad = dict(state, **{"transformer.blocks.1.mlp.0.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"a\.ckpt: key transformer\.blocks\.1\.mlp\.0\.bias"):
        load_prior(save_lightning(tmp_path / "a.ckpt", bad), n_head=2, resolution=RES)
    stray = dict(state, **{"ema.decay": torch.zeros(())})
    with pytest.raises(CheckpointError, match=r"b\.ckpt: unexpected key\(s\) ema\.decay"):
        load_prior(save_lightning(tmp_path / "b.ckpt", stray), n_head=2, resolution=RES)
    missing = {k: v for k, v in state.items() if k != "cond_stage_model.quant_conv.bias"}
    with pytest.raises(CheckpointError,
                       match=r"c\.ckpt: missing key\(s\) cond_stage_model\.quant_conv\.bias"):
        load_prior(save_lightning(tmp_path / "c.ckpt", missing), n_head=2, resolution=RES)


def test_prior_loader_refuses_a_tokenizer_file(tmp_path):
    path = save_lightning(tmp_path / "tok.ckpt", tokenizer_state(make_tokenizer(KINDS["vq"]())))
    with pytest.raises(CheckpointError, match=r"tok\.ckpt: no transformer"):
        load_prior(path, n_head=2)
