"""Tokenizer losses and LPIPS loading, checked against hand-computed numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqgan_cli.config import ConfigError, from_dict
from vqgan_cli.models.lpips import (
    VGG16_FILE,
    PerceptualWeightsInvalid,
    PerceptualWeightsMissing,
    build_lpips,
    check_lpips_available,
)
from vqgan_cli.train.losses import LossConfig, TokenizerLoss, adaptive_weight


class TinyDecoder(nn.Module):
    """Stand-in for the decoder: the adaptive weight only needs its last layer ``conv_out``."""

    def __init__(self, out_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_in(z)))


class Fixed(nn.Module):
    """A 'discriminator' whose logits are its input: D's losses become hand-computable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _cfg(**kw) -> LossConfig:
    base = dict(perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2, disc_start=0)
    base.update(kw)
    return LossConfig(**base)


def _batch(seed: int = 0, c: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, c, size, size, generator=g) * 2 - 1
    z = torch.randn(2, 4, size, size, generator=g)
    q = torch.tensor(0.37, requires_grad=True)
    return x, z, q


# ---------------------------------------------------------------- adaptive weight


def test_adaptive_weight_closed_form_and_clamp():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    # grad nll = (3, 4) -> norm 5; grad g = (0, 2) -> norm 2.
    nll = 3 * w[0] + 4 * w[1]
    g = 2 * w[1]
    assert adaptive_weight(nll, g, w, 0.8).item() == pytest.approx(0.8 * 5 / (2 + 1e-4), rel=1e-6)
    # Tiny gradients: the 1e-4 epsilon counts as much as |grad g| -> 5e-3 / (1e-4 + 1e-4) = 25.
    assert adaptive_weight(1e-3 * nll, 1e-4 * w[0], w, 1.0).item() == pytest.approx(25.0, rel=1e-5)
    # No GAN gradient: 5 / 1e-4 = 5e4 is clamped to 1e4 before disc_weight.
    assert adaptive_weight(nll, 0 * w.sum(), w, 0.5).item() == pytest.approx(0.5e4)
    out = adaptive_weight(nll, g, w)
    assert not out.requires_grad and w.grad is None  # autograd.grad never writes .grad
    nll.backward()  # the graph was retained for the real backward
    assert w.grad.tolist() == [3.0, 4.0]


def test_generator_adaptive_weight_matches_separate_backward_passes():
    torch.manual_seed(0)
    loss = TokenizerLoss(_cfg(disc_weight=0.8), "image", 3)
    dec = TinyDecoder()
    x, z, q = _batch()
    out = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)

    # The same quantities by hand with two independent graphs and .backward().
    W = dec.conv_out.weight
    nll = (x - dec(z)).abs().mean()
    nll.backward()
    g_nll = W.grad.norm().item()
    W.grad = None
    g = -loss.discriminator(dec(z)).mean()
    g.backward()
    g_g = W.grad.norm().item()
    lam = 0.8 * min(g_nll / (g_g + 1e-4), 1e4)
    assert out.adaptive_weight.item() == pytest.approx(lam, rel=1e-5)
    assert out.nll.item() == pytest.approx(nll.item(), rel=1e-6)
    assert out.g_loss.item() == pytest.approx(g.item(), rel=1e-5)
    expected = nll.item() + lam * 1.0 * g.item() + 1.0 * 0.37
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- disc_start / gradient flow


def test_before_disc_start_total_is_nll_plus_codebook_and_d_never_runs():
    loss = TokenizerLoss(_cfg(disc_start=5, codebook_weight=0.5), "image", 3)
    assert [loss.disc_factor_at(s) for s in (0, 4, 5, 100)] == [0.0, 0.0, 1.0, 1.0]

    def boom(*a, **k):
        raise AssertionError("the discriminator must not run before disc_start")

    loss.discriminator.forward = boom
    dec = TinyDecoder()
    x, z, q = _batch()
    out = loss.generator_loss(x, dec(z), q, step=4, last_layer=dec.conv_out.weight)
    assert torch.equal(out.total, out.nll + 0.5 * q)
    assert out.g_loss.item() == 0.0 and out.adaptive_weight.item() == 0.0 and out.disc_factor.item() == 0.0
    d = loss.discriminator_loss(x, dec(z), step=4)
    assert d.total.item() == 0.0
    d.total.backward()  # an unconditional backward in the loop must not fail
    assert all(p.grad is None for p in loss.discriminator.parameters())


def test_generator_backward_leaves_discriminator_grads_untouched():
    loss = TokenizerLoss(_cfg(), "image", 3)
    dec = TinyDecoder()
    x, z, q = _batch()
    out = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)
    out.total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())
    with_g = dec.conv_out.weight.grad.clone()

    # g reached the decoder through D: the gradient differs from that of nll + q alone.
    dec.zero_grad()
    (x - dec(z)).abs().mean().backward()
    assert out.adaptive_weight.item() > 0
    assert not torch.allclose(with_g, dec.conv_out.weight.grad)

    # The D step fills D's grads and nothing of the decoder (x_hat is detached inside).
    dec.zero_grad(set_to_none=True)
    loss.discriminator_loss(x, dec(z), step=0).total.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert all(p.grad is None for p in dec.parameters())


def test_no_grad_validation_uses_zero_weight():
    loss = TokenizerLoss(_cfg(codebook_weight=1.0), "image", 3)
    dec = TinyDecoder()
    x, z, q = _batch()
    with torch.no_grad():
        out = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)
    assert out.adaptive_weight.item() == 0.0
    assert out.total.item() == pytest.approx(out.nll.item() + 0.37, rel=1e-6)


def test_adaptive_weight_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    loss = TokenizerLoss(_cfg(), "image", 3)
    dec = TinyDecoder()
    x, z, q = _batch(size=32)
    ref = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)
    assert torch.isfinite(out.total) and out.adaptive_weight.dtype == torch.float32
    assert out.adaptive_weight.item() == pytest.approx(ref.adaptive_weight.item(), rel=0.1)
    out.total.backward()
    assert torch.isfinite(dec.conv_out.weight.grad).all()


def test_adaptive_weight_on_ddp_wrapped_decoder(tmp_path: Path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group is already running")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        loss = TokenizerLoss(_cfg(), "image", 3)
        dec = TinyDecoder()
        plain = TinyDecoder()
        plain.load_state_dict(dec.state_dict())
        ddp = DDP(dec)
        x, z, q = _batch()
        out = loss.generator_loss(x, ddp(z), q, step=0, last_layer=ddp.module.conv_out.weight)
        out.total.backward()
        ref = loss.generator_loss(x, plain(z), q, step=0, last_layer=plain.conv_out.weight)
        ref.total.backward()
        assert out.adaptive_weight.item() == pytest.approx(ref.adaptive_weight.item(), rel=1e-5)
        torch.testing.assert_close(dec.conv_out.weight.grad, plain.conv_out.weight.grad)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- discriminator losses

REAL = torch.tensor([-2.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 4)
FAKE = torch.tensor([-1.5, -0.5, 0.0, 2.0]).view(1, 1, 1, 4)


def test_hinge_discriminator_loss_by_hand():
    loss = TokenizerLoss(_cfg(disc_factor=0.5, disc_loss="hinge"), "image", 3)
    loss.discriminator = Fixed()
    out = loss.discriminator_loss(REAL, FAKE, step=0)
    # relu(1 - real) = (3, .5, 0, 0) -> .875; relu(1 + fake) = (0, .5, 1, 3) -> 1.125
    assert out.total.item() == pytest.approx(0.5 * 0.5 * (0.875 + 1.125))
    assert out.logits_real.item() == pytest.approx(0.625)
    assert out.logits_fake.item() == pytest.approx(0.0)


def test_vanilla_discriminator_loss_by_hand():
    loss = TokenizerLoss(_cfg(disc_loss="vanilla"), "image", 3)
    loss.discriminator = Fixed()
    out = loss.discriminator_loss(REAL, FAKE, step=0)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(sp(-r) for r in REAL.flatten().tolist()) / 4
                      + sum(sp(f) for f in FAKE.flatten().tolist()) / 4)
    assert out.total.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- modalities


def test_segmentation_uses_bce_and_vq_only():
    cfg = _cfg(perceptual_weight=1.0, lpips_backbone="torchvision", codebook_weight=2.0)
    loss = TokenizerLoss(cfg, "segmentation", 5)  # no LPIPS file needed: never built
    assert not loss.uses_discriminator and loss.discriminator is None and loss.perceptual_loss is None
    assert loss.disc_factor_at(10**6) == 0.0
    labels = torch.tensor([[0, 1], [4, 2]])
    x = F.one_hot(labels, 5).permute(2, 0, 1)[None].float()  # (1, 5, 2, 2)
    logits = torch.linspace(-3, 3, 20).view(1, 5, 2, 2)
    q = torch.tensor(0.1)
    out = loss.generator_loss(x, logits, q, step=10, last_layer=None)
    s = torch.sigmoid(logits)
    bce = -(x * torch.log(s) + (1 - x) * torch.log(1 - s)).mean()
    assert out.nll.item() == pytest.approx(bce.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(bce.item() + 2.0 * 0.1, rel=1e-5)
    with pytest.raises(RuntimeError, match="no discriminator"):
        loss.discriminator_loss(x, logits, step=10)


def test_depth_has_one_channel_discriminator_and_no_lpips():
    loss = TokenizerLoss(_cfg(perceptual_weight=1.0), "depth", 1)
    assert loss.perceptual_loss is None
    assert loss.discriminator.main[0].in_channels == 1
    dec = TinyDecoder(out_channels=1)
    x, z, q = _batch(c=1)
    out = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)
    assert out.rec.item() == pytest.approx((x - dec(z)).abs().mean().item(), rel=1e-6)
    assert out.adaptive_weight.item() > 0


def test_loss_config_from_recipe_reports_problems():
    cfg = from_dict(LossConfig, {"disc_start": 30001, "disc_weight": 0.75, "disc_num_layers": 2})
    assert (cfg.disc_start, cfg.disc_weight, cfg.disc_num_layers) == (30001, 0.75, 2)
    with pytest.raises(ConfigError) as e:
        from_dict(LossConfig, {"disc_loss": "wgan", "disc_start": "soon", "perceptual_weight": -1})
    text = str(e.value)
    assert "disc_loss" in text and "disc_start: expected int" in text and "perceptual_weight" in text


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips() -> nn.Module:
    return build_lpips("random")


def test_random_lpips_zero_for_identical_positive_otherwise(random_lpips, monkeypatch):
    x, _, _ = _batch(size=32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    assert random_lpips(x, x).abs().max().item() == 0.0
    d = random_lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert all(not p.requires_grad for p in random_lpips.parameters()) and not random_lpips.training


def test_image_loss_adds_weighted_lpips(monkeypatch, random_lpips):
    import vqgan_cli.models.lpips as perceptual

    monkeypatch.setattr(perceptual, "build_lpips", lambda backbone: random_lpips)
    loss = TokenizerLoss(_cfg(perceptual_weight=0.5, lpips_backbone="random", disc_start=10), "image", 3)
    loss.train()
    assert loss.perceptual_loss is random_lpips and not random_lpips.training  # dropout stays off
    dec = TinyDecoder()
    x, z, q = _batch(size=32)
    out = loss.generator_loss(x, dec(z), q, step=0, last_layer=dec.conv_out.weight)
    assert out.perceptual.item() > 0
    assert out.nll.item() == pytest.approx(out.rec.item() + 0.5 * out.perceptual.item(), rel=1e-5)
    out.total.backward()
    assert dec.conv_out.weight.grad is not None


def _fake_vgg_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG16 state dict (features only plus one classifier tensor, to stay small)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    features = make_layers(cfgs["D"])  # vgg16(weights=None).features without the big classifier
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_vgg_file_is_copied_exactly_into_slices(tmp_path, monkeypatch):
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError("must never download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    target = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE  # under the test's TORCH_HOME
    state = _fake_vgg_file(target)
    model = build_lpips("torchvision")
    slices = {int(k): m for n in range(1, 6) for k, m in getattr(model.net, f"slice{n}").named_children()}
    copied = 0
    for key, tensor in state.items():
        if not key.startswith("features."):
            continue
        _, k, kind = key.split(".")
        assert torch.equal(getattr(slices[int(k)], kind), tensor), key
        copied += 1
    assert copied == 26 == sum(1 for _ in model.net.parameters())
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    # An explicit path works the same way.
    other = tmp_path / "elsewhere" / "vgg.pth"
    other.parent.mkdir()
    target.rename(other)
    model2 = build_lpips(str(other))
    assert torch.equal(getattr(model2.net.slice5, "28").weight, state["features.28.weight"])


def test_missing_vgg_file_message_says_how_to_fix(tmp_path):
    expected = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    with pytest.raises(PerceptualWeightsMissing) as e:
        check_lpips_available("torchvision")
    text = str(e.value)
    assert str(expected) in text and "perceptual_weight=0" in text
    assert "loss.lpips_backbone: /path/to/vgg16-397923af.pth" in text
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in text
    missing = tmp_path / "nowhere" / VGG16_FILE
    with pytest.raises(PerceptualWeightsMissing, match=str(missing)):
        build_lpips(str(missing))
    # The loss fails the same way before building anything.
    with pytest.raises(PerceptualWeightsMissing, match="perceptual_weight=0"):
        TokenizerLoss(_cfg(perceptual_weight=1.0, lpips_backbone=str(missing)), "image", 3)
    check_lpips_available("random")  # never needs a file


def test_unreadable_or_wrong_vgg_file_is_named(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualWeightsInvalid, match="could not be read") as e:
        build_lpips(str(bad))
    assert str(bad) in str(e.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(PerceptualWeightsInvalid, match=r"features\.0\.weight has shape \(2, 2\)") as e:
        build_lpips(str(wrong))
    assert "features.0.bias missing" in str(e.value) and "features.28.bias" not in str(e.value)
