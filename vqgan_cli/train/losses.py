"""Stage-one training losses: L1 + LPIPS reconstruction, VQ loss, PatchGAN with adaptive weight.

Formulas follow PAPER.md ("Loss for image tokenizers"). Per modality:

- image: ``|x - x_hat| + perceptual_weight * LPIPS`` plus the adversarial term;
- depth: the same without LPIPS (its VGG trunk needs RGB), discriminator on 1 channel;
- segmentation: BCE-with-logits against the one-hot map plus the VQ loss; no discriminator.

Gradient bookkeeping: the generator step runs the discriminator on *detached copies of its
parameters* (``torch.func.functional_call``), so ``generator_loss(...).total.backward()`` sends
gradient through D into ``x_hat`` but never accumulates ``.grad`` on D's parameters. The two
optimisers therefore need no ``requires_grad`` toggling and D's grads hold only the D step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqgan_cli.config import spec
from vqgan_cli.models.discriminator import PatchDiscriminator

MODALITIES = ("image", "segmentation", "depth")


@dataclass
class LossConfig:
    """Weights of the tokenizer loss; defaults are the released faces/ImageNet f16 configs."""

    perceptual_weight: float = spec(1.0, ge=0.0, help="LPIPS weight (images only); 0 turns it off")
    lpips_backbone: str = spec("torchvision",
                               help="VGG16 weights for LPIPS: 'torchvision' (torch.hub cache), "
                                    "a path to vgg16-397923af.pth, or 'random' (tests only)")
    disc_start: int = spec(0, ge=0, help="global step from which the adversarial term is on")
    disc_weight: float = spec(0.8, ge=0.0, help="multiplies the adaptive weight")
    disc_factor: float = spec(1.0, ge=0.0, help="adversarial factor once disc_start is reached")
    disc_loss: str = spec("hinge", choices=("hinge", "vanilla"))
    disc_num_layers: int = spec(3, ge=1)
    disc_ndf: int = spec(64, ge=1)
    codebook_weight: float = spec(1.0, ge=0.0)


class GeneratorLoss(NamedTuple):
    """``total`` carries the graph; every other field is detached, for logging."""

    total: torch.Tensor
    nll: torch.Tensor             # mean(rec): what the adaptive weight balances against g
    rec: torch.Tensor             # mean L1 (image/depth) or mean BCE-with-logits (segmentation)
    perceptual: torch.Tensor      # mean LPIPS (0 when off)
    g_loss: torch.Tensor          # -mean(D(x_hat)) (0 when the adversarial term is off)
    adaptive_weight: torch.Tensor  # lambda * disc_weight (0 when off)
    disc_factor: torch.Tensor
    q_loss: torch.Tensor


class DiscriminatorLoss(NamedTuple):
    """``total`` carries the graph; the logit means are detached, for logging."""

    total: torch.Tensor
    logits_real: torch.Tensor
    logits_fake: torch.Tensor


def adaptive_weight(nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """``disc_weight * clamp(|grad_W nll| / (|grad_W g| + 1e-4), 0, 1e4)``, detached.

    Balances the GAN term against reconstruction at the decoder's last layer ``W`` so neither
    swamps the other. ``autograd.grad`` reads gradients without writing ``.grad`` (so DDP's
    reduction hooks on ``W`` do not fire) and keeps the graph for the real backward.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    # Norms in fp32: under bf16 autocast the ratio of two small norms is otherwise coarse.
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``: the non-saturating GAN loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class TokenizerLoss(nn.Module):
    """Owns the discriminator and LPIPS; the training loop owns the optimisers and the step count."""

    def __init__(self, cfg: LossConfig, modality: str, in_channels: int):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.cfg = cfg
        self.modality = modality
        self.discriminator: nn.Module | None = None
        self.perceptual_loss: nn.Module | None = None
        if self.uses_discriminator:
            self.discriminator = PatchDiscriminator(in_channels, cfg.disc_ndf, cfg.disc_num_layers)
        if modality == "image" and cfg.perceptual_weight > 0:
            if in_channels != 3:
                raise ValueError(f"LPIPS needs RGB input, got {in_channels} channels; "
                                 "set loss.perceptual_weight=0")
            from vqgan_cli.models.lpips import build_lpips
            self.perceptual_loss = build_lpips(cfg.lpips_backbone)

    @property
    def uses_discriminator(self) -> bool:
        """False for segmentation (BCE + VQ only) and when disc_factor is 0 for the whole run."""
        return self.modality != "segmentation" and self.cfg.disc_factor > 0

    def disc_factor_at(self, step: int) -> float:
        """0 before ``disc_start`` (the reference's ``adopt_weight``), ``disc_factor`` after."""
        if not self.uses_discriminator or step < self.cfg.disc_start:
            return 0.0
        return float(self.cfg.disc_factor)

    def train(self, mode: bool = True) -> TokenizerLoss:
        """Keep LPIPS in eval mode: its lin heads carry dropout that must stay off."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with D's parameters detached: gradient reaches x, never D's ``.grad``."""
        d = self.discriminator
        d = getattr(d, "module", d)  # unwrap DDP: no gradient to synchronise on this path
        params = {name: p.detach() for name, p in d.named_parameters()}
        return torch.func.functional_call(d, params, (x,))

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, q_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None) -> GeneratorLoss:
        """Autoencoder objective at global step ``step``; ``last_layer`` is decoder.conv_out.weight."""
        cw = self.cfg.codebook_weight
        zero = torch.zeros((), device=x_hat.device)
        if self.modality == "segmentation":
            nll = F.binary_cross_entropy_with_logits(x_hat.float(), x.float())
            total = nll + cw * q_loss
            return GeneratorLoss(total, nll.detach(), nll.detach(), zero, zero, zero, zero,
                                 q_loss.detach())

        rec = (x.contiguous() - x_hat.contiguous()).abs()
        l1 = rec.mean().detach()
        perceptual = zero
        if self.perceptual_loss is not None:
            p = self.perceptual_loss(x.contiguous(), x_hat.contiguous())  # (B, 1, 1, 1)
            rec = rec + self.cfg.perceptual_weight * p
            perceptual = p.mean().detach()
        nll = rec.mean()

        factor = self.disc_factor_at(step)
        if factor == 0.0:
            # Cheap path before disc_start: no D forward, no extra autograd passes.
            total = nll + cw * q_loss
            return GeneratorLoss(total, nll.detach(), l1, perceptual, zero, zero,
                                 torch.tensor(factor, device=x_hat.device), q_loss.detach())

        g = -self._frozen_discriminator(x_hat.contiguous()).mean()
        if last_layer is not None and torch.is_grad_enabled() and nll.requires_grad and g.requires_grad:
            weight = adaptive_weight(nll, g, last_layer, self.cfg.disc_weight)
        else:
            weight = zero  # validation (no graph): the reference also logs d_weight 0 there
        total = nll + weight * factor * g + cw * q_loss
        return GeneratorLoss(total, nll.detach(), l1, perceptual, g.detach(), weight.detach(),
                             torch.tensor(factor, device=x_hat.device), q_loss.detach())

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, step: int) -> DiscriminatorLoss:
        """Hinge/vanilla D loss times disc_factor; ``x_hat`` is detached here regardless.

        Before ``disc_start`` D is not run at all: ``total`` is a zero leaf that requires grad, so
        an unconditional ``backward()`` works, leaves D's grads None and the optimiser skips them.
        """
        if self.discriminator is None:
            raise RuntimeError(f"the {self.modality} tokenizer has no discriminator "
                               "(check uses_discriminator before the D step)")
        factor = self.disc_factor_at(step)
        if factor == 0.0:
            zero = torch.zeros((), device=x.device)
            return DiscriminatorLoss(torch.zeros((), device=x.device, requires_grad=True), zero, zero)
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(x_hat.contiguous().detach())
        fn = hinge_d_loss if self.cfg.disc_loss == "hinge" else vanilla_d_loss
        total = factor * fn(logits_real.float(), logits_fake.float())
        return DiscriminatorLoss(total, logits_real.detach().mean(), logits_fake.detach().mean())
