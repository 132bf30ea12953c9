"""Vector quantizers: the VQGAN codebook and the Gumbel-softmax variant of the released f8 model.

Default state-dict keys are exactly the official ones (``embedding.weight``; Gumbel: ``proj.*``,
``embed.weight``). Options that need extra state (EMA statistics, projections) add keys only
when switched on; usage and dead-code bookkeeping are plain attributes, never saved, because they
are statistics of recent batches rather than part of the model.

Reference layout of the Gumbel variant (CompVis/taming-transformers, ``taming/models/vqgan.py``
``GumbelVQ`` and ``taming/modules/vqvae/quantize.py`` ``GumbelQuantize``): ``GumbelVQ`` inherits
``VQModel``'s ``quant_conv`` (z_channels -> embed_dim) and ``post_quant_conv``, then builds
``GumbelQuantize(z_channels, embed_dim, n_embed)`` whose ``proj`` is a 1x1 conv z_channels ->
n_embed applied to the *quant_conv output* (embed_dim channels). So the reference only runs when
z_channels == embed_dim (256 and 256 in the released f8-8192 model) and the shapes are
``quant_conv.weight`` (256, 256, 1, 1), ``quantize.proj.weight`` (8192, 256, 1, 1),
``quantize.embed.weight`` (8192, 256). :class:`VQGAN` passes the channels the quantizer really
receives (embed_dim), which gives those same shapes and also works when the two differ.
Differences from the reference, on purpose: eval encodes by the argmax of the logits (the
reference adds Gumbel noise even in eval, so its tokens are random); training samples are soft
unless ``gumbel_hard`` (the reference trained with hard straight-through samples).

Index remap (the reference's ``remap``, diffusers' ``VectorQuantizer(remap=...)``): with
``n_used`` set, the buffer ``used`` (the official ``quantize.used``) lists codebook indices and
the tokens are positions in it. Encoding maps a code to its first position in ``used``; a code
absent from it becomes ``unknown_index``: ``"random"`` (the reference's default: a uniformly
random token, so such encodes are not deterministic), ``"extra"`` (one extra token ``n_used``,
which decodes as ``used[0]``) or a fixed token. Decoding maps a token ``t`` back to ``used[t]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqgan_cli.models.config import QuantizerConfig

_EMA_EPS = 1e-5  # Laplace smoothing of EMA cluster sizes, so an empty cluster never divides by 0


class Quantized(NamedTuple):
    """What a quantizer returns for a latent (B, D, h, w)."""

    z_q: torch.Tensor  # (B, embed_dim, h, w), straight-through: gradients flow to the input
    loss: torch.Tensor  # scalar codebook/commitment (VQ) or KL (Gumbel) term
    indices: torch.Tensor  # (B, h, w) int64, raster order
    perplexity: torch.Tensor  # scalar, exp(entropy of this batch's code histogram)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place when a process group exists, so every rank sees global statistics."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 when one code takes everything, n for a uniform use."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


class CodebookUsage:
    """Which codes were used in each of the last ``window`` training batches (a ring buffer).

    A plain object, not a module: its tensor is created lazily on the device of the counts, so it
    never enters a state dict nor gets broadcast by DDP as a buffer.
    """

    def __init__(self, n_embed: int, window: int):
        self.n_embed = n_embed
        self.window = window
        self.seen: torch.Tensor | None = None  # (window, n_embed) bool
        self.filled = 0
        self.cursor = 0

    @torch.compiler.disable  # a Python ring-buffer cursor: compiling it would recompile every step
    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        if self.seen is None or self.seen.device != counts.device:
            self.seen = torch.zeros(self.window, self.n_embed, dtype=torch.bool, device=counts.device)
            self.filled = self.cursor = 0
        self.seen[self.cursor] = counts > 0
        self.cursor = (self.cursor + 1) % self.window
        self.filled = min(self.filled + 1, self.window)

    def state(self) -> dict:
        """Tracking state for exact resume (kept out of the model's state dict on purpose)."""
        return {"seen": self.seen, "filled": self.filled, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.seen, self.filled, self.cursor = state["seen"], int(state["filled"]), int(state["cursor"])

    def usage(self) -> float:
        """Share of codes used at least once in the window; 0.0 before any training batch."""
        if self.seen is None or self.filled == 0:
            return 0.0
        return self.seen[: self.filled].any(0).float().mean().item()


class QuantizerBase(nn.Module):
    """What both quantizers share: codes <-> tokens through the optional ``used`` table."""

    used: torch.Tensor | None

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.n_embed = cfg.n_embed
        self.unknown_index = cfg.unknown_index
        # Placeholder contents: the real table comes with the weights (strict load fills it).
        self.register_buffer("used", None if cfg.n_used is None else torch.arange(cfg.n_used))

    @property
    def n_tokens(self) -> int:
        """Token ids this quantizer emits: the codebook, or ``len(used)`` (+1 with ``extra``)."""
        if self.used is None:
            return self.n_embed
        return self.used.numel() + (1 if self.unknown_index == "extra" else 0)

    def to_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> tokens (the identity without a remap)."""
        if self.used is None:
            return indices
        n_used = self.used.numel()
        pos = torch.arange(n_used, device=indices.device)
        # first position of each code in ``used``; n_used marks a code the table lacks
        table = torch.full((self.n_embed,), n_used, dtype=torch.long, device=indices.device)
        table = table.scatter_reduce(0, self.used.to(indices.device).long(), pos, reduce="amin")
        new = table[indices]
        unknown = new == n_used
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.n_tokens, (int(unknown.sum()),), device=new.device)
        elif self.unknown_index != "extra":
            new[unknown] = int(self.unknown_index)
        return new

    def to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> codebook indices (the identity without a remap)."""
        if self.used is None:
            return tokens
        used = self.used.to(tokens.device).long()
        if self.unknown_index == "extra":
            tokens = torch.where(tokens >= used.numel(), 0, tokens)
        return used[tokens]


class VectorQuantizer(QuantizerBase):
    """Nearest-neighbour codebook with a straight-through estimator (PAPER.md, "Quantizer")."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        self.config = cfg
        self.embed_dim = cfg.embed_dim
        self.code_dim = cfg.codebook_dim or cfg.embed_dim
        self.embedding = nn.Embedding(cfg.n_embed, self.code_dim)
        self.embedding.weight.data.uniform_(-1.0 / cfg.n_embed, 1.0 / cfg.n_embed)
        self.project_in: nn.Linear | None = None
        self.project_out: nn.Linear | None = None
        if cfg.codebook_dim:
            # Low-dimensional lookup (ViT-VQGAN): distances in a small space use the codebook better.
            self.project_in = nn.Linear(cfg.embed_dim, self.code_dim)
            self.project_out = nn.Linear(self.code_dim, cfg.embed_dim)
        if cfg.ema:
            # The codebook follows running means of its assigned inputs instead of gradients.
            self.embedding.weight.requires_grad_(False)
            # Cluster sizes start at one with sums equal to the codes, so an unused code stays put.
            self.register_buffer("ema_cluster_size", torch.ones(cfg.n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        self.tracker = CodebookUsage(cfg.n_embed, cfg.usage_window)
        self.steps_unused: torch.Tensor | None = None  # (n_embed,) int64, training steps since use

    def training_state(self) -> dict:
        """Usage window and dead-code counters, saved with resume state so restarts stay exact."""
        return {"usage": self.tracker.state(), "steps_unused": self.steps_unused}

    def load_training_state(self, state: dict) -> None:
        self.tracker.load(state["usage"])
        self.steps_unused = state["steps_unused"]

    def set_step(self, step: int) -> None:
        """Nothing anneals in a plain VQ; present so every quantizer takes the trainer's step."""

    def usage(self) -> float:
        """Share of codes used at least once over the last ``usage_window`` training batches."""
        return self.tracker.usage()

    def _book(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.config.l2_normalize else w

    def _to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B*h*w, code_dim) float32, the space where distances are measured."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.project_in is not None:
            flat = F.linear(flat, self.project_in.weight.float(), self.project_in.bias.float())
        return F.normalize(flat, dim=-1) if self.config.l2_normalize else flat

    def _from_code_space(self, flat: torch.Tensor) -> torch.Tensor:
        if self.project_out is None:
            return flat
        return F.linear(flat, self.project_out.weight.float(), self.project_out.bias.float())

    def forward(self, z: torch.Tensor) -> Quantized:
        b, _, h, w = z.shape
        cfg = self.config
        # Always float32: in bf16 many distances tie or swap and the argmin picks wrong codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._to_code_space(z)  # (N, code_dim)
            book = self._book()  # (n_embed, code_dim)
            with torch.no_grad():
                dist_ = (flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)
                         - 2.0 * flat @ book.t())  # (N, n_embed)
                idx = dist_.argmin(1)
            zq = F.embedding(idx, book)  # (N, code_dim)
            commit = F.mse_loss(flat, zq.detach())
            # legacy: beta on the codebook term (the reference's bug, kept because the released
            # weights were trained with it); paper: beta on the commitment term.
            w_commit, w_book = (1.0, cfg.beta) if cfg.beta_form == "legacy" else (cfg.beta, 1.0)
            loss = w_commit * commit
            if not cfg.ema:  # with EMA the codebook learns from its averages, not from a loss
                loss = loss + w_book * F.mse_loss(zq, flat.detach())
            zq = flat + (zq - flat).detach()  # straight-through
            out = self._from_code_space(zq).reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)
            counts = torch.bincount(idx, minlength=self.n_embed)
            if self.training:
                self._maintain(flat.detach(), idx, counts)
        return Quantized(out.to(z.dtype).contiguous(), loss, self.to_tokens(idx.view(b, h, w)),
                         perplexity_of(counts))

    @torch.compiler.disable  # data-dependent bookkeeping: keep it out of compiled graphs
    @torch.no_grad()
    def _maintain(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """Training-time bookkeeping: usage window, EMA codebook, dead-code restarts."""
        cfg = self.config
        if cfg.ema or cfg.restart_dead:
            # Global counts keep the codebook identical on every rank.
            counts = _all_reduce_sum(counts.clone())
        self.tracker.update(counts)
        if cfg.ema:
            self._ema_update(flat, idx, counts)
        if cfg.restart_dead:
            self._restart_dead(flat, counts)

    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        decay = self.config.ema_decay
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat.to(self.ema_embed_sum))
        _all_reduce_sum(sums)
        self.ema_cluster_size.mul_(decay).add_(counts.to(self.ema_cluster_size), alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        size = self.ema_cluster_size
        total = size.sum()
        smoothed = (size + _EMA_EPS) / (total + self.n_embed * _EMA_EPS) * total
        self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed[:, None])

    def _restart_dead(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        if self.steps_unused is None or self.steps_unused.device != counts.device:
            self.steps_unused = torch.zeros(self.n_embed, dtype=torch.long, device=counts.device)
        used = counts > 0
        self.steps_unused = torch.where(used, 0, self.steps_unused + 1)
        dead = self.steps_unused >= self.config.dead_after
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick].contiguous()  # (n_dead, code_dim): recent encoder outputs
        if _distributed():
            dist.broadcast(new, src=0)  # every rank must end with the same codebook
        # .data: the autograd graph of this step may still reference the weight; the rows we
        # overwrite were unused, so their gradient is zero whatever value they now hold.
        self.embedding.weight.data[dead] = new.to(self.embedding.weight.dtype)
        if self.config.ema:
            self.ema_embed_sum[dead] = new.to(self.ema_embed_sum)
            self.ema_cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> their quantized latent (B, embed_dim, h, w), as forward's z_q."""
        flat = self._from_code_space(F.embedding(self.to_codes(indices).reshape(-1), self._book()))
        b, h, w = indices.shape
        out = flat.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()
        return out.to(self.embedding.weight.dtype)


class GumbelQuantizer(QuantizerBase):
    """Gumbel-softmax codebook: logits over codes, relaxed one-hot samples, a KL prior term."""

    def __init__(self, cfg: QuantizerConfig, z_channels: int):
        """``z_channels``: channels of the latent fed to ``proj`` (see the module docstring)."""
        super().__init__(cfg)
        self.config = cfg
        self.embed_dim = cfg.embed_dim
        self.proj = nn.Conv2d(z_channels, cfg.n_embed, 1)
        self.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.temperature = cfg.temperature
        self.tracker = CodebookUsage(cfg.n_embed, cfg.usage_window)

    def training_state(self) -> dict:
        return {"usage": self.tracker.state()}

    def load_training_state(self, state: dict) -> None:
        self.tracker.load(state["usage"])

    def set_step(self, step: int) -> None:
        """Anneal the temperature exponentially from ``temperature`` to ``temperature_end``."""
        cfg = self.config
        if cfg.anneal_steps <= 0:
            self.temperature = cfg.temperature
            return
        frac = min(max(step, 0) / cfg.anneal_steps, 1.0)
        self.temperature = cfg.temperature * (cfg.temperature_end / cfg.temperature) ** frac

    def usage(self) -> float:
        """Share of codes used at least once over the last ``usage_window`` training batches."""
        return self.tracker.usage()

    def forward(self, z: torch.Tensor) -> Quantized:
        logits = self.proj(z)  # (B, n_embed, h, w)
        lf = logits.float()
        if self.training:
            one_hot = F.gumbel_softmax(lf, tau=self.temperature, dim=1, hard=self.config.gumbel_hard)
            idx = one_hot.argmax(1)  # (B, h, w)
            z_q = torch.einsum("bnhw,nd->bdhw", one_hot.to(self.embed.weight.dtype), self.embed.weight)
        else:
            # Deterministic tokens; a hard one-hot times the codebook is just the lookup.
            idx = lf.argmax(1)
            z_q = self.embed(idx).permute(0, 3, 1, 2)
        qy = F.softmax(lf, dim=1)
        # KL(q || uniform) per position, averaged over positions.
        loss = self.config.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_embed)
        if self.training:
            self.tracker.update(counts)
        return Quantized(z_q.contiguous(), loss, self.to_tokens(idx), perplexity_of(counts))

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> (B, embed_dim, h, w), the hard z_q of their codes."""
        return self.embed(self.to_codes(indices)).permute(0, 3, 1, 2).contiguous()


def build_quantizer(cfg: QuantizerConfig, z_channels: int) -> QuantizerBase:
    """The quantizer named by ``cfg.kind``; ``z_channels`` is the channel count it receives."""
    if cfg.kind == "gumbel":
        return GumbelQuantizer(cfg, z_channels)
    return VectorQuantizer(cfg)
