"""Our format round trips, and converting an official file changes nothing it computes."""

from __future__ import annotations

from dataclasses import replace

import official_files as release  # the release's file layout, built from the factory
import pytest
import torch

from vqgan_cli.checkpoints.convert import convert_checkpoint
from vqgan_cli.checkpoints.format import CheckpointError, read_weights, save_weights, weights_sha256
from vqgan_cli.checkpoints.load import load_prior, load_tokenizer, save_prior, save_tokenizer
from vqgan_cli.config import to_dict


def test_public_api_is_reexported():
    import vqgan_cli

    assert vqgan_cli.load_tokenizer is load_tokenizer and vqgan_cli.load_prior is load_prior
    assert vqgan_cli.__version__


@pytest.mark.parametrize("kind", sorted(release.KINDS))
def test_our_tokenizer_round_trip(tmp_path, kind):
    cfg = release.KINDS[kind]()
    src = release.make_tokenizer(cfg)
    path = save_tokenizer(tmp_path / "tok.safetensors", src, {"step": 3})
    w = read_weights(path)
    assert w.format == "vqgan-tokenizer" and w.info == {"step": 3}
    got = load_tokenizer(path)
    assert to_dict(got.config) == to_dict(cfg)
    release.assert_same_tokenizer(src, got, cfg)


def _remapped(cfg, used: list[int], unknown_index="extra"):
    cfg = replace(cfg, quantizer=replace(cfg.quantizer, n_used=len(used), unknown_index=unknown_index))
    src = release.make_tokenizer(cfg)
    src.quantize.used.copy_(torch.tensor(used))
    return cfg, src


def test_our_tokenizer_keeps_its_remap(tmp_path):
    cfg, src = _remapped(release.KINDS["vq"](), [4, 1, 9, 2])
    got = load_tokenizer(save_tokenizer(tmp_path / "r.safetensors", src))
    assert got.quantize.used.tolist() == [4, 1, 9, 2] and got.quantize.unknown_index == "extra"
    assert got.n_tokens == 5
    release.assert_same_tokenizer(src, got, cfg, lossless_tokens=False)


def test_tokenizer_saved_before_remap_was_a_config_option_loads(tmp_path):
    """Older files: ``quantize.used`` in the weights, ``unknown_index`` in info, not in the config."""
    cfg, src = _remapped(release.KINDS["vq"](), [4, 1, 9, 2])
    old = to_dict(cfg)
    del old["quantizer"]["n_used"], old["quantizer"]["unknown_index"]
    path = save_weights(tmp_path / "old.safetensors", src.state_dict(), "vqgan-tokenizer", old,
                        {"unknown_index": "extra"})
    got = load_tokenizer(path)
    assert got.config.quantizer.n_used == 4 and got.quantize.unknown_index == "extra"
    release.assert_same_tokenizer(src, got, cfg, lossless_tokens=False)


@pytest.mark.parametrize("cond,permuter",
                         [("spatial", "alternate"), ("class", "random"), ("sos", "identity")])
def test_our_prior_round_trip(tmp_path, cond, permuter):
    src, first, _, _ = release.make_prior_case(cond, permuter)
    path = save_prior(tmp_path / "prior.safetensors", src)
    got = load_prior(path)
    assert to_dict(got.config) == to_dict(src.config)
    release.assert_same_prior(src, got, first, first, cond)


def test_converted_prior_keeps_its_cond_stage_remap(tmp_path):
    """An official prior whose conditioning tokenizer remaps (``cond_stage_model.quantize.used``):
    converting and loading our file gives the same conditioning tokens as the official file."""
    from official_files import cond_input

    _, _, state, node = release.make_prior_case("spatial")
    state["cond_stage_model.quantize.used"] = torch.tensor([5, 2, 9, 0, 11, 7])
    ckpt = release.save_lightning(tmp_path / "net2net.ckpt", state)
    yaml_path = release.write_yaml(tmp_path / "net2net.yaml", node)
    official = load_prior(ckpt, yaml_path, unknown_index="extra")
    got = load_prior(convert_checkpoint(ckpt, tmp_path / "p.safetensors", yaml_path, unknown_index="extra"))
    q = got.cond_tokenizer.config.quantizer
    assert (q.n_used, q.unknown_index, got.cond_tokenizer.n_tokens) == (6, "extra", 7)
    assert got.cond_tokenizer.quantize.used.tolist() == [5, 2, 9, 0, 11, 7]
    with torch.no_grad():
        c = cond_input("spatial")
        assert torch.equal(official.cond_tokens(c, batch_size=2), got.cond_tokens(c, batch_size=2))


def test_stored_order_round_trips(tmp_path):
    from official_files import GRID

    from vqgan_cli.models.prior import Prior, StoredOrder

    src, first, _, _ = release.make_prior_case("sos")
    order = torch.randperm(GRID * GRID, generator=torch.Generator().manual_seed(3))
    src.config.permuter = "stored"
    src = Prior(src.config, permuter=StoredOrder(order, torch.argsort(order)))
    got = load_prior(save_prior(tmp_path / "p.safetensors", src))
    assert isinstance(got.permuter, StoredOrder)
    assert torch.equal(got.permuter.forward_shuffle_idx, order)
    release.assert_same_prior(src, got, first, first, "sos")


@pytest.mark.parametrize("kind", ["vq", "gumbel", "segmentation"])
def test_convert_tokenizer_is_exact_and_drops_training_state(tmp_path, kind):
    cfg = release.KINDS[kind]()
    src = release.make_tokenizer(cfg)
    state = release.tokenizer_state(src)
    ckpt = release.save_lightning(tmp_path / "official.ckpt", state)
    out = convert_checkpoint(ckpt, tmp_path / "ours.safetensors",
                             config=release.write_yaml(tmp_path / "m.yaml", release.tokenizer_yaml(cfg)))
    w = read_weights(out)
    assert set(w.state_dict) == set(src.state_dict())  # no loss.*, no colorize
    assert w.info["global_step"] == 5 and w.info["converted_from"] == "official.ckpt"
    assert not (tmp_path / "ours.training.safetensors").exists()
    converted = load_tokenizer(out)
    official = load_tokenizer(ckpt, resolution=release.RES)
    assert weights_sha256(converted.state_dict()) == weights_sha256(official.state_dict())
    release.assert_same_tokenizer(official, converted, cfg)


def test_convert_keep_training_state(tmp_path):
    src = release.make_tokenizer(release.KINDS["vq"]())
    state = release.tokenizer_state(src)
    ckpt = release.save_lightning(tmp_path / "official.ckpt", state)
    out = convert_checkpoint(ckpt, tmp_path / "ours.safetensors", keep_training_state=True,
                             resolution=release.RES)
    assert set(read_weights(out).state_dict) == set(src.state_dict())
    train = read_weights(tmp_path / "ours.training.safetensors")
    assert train.format == "vqgan-training-state"
    for k, v in state.items():
        if k.startswith("loss."):
            assert torch.equal(train.state_dict[k], v)
    assert torch.equal(train.state_dict["optimizer_states.0.state.0.exp_avg"], torch.ones(4))
    assert train.info["global_step"] == 5
    assert train.info["optimizer_states"][0]["state"]["0"]["step"] == 5
    assert train.info["optimizer_states"][0]["param_groups"][0]["betas"] == [0.5, 0.9]


def test_convert_transformer_writes_prior_and_tokenizer(tmp_path):
    src, first, state, node = release.make_prior_case("spatial", "alternate")
    ckpt = release.save_lightning(tmp_path / "net2net.ckpt", state)
    out = convert_checkpoint(ckpt, tmp_path / "prior.safetensors",
                             config=release.write_yaml(tmp_path / "net2net.yaml", node))
    info = read_weights(out).info
    tok_path = tmp_path / "prior.tokenizer.safetensors"
    assert info["tokenizer"] == tok_path.name
    tok = load_tokenizer(tok_path)
    assert info["tokenizer_sha256"] == weights_sha256(tok.state_dict())
    got = load_prior(out)
    assert to_dict(got.config) == to_dict(src.config)
    release.assert_same_tokenizer(first, tok, first.config)
    release.assert_same_prior(src, got, first, tok, "spatial")
    official = load_prior(ckpt, config=tmp_path / "net2net.yaml")
    assert weights_sha256(official.state_dict()) == weights_sha256(got.state_dict())


def test_loaders_refuse_the_wrong_kind_of_file(tmp_path):
    src, _, _, _ = release.make_prior_case("sos")
    prior_path = save_prior(tmp_path / "p.safetensors", src)
    with pytest.raises(CheckpointError, match=r"p\.safetensors: a 'vqgan-prior' checkpoint.*load_prior"):
        load_tokenizer(prior_path)
    tok_path = save_tokenizer(tmp_path / "t.safetensors", release.make_tokenizer(release.KINDS["vq"]()))
    with pytest.raises(CheckpointError, match=r"t\.safetensors: a 'vqgan-tokenizer' checkpoint"):
        load_prior(tok_path)
    with pytest.raises(CheckpointError, match=r"t\.safetensors: our checkpoints carry their own config"):
        load_tokenizer(tok_path, config={"model": {"params": {}}})
    with pytest.raises(CheckpointError, match=r"absent\.ckpt: checkpoint file not found"):
        load_tokenizer(tmp_path / "absent.ckpt")


def test_tampered_safetensors_names_file_and_key(tmp_path):
    src = release.make_tokenizer(release.KINDS["vq"]())
    from vqgan_cli.checkpoints.format import save_weights

    state = dict(src.state_dict())
    state["quant_conv.bias"] = torch.zeros(3)
    path = save_weights(tmp_path / "bad.safetensors", state, "vqgan-tokenizer", to_dict(src.config))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: key quant_conv\.bias has shape \(3,\)"):
        load_tokenizer(path)
