"""diffusers interop, checked against diffusers' own VQModel: our tokenizer exported and loaded by
``VQModel.from_pretrained``, and a VQModel saved by diffusers loaded by ``load_tokenizer``, give
identical token grids and decoded images within 1e-5; what VQModel cannot express is refused."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: nothing may be downloaded
diffusers = pytest.importorskip("diffusers")

from factory import saved_tokenizer, tokenizer, tokenizer_config  # noqa: E402

from vqgan_cli import load_tokenizer  # noqa: E402
from vqgan_cli.checkpoints.diffusers import DiffusersError, export_diffusers  # noqa: E402
from vqgan_cli.checkpoints.load import save_tokenizer  # noqa: E402
from vqgan_cli.cli import app  # noqa: E402
from vqgan_cli.models.vqgan import VQGAN  # noqa: E402


def _spread(module: torch.nn.Module, seed: int) -> None:
    """Random weights large enough that the codebook is used widely (the default init maps every
    position to nearly the same code, which would make index equality trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _inputs() -> torch.Tensor:
    return torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W)


@torch.no_grad()
def _diffusers_tokens(d, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    _, _, (_, _, idx) = d.quantize(d.encode(x).latents)
    return idx.reshape(x.shape[0], *grid)


@torch.no_grad()
def _diffusers_decode(d, idx: torch.Tensor) -> torch.Tensor:
    b, h, w = idx.shape
    z_q = d.quantize.get_codebook_entry(idx.reshape(-1), (b, h, w, d.config.vq_embed_dim))
    return d.decode(z_q, force_not_quantize=True).sample


@torch.no_grad()
def _agree(ours: VQGAN, d, x: torch.Tensor) -> None:
    idx = ours.encode(x).indices  # (B, h, w)
    assert idx.unique().numel() > 3  # a code grid worth comparing
    assert torch.equal(_diffusers_tokens(d, x, tuple(idx.shape[1:])), idx)
    mine, theirs = ours.decode_indices(idx), _diffusers_decode(d, idx)
    assert mine.shape == theirs.shape == x.shape
    assert (mine - theirs).abs().max().item() < 1e-5


def test_our_tokenizer_exported_runs_identically_in_diffusers(tmp_path):
    ours = tokenizer(embed_dim=4)
    _spread(ours, 0)
    ckpt = save_tokenizer(tmp_path / "tok.safetensors", ours)
    res = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "hf"), "--to", "diffusers"])
    assert res.exit_code == 0, res.output
    d = diffusers.VQModel.from_pretrained(str(tmp_path / "hf")).eval()
    _agree(ours, d, _inputs())
    # and back: the exported folder loads as our tokenizer with the same weights
    back = load_tokenizer(tmp_path / "hf")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_vqmodel_saved_by_diffusers_loads_as_our_tokenizer(tmp_path):
    torch.manual_seed(0)
    d = diffusers.VQModel(in_channels=3, out_channels=3,
                          down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                          up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                          block_out_channels=(32, 64), layers_per_block=2, latent_channels=6,
                          sample_size=32, num_vq_embeddings=24, vq_embed_dim=5)
    _spread(d, 2)
    d.eval().save_pretrained(str(tmp_path / "theirs"))
    ours = load_tokenizer(tmp_path / "theirs")
    ae = ours.config.autoencoder
    assert (ae.ch, tuple(ae.ch_mult), ae.num_res_blocks, ae.z_channels) == (32, (1, 2), 2, 6)
    assert (ours.config.quantizer.n_embed, ours.config.quantizer.embed_dim) == (24, 5)
    _agree(ours, d, _inputs())


@pytest.mark.parametrize("setting, named", [
    ({"norm": "pixel"}, "model.autoencoder.norm: pixel"),
    ({"kind": "gumbel"}, "model.quantizer.kind: gumbel"),
    ({"codebook_dim": 2}, "model.quantizer.codebook_dim: 2"),
    ({"l2_normalize": True}, "model.quantizer.l2_normalize"),
    ({"modality": "depth"}, "model.modality: depth"),
    ({"modality": "segmentation"}, "model.modality: segmentation"),
])
def test_what_vqmodel_cannot_express_is_refused_by_name(tmp_path, setting, named):
    kw = {k: v for k, v in setting.items() if k != "norm"}
    cfg = tokenizer_config(embed_dim=4, n_labels=5, **kw)  # n_labels: read for segmentation only
    if "norm" in setting:
        cfg.autoencoder.norm = setting["norm"]
    with pytest.raises(DiffusersError, match="cannot express") as err:
        export_diffusers(tokenizer(cfg), tmp_path / "out")
    assert named in str(err.value)
    assert not (tmp_path / "out").exists()
    ckpt = saved_tokenizer(tmp_path / "t.safetensors", tokenizer(cfg))
    res = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "out"), "--to", "diffusers"])
    assert res.exit_code == 2 and named in " ".join(res.output.split())
