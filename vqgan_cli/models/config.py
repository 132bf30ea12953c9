"""Typed architecture settings of a tokenizer; the names follow the reference's ``ddconfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from vqgan_cli.config import spec


@dataclass
class AutoencoderConfig:
    """Encoder/decoder shape (PAPER.md, stage one). Defaults are the released f16 configs."""

    ch: int = spec(128, ge=1, help="base channel count")
    ch_mult: tuple[int, ...] = spec(default_factory=lambda: (1, 1, 2, 2, 4),
                                    help="channel multiplier per level; f = 2^(len-1)")
    num_res_blocks: int = spec(2, ge=1)
    attn_resolutions: tuple[int, ...] = spec(default_factory=lambda: (16,),
                                             help="feature-map sizes that get an AttnBlock")
    in_channels: int = spec(3, ge=1, help="3 for RGB, n_labels for segmentation, 1 for depth")
    out_channels: int = spec(3, ge=1)
    resolution: int = spec(256, ge=1, help="training crop size; decides where attention goes")
    z_channels: int = spec(256, ge=1)
    dropout: float = spec(0.0, ge=0.0, lt=1.0)
    norm: str = spec("group", choices=("group", "pixel"),
                     help="group: GroupNorm(32), the reference's and the official checkpoints'; pixel: "
                          "normalise over channels at each pixel, so a model trained on crops of large "
                          "images computes the same on whole images")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor f."""
        return 2 ** (len(self.ch_mult) - 1)

    def check(self) -> list[str]:
        problems = []
        if not self.ch_mult:
            problems.append("ch_mult: must name at least one level")
        elif any(m < 1 for m in self.ch_mult):
            problems.append(f"ch_mult: every multiplier must be >= 1, got {list(self.ch_mult)}")
        if self.norm == "group" and self.ch % 32 and self.ch >= 1:
            problems.append(f"ch: GroupNorm uses 32 groups, so ch must be a multiple of 32, got {self.ch}")
        if self.ch_mult and self.resolution % self.factor:
            problems.append(f"resolution: {self.resolution} is not a multiple of the factor {self.factor}")
        return problems


@dataclass
class QuantizerConfig:
    """Vector quantizer. ``kind: vq`` is the VQGAN codebook; ``gumbel`` the released f8 variant."""

    kind: str = spec("vq", choices=("vq", "gumbel"))
    n_embed: int = spec(1024, ge=2, help="codebook size")
    embed_dim: int = spec(256, ge=1)
    beta: float = spec(0.25, ge=0.0, help="commitment weight")
    beta_form: str = spec("legacy", choices=("legacy", "paper"),
                          help="legacy: mean((sg[zq]-z)^2) + beta*mean((zq-sg[z])^2), the "
                               "reference's default and what the released weights were trained "
                               "with; paper: beta on the commitment term as in the paper")
    l2_normalize: bool = spec(False, help="compare unit-normalised codes and inputs (cosine)")
    codebook_dim: int | None = spec(None, ge=1,
                                    help="look up codes in this lower dimension (in/out projections)")
    ema: bool = spec(False, help="update the codebook by exponential moving averages, not gradients")
    ema_decay: float = spec(0.99, gt=0.0, lt=1.0)
    restart_dead: bool = spec(False, help="re-seed codes unused for a while from recent encoder outputs")
    dead_after: int = spec(100, ge=1, help="steps without use before a code counts as dead")
    usage_window: int = spec(100, ge=1, help="batches over which codebook usage is measured")
    n_used: int | None = spec(None, ge=1,
                              help="index remap (the reference's remap, official releases' quantize.used "
                                   "buffer): tokens are positions in a table of this many codebook indices")
    unknown_index: int | str = spec("random",
                                    help="with n_used, the token of a code absent from the table: 'random' "
                                         "(the reference's default), 'extra' (one more token, n_used) or a "
                                         "fixed token")
    # gumbel only
    kl_weight: float = spec(5e-4, ge=0.0)
    temperature: float = spec(1.0, gt=0.0, help="gumbel start temperature")
    temperature_end: float = spec(1.0, gt=0.0, help="gumbel temperature after anneal_steps")
    anneal_steps: int = spec(0, ge=0, help="steps of exponential temperature annealing (0: none)")
    gumbel_hard: bool = spec(False, help="straight-through hard one-hot samples in training too "
                                         "(the reference's straight_through=True); eval is always hard")

    def check(self) -> list[str]:
        problems = []
        if self.kind == "gumbel" and (self.ema or self.codebook_dim or self.l2_normalize):
            problems.append("kind: gumbel does not combine with ema, codebook_dim or l2_normalize")
        if isinstance(self.unknown_index, str) and self.unknown_index not in ("random", "extra"):
            problems.append(f"unknown_index: must be 'random', 'extra' or an int, got {self.unknown_index!r}")
        return problems


@dataclass
class TokenizerConfig:
    """What a tokenizer is: its modality, autoencoder and quantizer."""

    modality: str = spec("image", choices=("image", "segmentation", "depth"),
                         help="image: RGB + perceptual/adversarial loss; segmentation: one-hot in, "
                              "logits out, BCE; depth: 1 channel in and out")
    n_labels: int | None = spec(None, ge=2, help="segmentation only: number of labels")
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def check(self) -> list[str]:
        ae = self.autoencoder
        problems = []
        if self.modality == "segmentation":
            if self.n_labels is None:
                problems.append("n_labels: required for a segmentation tokenizer")
            elif ae.in_channels != self.n_labels or ae.out_channels != self.n_labels:
                problems.append(f"autoencoder.in_channels/out_channels: must equal n_labels "
                                f"({self.n_labels}) for segmentation, got {ae.in_channels}/{ae.out_channels}")
        elif self.modality == "depth" and (ae.in_channels != 1 or ae.out_channels != 1):
            problems.append("autoencoder.in_channels/out_channels: must be 1 for depth")
        elif self.modality == "image" and ae.out_channels != ae.in_channels:
            problems.append("autoencoder.out_channels: must equal in_channels for images")
        return problems
