"""The baseline of ``tokenizer_step.py``: a VQGAN training step written in the reference release's style.

Plain eager float32 PyTorch in NCHW, built from ``shared/PAPER.md`` (stage one) and independent of
``vqgan_cli``'s models, so that the benchmark compares against the way the reference computes the
same maths, not against a second copy of our own code:

- attention: separate ``q``/``k``/``v`` 1x1 convolutions, the (HW x HW) weight matrix materialised
  with ``bmm``, softmax, a second ``bmm``;
- swish written as ``x * sigmoid(x)``;
- the quantizer's distances, straight-through estimator and "legacy" beta form as in PAPER.md;
- the training step does what the reference's two-optimiser ``training_step`` does: the autoencoder
  runs once for the generator update and *again* for the discriminator update.

Module and parameter names are the official ones (and therefore ours), so a ``vqgan_cli`` VQGAN's
state dict loads here with ``strict=True``; ``tests/benchmarks/test_benchmarks.py`` uses that to check that both
compute the same reconstruction and the same losses.

One choice in the reference's favour: its framework switches off ``requires_grad`` on the other
optimiser's parameters for each half of the step (Lightning's ``toggle_optimizer``), so the
generator half computes no discriminator weight gradients and the second autoencoder pass of the
discriminator half records no autograd graph. We do the same; the baseline is not padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelNorm(nn.Module):
    """``norm: pixel`` written the plain way: mean and variance over dim 1 of NCHW at each pixel,
    in float32 (what our PixelNorm computes with layer_norm on an NHWC view)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        mean = h.mean(dim=1, keepdim=True)
        var = h.var(dim=1, unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + self.eps)
        return (h * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]).to(x.dtype)


def normalize(channels: int, norm: str = "group") -> nn.Module:
    if norm == "pixel":
        return ChannelNorm(channels)
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm: str = "group"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels, norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head attention with the weight matrix materialised: softmax(q^T k / sqrt(C)) v."""

    def __init__(self, channels: int, norm: str = "group"):
        super().__init__()
        self.norm = normalize(channels, norm)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, height, width = q.shape
        n = height * width
        queries = q.reshape(b, c, n).transpose(1, 2)           # (b, n, c)
        keys = k.reshape(b, c, n)                               # (b, c, n)
        weights = torch.bmm(queries, keys) * (int(c) ** -0.5)  # (b, n_query, n_key)
        weights = torch.softmax(weights, dim=2)
        values = v.reshape(b, c, n)                             # (b, c, n_key)
        out = torch.bmm(values, weights.transpose(1, 2))        # (b, c, n_query)
        return x + self.proj_out(out.reshape(b, c, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float, norm: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, norm)
    mid.attn_1 = AttnBlock(channels, norm)
    mid.block_2 = ResnetBlock(channels, channels, dropout, norm)
    return mid


class _Levels(nn.Module):
    """The reference's ``ddconfig`` keywords shared by encoder and decoder (``channels``: the
    encoder's input or the decoder's output channels)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], channels: int, resolution: int,
                 z_channels: int, dropout: float = 0.0, norm: str = "group"):
        super().__init__()
        self.num_levels, self.num_res_blocks, self.norm = len(ch_mult), num_res_blocks, norm
        self.build(ch, tuple(ch_mult), attn_resolutions, channels, resolution, z_channels, dropout)


class Encoder(_Levels):
    def build(self, ch: int, ch_mult: tuple[int, ...], attn_resolutions: tuple[int, ...], in_channels: int,
              resolution: int, z_channels: int, dropout: float) -> None:
        num_res_blocks = self.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i in range(self.num_levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, self.norm))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, self.norm))
            if i != self.num_levels - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, dropout, self.norm)
        self.norm_out = normalize(block_in, self.norm)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i in range(self.num_levels):
            level = self.down[i]
            for j in range(self.num_res_blocks):
                h = level.block[j](h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(_Levels):
    def build(self, ch: int, ch_mult: tuple[int, ...], attn_resolutions: tuple[int, ...], out_channels: int,
              resolution: int, z_channels: int, dropout: float) -> None:
        num_res_blocks = self.num_res_blocks
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, dropout, self.norm)
        levels: list[nn.Module] = []
        for i in reversed(range(self.num_levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, self.norm))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, self.norm))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # stored by resolution level, built from the lowest resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in, self.norm)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = level.block[j](h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by squared L2 distance; straight-through; legacy or paper beta form."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (b, h, w, c)
        flat = z.view(-1, c)
        book = self.embedding.weight
        d = (flat ** 2).sum(dim=1, keepdim=True) + (book ** 2).sum(dim=1) - 2 * torch.matmul(flat, book.t())
        idx = torch.argmin(d, dim=1)
        z_q = self.embedding(idx).view(z.shape)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, idx.view(b, h, w)


class VQModel(nn.Module):
    """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder; forward returns (x_hat, q_loss)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], in_channels: int, out_channels: int,
                 resolution: int, z_channels: int, n_embed: int, embed_dim: int,
                 dropout: float = 0.0, beta: float = 0.25, legacy: bool = True, norm: str = "group"):
        super().__init__()
        shape = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                     attn_resolutions=tuple(attn_resolutions), resolution=resolution,
                     z_channels=z_channels, dropout=dropout, norm=norm)
        self.encoder = Encoder(channels=in_channels, **shape)
        self.decoder = Decoder(channels=out_channels, **shape)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, legacy)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, q_loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), q_loss

    def get_last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayer) with BatchNorm, as PAPER.md describes it."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
                                nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1)]
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight.data, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight.data, 1.0, 0.02)
                nn.init.constant_(m.bias.data, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


class VQLPIPSWithDiscriminator(nn.Module):
    """L1 + LPIPS reconstruction, VQ loss, PatchGAN with the adaptive weight (PAPER.md)."""

    def __init__(self, perceptual: nn.Module | None, *, disc_start: int = 0, codebook_weight: float = 1.0,
                 perceptual_weight: float = 1.0, disc_in_channels: int = 3, disc_num_layers: int = 3,
                 disc_ndf: int = 64, disc_factor: float = 1.0, disc_weight: float = 1.0,
                 disc_loss: str = "hinge"):
        super().__init__()
        self.perceptual_loss = perceptual.eval() if perceptual is not None else None
        self.perceptual_weight = perceptual_weight if perceptual is not None else 0.0
        self.codebook_weight = codebook_weight
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

    def disc_factor_at(self, global_step: int) -> float:
        return 0.0 if global_step < self.discriminator_iter_start else self.disc_factor

    def adaptive_weight(self, nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def generator_loss(self, q_loss: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
                       global_step: int, last_layer: torch.Tensor) -> torch.Tensor:
        rec = torch.abs(x.contiguous() - x_hat.contiguous())
        if self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual_loss(x.contiguous(), x_hat.contiguous())
        nll = torch.mean(rec)
        factor = self.disc_factor_at(global_step)
        if factor == 0.0:
            return nll + self.codebook_weight * q_loss.mean()
        g = -torch.mean(self.discriminator(x_hat.contiguous()))
        d_weight = self.adaptive_weight(nll, g, last_layer)
        return nll + d_weight * factor * g + self.codebook_weight * q_loss.mean()

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, global_step: int) -> torch.Tensor:
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(x_hat.contiguous().detach())
        return self.disc_factor_at(global_step) * self.disc_loss(logits_real, logits_fake)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def reference_train_step(model: VQModel, loss: VQLPIPSWithDiscriminator, opt_ae: torch.optim.Optimizer,
                         opt_d: torch.optim.Optimizer, x: torch.Tensor,
                         global_step: int) -> tuple[float, float]:
    """One optimiser step of each network, the reference's way: the autoencoder runs twice.

    Returns the (generator, discriminator) losses as floats.
    """
    model.train()
    loss.train()
    if loss.perceptual_loss is not None:
        loss.perceptual_loss.eval()

    # Optimiser 0, the autoencoder: only its parameters require grad.
    _set_requires_grad(loss.discriminator, False)
    _set_requires_grad(model, True)
    x_hat, q_loss = model(x)
    ae_loss = loss.generator_loss(q_loss, x, x_hat, global_step, model.get_last_layer())
    opt_ae.zero_grad()
    ae_loss.backward()
    opt_ae.step()

    # Optimiser 1, the discriminator: the autoencoder runs again to produce its fakes.
    _set_requires_grad(model, False)
    _set_requires_grad(loss.discriminator, True)
    x_hat, q_loss = model(x)
    d_loss = loss.discriminator_loss(x, x_hat, global_step)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    _set_requires_grad(model, True)
    return ae_loss.item(), d_loss.item()
