"""The transformer prior as a unit: GPT, reading order and conditioning (PAPER.md, stage two).

A :class:`Prior` is what ``load_prior`` returns, for our checkpoints and for official
Net2NetTransformer files alike. It holds no image tokenizer: priors are trained on token
shards and sampled together with a tokenizer loaded separately (an official transformer
``.ckpt`` also serves as that tokenizer, see :mod:`vqgan_cli.loading`). Only a *spatial*
conditioning stage (a segmentation/depth/image VQGAN) lives inside, because its tokens are
part of the prior's input.

Conditioning kinds, as in the reference release:

- ``sos``: one start token (``sos_token``) for unconditional models;
- ``class``: the class index itself is the single conditioning token (shared vocabulary);
- ``spatial``: the raster tokens of a conditioning map encoded by ``cond_tokenizer``;
- ``coord``: a [0, 1] coordinate map, area-downsampled by ``coord_down_factor`` and
  quantized to ``round(coord_n_embed * c)`` (the reference's CoordStage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqgan_cli.config import spec
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.models.permuter import _IndexPermuter, build_permuter
from vqgan_cli.models.vqgan import VQGAN

COND_KINDS = ("sos", "class", "spatial", "coord")


@dataclass
class CondConfig:
    """How conditioning tokens are made; only the fields of the chosen ``kind`` matter."""

    kind: str = spec("sos", choices=COND_KINDS)
    sos_token: int = spec(0, ge=0, help="sos: the start token")
    n_classes: int | None = spec(None, ge=1, help="class: number of classes")
    tokenizer: TokenizerConfig | None = spec(None, help="spatial: the conditioning map's tokenizer")
    coord_n_embed: int | None = spec(None, ge=1, help="coord: quantization levels")
    coord_down_factor: int | None = spec(None, ge=1, help="coord: area downsampling factor")
    key: str = spec("image", help="dataset key of the conditioning input")
    downsample_size: int = spec(-1, help="spatial: resize the map to this square size first (-1: no)")

    def check(self) -> list[str]:
        problems = []
        if self.kind == "class" and self.n_classes is None:
            problems.append("n_classes: required for class conditioning")
        if self.kind == "spatial" and self.tokenizer is None:
            problems.append("tokenizer: required for spatial conditioning")
        if self.kind == "coord" and (self.coord_n_embed is None or self.coord_down_factor is None):
            problems.append("coord_n_embed/coord_down_factor: required for coord conditioning")
        return problems


@dataclass
class PriorConfig:
    """A prior: its GPT, the token grid it reads, in which order, and its conditioning."""

    gpt: GPTConfig
    cond: CondConfig = field(default_factory=CondConfig)
    grid: tuple[int, ...] | None = spec(None, help="(h, w) token grid of one training crop")
    permuter: str = spec("identity", help="reading order (models.permuter names), or 'stored' "
                                          "for an order carried only by the weights")
    first_stage_key: str = spec("image")
    pkeep: float = spec(1.0, ge=0.0, le=1.0, help="probability of keeping an input token")

    def check(self) -> list[str]:
        problems = []
        if self.permuter not in ("identity",) and self.grid is None:
            problems.append("grid: required for a non-identity permuter")
        if self.grid is not None and len(self.grid) != 2:
            problems.append(f"grid: expected (h, w), got {list(self.grid)}")
        return problems


class StoredOrder(_IndexPermuter):
    """A reading order known only from checkpoint buffers (no named permuter reproduces it)."""

    def __init__(self, forward_idx: torch.Tensor, backward_idx: torch.Tensor):
        super().__init__(forward_idx, inverse=backward_idx)


def build_order(cfg: PriorConfig, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The permuter named in ``cfg``; ``stored`` takes its indices from ``permuter.*`` weights."""
    if cfg.permuter == "stored":
        if state_dict is None or "permuter.forward_shuffle_idx" not in state_dict:
            raise ValueError("permuter 'stored' needs permuter.forward_shuffle_idx in the weights")
        return StoredOrder(state_dict["permuter.forward_shuffle_idx"],
                           state_dict["permuter.backward_shuffle_idx"])
    h, w = cfg.grid if cfg.grid is not None else (1, 1)
    return build_permuter(cfg.permuter, h, w)


class Prior(nn.Module):
    """GPT + reading order + conditioning stage; ``gpt(tokens)`` is the plain forward."""

    def __init__(self, cfg: PriorConfig, permuter: nn.Module | None = None,
                 cond_tokenizer: VQGAN | None = None):
        """``permuter``/``cond_tokenizer``: ready-made parts (e.g. imported ones) to use as is."""
        super().__init__()
        problems = cfg.check() + cfg.cond.check()
        if problems:
            raise ValueError("invalid prior config:\n" + "\n".join(f"  - {p}" for p in problems))
        self.config = cfg
        self.gpt = GPT(cfg.gpt)
        self.permuter = permuter if permuter is not None else build_order(cfg)
        if cfg.cond.kind == "spatial":
            self.cond_tokenizer = cond_tokenizer if cond_tokenizer is not None \
                else VQGAN(cfg.cond.tokenizer)
        else:
            self.cond_tokenizer = None

    @property
    def cond(self) -> CondConfig:
        return self.config.cond

    def permute(self, indices: torch.Tensor) -> torch.Tensor:
        """Raster tokens (B, h, w) or (B, h*w) -> (B, h*w) in reading order."""
        return self.permuter(indices.reshape(indices.shape[0], -1))

    def unpermute(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w) in reading order -> raster order (B, h*w)."""
        return self.permuter(tokens, reverse=True)

    @torch.no_grad()
    def cond_tokens(self, c: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Conditioning tokens (B, L) for ``c``: labels (B,), a map (B, C, H, W), or nothing (sos)."""
        kind = self.cond.kind
        if kind == "sos":
            b = batch_size if batch_size is not None else (c.shape[0] if c is not None else 1)
            return torch.full((b, 1), self.cond.sos_token, dtype=torch.long,
                              device=self.gpt.head.weight.device)
        if c is None:
            raise ValueError(f"{kind} conditioning needs an input")
        if kind == "class":
            return c.reshape(-1, 1).long()
        if kind == "coord":
            if c.shape[1] != 1 or c.min() < 0 or c.max() > 1:
                raise ValueError("coord conditioning expects (B, 1, H, W) values in [0, 1]")
            c = F.interpolate(c, scale_factor=1 / self.cond.coord_down_factor, mode="area")
            q = (self.cond.coord_n_embed * c.clamp(0.0, 1.0)).round().long()
            return q.reshape(q.shape[0], -1)
        if self.cond.downsample_size > -1:
            c = F.interpolate(c, size=(self.cond.downsample_size, self.cond.downsample_size))
        assert self.cond_tokenizer is not None
        return self.cond_tokenizer.encode(c).indices.reshape(c.shape[0], -1)

    def forward(self, c_tokens: torch.Tensor, z_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, len(z), vocab) predicting image tokens ``z`` (reading
        order) after conditioning ``c``: input ``cat(c, z)[:, :-1]``, outputs from len(c)-1 on."""
        logits = self.gpt(torch.cat((c_tokens, z_tokens), dim=1)[:, :-1])  # (B, Lc+Lz-1, V)
        return logits[:, c_tokens.shape[1] - 1:]
