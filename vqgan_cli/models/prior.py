"""The transformer prior as a unit: GPT, reading order and conditioning (PAPER.md, stage two).

A :class:`Prior` is what ``load_prior`` returns, for our checkpoints and for official
Net2NetTransformer files alike. It holds no image tokenizer: priors are trained on token
shards and sampled together with a tokenizer loaded separately (an official transformer
``.ckpt`` also serves as that tokenizer, see :mod:`vqgan_cli.checkpoints.load`). Only a *spatial*
conditioning stage (a segmentation/depth/image VQGAN) lives inside, because its tokens are
part of the prior's input.

Conditioning kinds, as in the reference release:

- ``sos``: one start token (``sos_token``) for unconditional models;
- ``class``: the class index itself is the single conditioning token (shared vocabulary);
- ``spatial``: the raster tokens of a conditioning map encoded by ``cond_tokenizer``;
- ``coord``: a [0, 1] coordinate map, area-downsampled by ``coord_down_factor`` and
  quantized to ``round(coord_n_embed * c)`` (the reference's CoordStage);
- ``labels`` (ours): a label map whose label at the centre pixel of every ``label_factor``
  cell is the token (``encode-dataset --cond labels``): spatial conditioning without a second
  tokenizer.

Training additions (the reference's ``pkeep``, plus conditioning dropout for classifier-free
guidance): :meth:`Prior.training_sequences` builds the corrupted inputs and clean targets, and
:func:`token_nll` is the loss, the one definition training, validation, ``vqgan evaluate prior``
and the benchmark use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqgan_cli.config import spec
from vqgan_cli.data.maps import cell_labels
from vqgan_cli.data.transforms import degrade_batch
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.models.permuter import _IndexPermuter, build_permuter
from vqgan_cli.models.vqgan import VQGAN

COND_KINDS = ("sos", "class", "spatial", "coord", "labels")
SPATIAL_KINDS = ("spatial", "coord", "labels")


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
    n_labels: int | None = spec(None, ge=1, help="labels: label vocabulary")
    label_shift: int = spec(0, ge=0, le=255, help="spatial segmentation: added to a map's labels "
                                                   "(mod 256) before encoding (COCO-Stuff: 1)")
    label_factor: int | None = spec(None, ge=1, help="labels: pixels per token cell (the tokenizer's f)")
    lowres_factor: int | None = spec(None, ge=2, help="spatial: degrade the image S times first "
                                                      "(super-resolution, encode-dataset --cond lowres:S)")
    null_token: int | None = spec(None, ge=0, help="token replacing every conditioning token when "
                                                   "conditioning is dropped (classifier-free guidance)")

    @property
    def spatial(self) -> bool:
        """Whether conditioning is a token grid aligned with the image grid."""
        return self.kind in SPATIAL_KINDS

    def check(self) -> list[str]:
        problems = []
        if self.kind == "labels" and (self.n_labels is None or self.label_factor is None):
            problems.append("n_labels/label_factor: required for labels conditioning")
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
    image_vocab: int | None = spec(None, ge=1, help="image codebook size, when smaller than the "
                                                    "shared vocabulary (pkeep draws from it)")
    cond_dropout: float = spec(0.0, ge=0.0, lt=1.0, help="probability of replacing a sample's "
                                                         "conditioning by cond.null_token in training")

    @property
    def n_image_tokens(self) -> int:
        """Valid image tokens: the codebook, or the whole vocabulary when not recorded."""
        return self.image_vocab if self.image_vocab is not None else self.gpt.vocab_size

    def check(self) -> list[str]:
        problems = []
        if self.cond_dropout > 0 and self.cond.null_token is None:
            problems.append("cond.null_token: required when cond_dropout > 0")
        vocab = self.gpt.vocab_size
        if self.cond.null_token is not None and self.cond.null_token >= vocab:
            problems.append(f"cond.null_token: {self.cond.null_token} is outside the vocabulary of {vocab}")
        if self.image_vocab is not None and self.image_vocab > vocab:
            problems.append(f"image_vocab: {self.image_vocab} exceeds the vocabulary of {vocab}")
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
        if kind == "labels":  # the label at the centre pixel of every f x f cell
            labels = cell_labels(c.reshape(c.shape[0], *c.shape[-2:]), self.cond.label_factor)  # (B, h, w)
            return labels.reshape(c.shape[0], -1).long()
        if self.cond.lowres_factor is not None:
            c = degrade_batch(c, self.cond.lowres_factor)
        if self.cond.downsample_size > -1:
            c = F.interpolate(c, size=(self.cond.downsample_size, self.cond.downsample_size))
        assert self.cond_tokenizer is not None
        return self.cond_tokenizer.encode(c).indices.reshape(c.shape[0], -1)

    def forward(self, c_tokens: torch.Tensor, z_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, len(z), vocab) predicting image tokens ``z`` (reading
        order) after conditioning ``c``: input ``cat(c, z)[:, :-1]``, outputs from len(c)-1 on."""
        logits = self.gpt(torch.cat((c_tokens, z_tokens), dim=1)[:, :-1])  # (B, Lc+Lz-1, V)
        return logits[:, c_tokens.shape[1] - 1:]

    def null_cond(self, batch_size: int, length: int) -> torch.Tensor:
        """All-null conditioning (B, length): the unconditional branch of classifier-free guidance."""
        if self.cond.null_token is None:
            raise ValueError("this prior has no null token (trained without conditioning dropout)")
        return torch.full((batch_size, length), self.cond.null_token, dtype=torch.long,
                          device=self.gpt.head.weight.device)

    def training_sequences(self, c_tokens: torch.Tensor, z_raster: torch.Tensor,
                           generator: torch.Generator | None = None) -> TrainingSequences:
        """Inputs and targets of one teacher-forced step (PAPER.md, stage two).

        ``z_raster`` (B, h, w) or (B, h*w) is permuted to reading order; the targets are those
        clean tokens. In training mode, each input image token is replaced with probability
        ``1 - pkeep`` by a uniformly random image token, and each sample's conditioning with
        probability ``cond_dropout`` by ``null_token`` (all of it: the whole map or label).
        """
        z = self.permute(z_raster)  # (B, Lz) reading order
        z_in, c_in = z, c_tokens
        if self.training and self.config.pkeep < 1.0:
            keep = torch.rand(z.shape, generator=generator, device=z.device) < self.config.pkeep
            noise = torch.randint(0, self.config.n_image_tokens, z.shape, generator=generator,
                                  device=z.device)
            z_in = torch.where(keep, z, noise)
        if self.training and self.config.cond_dropout > 0:
            drop = torch.rand(c_tokens.shape[0], 1, generator=generator,
                              device=c_tokens.device) < self.config.cond_dropout  # (B, 1)
            c_in = torch.where(drop, torch.full_like(c_tokens, self.cond.null_token), c_tokens)
        return TrainingSequences(c_in, z_in, z)


class TrainingSequences(NamedTuple):
    """One step's sequences: ``cond`` (B, Lc) and ``image`` (B, Lz) inputs, clean ``targets``."""

    cond: torch.Tensor
    image: torch.Tensor
    targets: torch.Tensor


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats of teacher-forced ``logits`` (B, L, V) against ``targets`` (B, L),
    in fp32 whatever the autocast dtype of the logits: the prior's loss (PAPER.md, stage two).

    A function of the logits rather than a method running the forward: training calls the forward
    through its DDP/compiled wrapper and under autocast, which a method of the bare model would skip.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
