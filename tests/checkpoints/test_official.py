"""Official-release layouts (VQModel, GumbelVQ, segmentation, depth, Net2NetTransformer) load
strictly, with and without their YAML, and compute exactly what the source weights compute.

The files are built the way Lightning writes them (``official_files``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from official_files import (
    GRID,
    KINDS,
    RES,
    assert_same_prior,
    assert_same_tokenizer,
    make_prior_case,
    make_tokenizer,
    model_input,
    save_lightning,
    tokenizer_state,
    tokenizer_yaml,
    write_yaml,
)

from vqgan_cli.checkpoints.format import CheckpointError
from vqgan_cli.checkpoints.load import load_prior, load_tokenizer
from vqgan_cli.checkpoints.official.tokenizer import infer_tokenizer_config
from vqgan_cli.config import to_dict
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.prior import StoredOrder
from vqgan_cli.models.vqgan import VQGAN

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
