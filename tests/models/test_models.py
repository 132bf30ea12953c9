"""Blocks, encoder/decoder layout, the VQGAN assembly and the discriminator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factory import tokenizer, tokenizer_config

from vqgan_cli.models import VQGAN, Decoder, Encoded, Encoder, PatchDiscriminator, VQGANOutput
from vqgan_cli.models.blocks import AttnBlock, Downsample, ResnetBlock, Upsample
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig


def tiny_config(**quant) -> TokenizerConfig:
    """f = 2 on 16 px, 32 latent channels (wider than the codes: quant_conv has work to do)."""
    return tokenizer_config(z_channels=32, **quant)


def tiny_model(seed: int = 0, **quant) -> VQGAN:
    return tokenizer(seed=seed, z_channels=32, **quant)


def images(b: int = 2, c: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


# ---- the released f16-1024 layout ------------------------------------------------------------

@pytest.fixture(scope="module")
def f16_state() -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = VQGAN(TokenizerConfig())
    return {k: v.shape for k, v in model.state_dict().items()}


def test_f16_1024_key_and_parameter_counts(f16_state):
    assert len(f16_state) == 343
    n_params = sum(s.numel() for k, s in f16_state.items())
    assert n_params == 72_141_699  # no buffers in the default model: every key is a parameter


@pytest.mark.parametrize("key, shape", [
    ("encoder.conv_in.weight", (128, 3, 3, 3)),
    ("encoder.down.4.attn.1.q.weight", (512, 512, 1, 1)),
    ("encoder.down.2.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
    ("encoder.down.3.downsample.conv.weight", (256, 256, 3, 3)),
    ("encoder.mid.attn_1.proj_out.weight", (512, 512, 1, 1)),
    ("encoder.conv_out.weight", (256, 512, 3, 3)),
    ("decoder.conv_in.weight", (512, 256, 3, 3)),
    ("decoder.up.4.block.2.conv1.weight", (512, 512, 3, 3)),
    ("decoder.up.4.attn.2.k.bias", (512,)),
    ("decoder.up.3.block.0.nin_shortcut.weight", (256, 512, 1, 1)),
    ("decoder.up.1.upsample.conv.weight", (128, 128, 3, 3)),
    ("decoder.norm_out.weight", (128,)),
    ("decoder.conv_out.weight", (3, 128, 3, 3)),
    ("quant_conv.weight", (256, 256, 1, 1)),
    ("post_quant_conv.weight", (256, 256, 1, 1)),
    ("quantize.embedding.weight", (1024, 256)),
])
def test_f16_1024_key_shapes(f16_state, key, shape):
    assert tuple(f16_state[key]) == shape


def test_f16_1024_absent_keys(f16_state):
    assert not any(k.startswith("decoder.up.0.upsample") for k in f16_state)
    assert not any(k.startswith("encoder.down.4.downsample") for k in f16_state)
    # attention only at resolution 16 = level 4; identity skips have no key
    assert not any(".attn." in k for k in f16_state if k.startswith(("encoder.down.3", "decoder.up.3")))
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in f16_state
    assert sum(k.endswith("conv1.weight") and k.startswith("decoder.up.") for k in f16_state) == 15


def test_gumbel_f8_layout():
    cfg = TokenizerConfig(autoencoder=AutoencoderConfig(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,)),
                          quantizer=QuantizerConfig(kind="gumbel", n_embed=8192))
    with torch.device("meta"):
        sd = VQGAN(cfg).state_dict()
    assert tuple(sd["quantize.proj.weight"].shape) == (8192, 256, 1, 1)
    assert tuple(sd["quantize.embed.weight"].shape) == (8192, 256)
    assert tuple(sd["quant_conv.weight"].shape) == (256, 256, 1, 1)
    assert "quantize.embedding.weight" not in sd
    assert "encoder.down.3.attn.1.q.weight" in sd and "encoder.down.2.attn.0.q.weight" not in sd


# ---- blocks ----------------------------------------------------------------------------------

def test_attention_matches_softmax_formula():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 5)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k * 32 ** -0.5, dim=-1)  # (B, HW_q, HW_k)
    ref = x + block.proj_out((v @ w.transpose(1, 2)).reshape(2, 32, 4, 5))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    cl = block(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)


def test_resnet_shortcut_only_when_widths_differ():
    assert not hasattr(ResnetBlock(32, 32, 0.0), "nin_shortcut")
    block = ResnetBlock(32, 64, 0.0)
    assert block.nin_shortcut.weight.shape == (64, 32, 1, 1)
    assert block(torch.randn(1, 32, 4, 4)).shape == (1, 64, 4, 4)
    # zero conv2 -> the block is exactly its skip
    same = ResnetBlock(32, 32, 0.0)
    torch.nn.init.zeros_(same.conv2.weight)
    torch.nn.init.zeros_(same.conv2.bias)
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(same(x), x)


def test_down_and_upsample_shapes_and_padding():
    down = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    y = down(x)
    assert y.shape == (1, 32, 4, 4)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(y, ref)
    up = Upsample(32)
    assert up(y).shape == (1, 32, 8, 8)
    assert set(dict(down.named_parameters())) == {"conv.weight", "conv.bias"}


# ---- encoder / decoder / VQGAN ---------------------------------------------------------------

def test_encode_decode_shapes():
    model = tiny_model()
    x = images()
    enc = model.encode(x)
    assert isinstance(enc, Encoded)
    assert model.factor == 2
    assert enc.z_q.shape == (2, 8, 8, 8)
    assert enc.indices.shape == (2, 8, 8) and enc.indices.dtype == torch.int64
    assert int(enc.indices.min()) >= 0 and int(enc.indices.max()) < 16
    out = model(x)
    assert isinstance(out, VQGANOutput)
    assert out.x_hat.shape == x.shape and out.q_loss.ndim == 0 and out.perplexity.ndim == 0
    assert torch.equal(out.indices, enc.indices)


def test_indices_to_codes_to_decode_equals_encode_decode():
    model = tiny_model()
    with torch.no_grad():
        enc = model.encode(images())
        torch.testing.assert_close(model.quantize.codes(enc.indices), enc.z_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.decode_indices(enc.indices), model.decode(enc.z_q),
                                   rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_reaches_encoder():
    model = tiny_model().train()
    out = model(images())
    (out.x_hat.square().mean()).backward()  # no q_loss: the only path is straight-through
    for p in (model.encoder.conv_in.weight, model.quant_conv.weight, model.decoder.conv_out.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.last_layer is model.decoder.conv_out.weight


def test_strict_state_dict_round_trip():
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    x = images()
    assert not torch.allclose(a(x).x_hat, b(x).x_hat)
    missing = b.load_state_dict(a.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    torch.testing.assert_close(a(x).x_hat, b(x).x_hat, rtol=0, atol=0)


def test_decoder_levels_indexed_by_resolution():
    cfg = tiny_config().autoencoder
    dec, enc = Decoder(cfg), Encoder(cfg)
    assert len(dec.up[0].block) == cfg.num_res_blocks + 1 and not hasattr(dec.up[0], "upsample")
    assert hasattr(dec.up[1], "upsample") and len(dec.up[1].attn) == 2  # 8x8 level has attention
    assert len(dec.up[0].attn) == 0 and len(enc.down[1].attn) == 1 and len(enc.down[0].attn) == 0
    assert dec.up[0].block[0].conv1.in_channels == 64 and dec.up[0].block[0].conv1.out_channels == 32


def test_channels_last_and_bf16_autocast():
    model = tiny_model()
    x = images()
    with torch.no_grad():
        ref = model(x).x_hat
        cl_model = tiny_model().to(memory_format=torch.channels_last)
        cl = cl_model(x.to(memory_format=torch.channels_last)).x_hat
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        enc = model.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_enc = model.encode(x)
            low = model.decode(enc.z_q)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    # bf16 rounding of the latent may flip a rare near-tie; decoding stays within bf16 precision
    assert (low_enc.indices == enc.indices).float().mean() > 0.95
    assert (low.float() - model.decode(enc.z_q)).abs().mean() < 0.05 * ref.abs().mean()


def test_segmentation_tokenizer_outputs_logits_per_label():
    model = tokenizer(z_channels=32, modality="segmentation", n_labels=5)
    labels = torch.randint(0, 5, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    onehot = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    out = model(onehot)
    assert out.x_hat.shape == (2, 5, 16, 16) and out.indices.shape == (2, 8, 8)


def test_invalid_config_rejected_with_all_problems():
    cfg = tiny_config()
    cfg.autoencoder.ch = 16
    cfg.autoencoder.resolution = 15
    with pytest.raises(ValueError) as err:
        VQGAN(cfg)
    assert "ch:" in str(err.value) and "resolution:" in str(err.value)


def test_set_step_anneals_gumbel_through_the_model():
    model = tiny_model(kind="gumbel", temperature=1.0, temperature_end=0.01, anneal_steps=10)
    model.set_step(10)
    assert model.quantize.temperature == pytest.approx(0.01)
    enc = model.encode(images())
    assert enc.z_q.shape == (2, 8, 8, 8)
    torch.testing.assert_close(model.decode_indices(enc.indices), model.decode(enc.z_q))


# ---- discriminator ---------------------------------------------------------------------------

def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    sd = disc.state_dict()
    assert len(sd) == 22
    assert tuple(sd["main.0.weight"].shape) == (64, 3, 4, 4) and "main.0.bias" in sd
    assert tuple(sd["main.2.weight"].shape) == (128, 64, 4, 4) and "main.2.bias" not in sd
    assert tuple(sd["main.8.weight"].shape) == (512, 256, 4, 4)
    assert tuple(sd["main.11.weight"].shape) == (1, 512, 4, 4)
    assert "main.9.running_var" in sd
    assert len(PatchDiscriminator(n_layers=2).state_dict()) == 16
    assert abs(float(disc.main[8].weight.detach().std()) - 0.02) < 0.001
    assert abs(float(disc.main[3].weight.detach().mean()) - 1.0) < 0.01
    assert float(disc.main[3].bias.detach().abs().sum()) == 0.0
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_pixel_norm_is_a_layer_norm_over_channels_at_each_pixel():
    """norm: pixel normalises each pixel's channel vector: the formula written out here."""
    from vqgan_cli.models.blocks import Normalize

    torch.manual_seed(1)
    norm = Normalize(8, "pixel")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 7) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, 8, 1, 1) + norm.bias.view(1, 8, 1, 1)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    assert dict(norm.named_parameters()).keys() == dict(Normalize(32).named_parameters()).keys()


def test_pixel_norm_blocks_compute_a_crop_as_the_whole_image_does():
    """Without spatial statistics a residual block is local: the inside of a crop comes out as
    that region of the whole input does (GroupNorm's per-crop statistics change it)."""
    from vqgan_cli.models.blocks import ResnetBlock

    def inside(norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        block = torch.nn.Sequential(ResnetBlock(32, 64, norm=norm), ResnetBlock(64, 64, norm=norm))
        with torch.no_grad():
            for p in block.parameters():  # non-trivial affine parameters too
                p.add_(0.1 * torch.randn_like(p))
            x = torch.randn(1, 32, 40, 40) + torch.linspace(-2, 2, 40)  # non-stationary statistics
            whole = block(x)[..., 10:30, 10:30]
            crop = block(x[..., 6:34, 6:34])[..., 4:24, 4:24]  # 4 px from the crop's border
        return whole, crop

    a, b = inside("pixel")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a, b = inside("group")
    assert (a - b).abs().max() > 1e-2
