"""The PatchGAN discriminator of pix2pix ("NLayer"), as used by the reference's VQGAN loss.

Every layer lives in one ``nn.Sequential`` named ``main`` so that official keys
``loss.discriminator.main.{k}.*`` map onto ours by dropping the prefix.
"""

from __future__ import annotations

import torch
from torch import nn


def _init_weights(module: nn.Module) -> None:
    """The reference's init: conv N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """Image (B, C, H, W) -> patch logits (B, 1, h', w'); each logit judges one receptive field."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            # No bias: BatchNorm's shift would cancel it.
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
