"""Autoregressive sampling from a prior's GPT: logit filtering, guidance, cached and plain decoding.

PAPER.md: logits / temperature, top-k keeps the k largest, optional top-p, then a draw from the
softmax. Two decisions make samples reproducible:

- Every sample row owns a ``torch.Generator`` and each step uses one uniform number per row
  (:func:`step_uniforms`, the row's stream in step order), turned into a token by inverse-CDF
  lookup. The random stream therefore depends only on the number of steps, never on how logits
  were computed, so the cached and the plain (uncached) path produce identical tokens whenever
  their logits agree (they do in float32 on CPU).
- Classifier-free guidance runs the conditional and the unconditional ("null") sequences as one
  batch of 2B rows and mixes their logits, ``u + s * (c - u)``, before temperature and filtering.

The window samplers (:mod:`vqgan_cli.sample.window`) reuse :func:`draw_tokens` and :class:`Guided`, with
one uniform number per grid position instead of one per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vqgan_cli.models.gpt import GPT
from vqgan_cli.models.kv_cache import StaticDecoder


class SamplingError(ValueError):
    """Settings or inputs that cannot be sampled; raised before any model work starts."""


@dataclass(frozen=True)
class SamplingOptions:
    """How a token is drawn from the next-token logits."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    n_tokens: int | None = None  # draw only ids below this (the image codebook of a shared vocab)

    def check(self, vocab_size: int) -> None:
        """Raise a SamplingError naming every bad value (checked before sampling starts)."""
        problems = []
        if not self.temperature > 0:
            problems.append(f"`temperature` must be > 0, got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            problems.append(f"`top_k` must be in [1, {vocab_size}] (the vocabulary), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"`top_p` must be in (0, 1], got {self.top_p}")
        if not self.cfg_scale >= 0:
            problems.append(f"`cfg_scale` must be >= 0, got {self.cfg_scale}")
        if problems:
            raise SamplingError("; ".join(problems))

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample row, so sample i depends only on its own seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def filter_logits(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Temperature, then top-k and top-p as -inf masks; ``logits`` (N, V) float."""
    if opts.n_tokens is not None:
        logits = logits[:, :opts.n_tokens]
    logits = logits.float() / opts.temperature
    if opts.top_k is not None and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p is not None and opts.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the best one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= opts.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: torch.Tensor, opts: SamplingOptions, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (N, V) from the uniform numbers ``u`` (N,): the inverse
    CDF of the filtered softmax at ``u``."""
    probs = filter_logits(logits, opts).softmax(-1)  # (N, V)
    cdf = probs.cumsum(-1)  # (N, V)
    target = (u.to(cdf.device) * cdf[:, -1]).to(cdf.dtype).unsqueeze(1)  # (N, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def step_uniforms(generators: list[torch.Generator], n_steps: int) -> torch.Tensor:
    """(B, n_steps) uniform numbers, row b from generator b: the numbers ``n_steps`` successive
    one-number draws would give, drawn at once (a draw per step costs a call per row)."""
    return torch.stack([torch.rand(n_steps, generator=g) for g in generators])


class Guided:
    """A GPT seen through classifier-free guidance: rows are doubled (conditional first, then
    unconditional) on the way in, and logits mixed on the way out. ``scale == 1``: plain GPT."""

    def __init__(self, gpt: GPT, scale: float = 1.0):
        self.gpt = gpt
        self.scale = scale

    @property
    def doubled(self) -> bool:
        return self.scale != 1.0

    def rows(self, batch: int) -> int:
        return 2 * batch if self.doubled else batch

    def join(self, cond_seq: torch.Tensor, null_seq: torch.Tensor | None) -> torch.Tensor:
        """(B, T) conditional and unconditional inputs -> the model's (rows, T) input."""
        if not self.doubled:
            return cond_seq
        if null_seq is None:
            raise SamplingError("`cfg_scale` needs unconditional (null) conditioning tokens")
        return torch.cat((cond_seq, null_seq))

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, V) -> (B, V) guided logits."""
        return mix(logits, self.scale)

    def full_last(self, seq: torch.Tensor) -> torch.Tensor:
        """Logits of the last position from a plain forward over ``seq`` (rows, T)."""
        return self.mix(self.gpt(seq)[:, -1])

    def double(self, tokens: torch.Tensor) -> torch.Tensor:
        """New image tokens (B, t) are the same for both halves of a guided batch."""
        return torch.cat((tokens, tokens)) if self.doubled else tokens


@torch.no_grad()
def sample_sequence(gpt: GPT, cond: torch.Tensor, n_tokens: int, opts: SamplingOptions,
                    generators: list[torch.Generator], prefix: torch.Tensor | None = None,
                    null_cond: torch.Tensor | None = None, cached: bool = True, compiled: bool = False,
                    on_token: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Sample ``n_tokens`` image tokens (reading order) after conditioning ``cond`` (B, Lc).

    ``prefix`` (B, Lp): known first tokens (completion), kept and extended. ``cached``: prefill
    once, then one token per step through a fixed-shape key/value cache
    (:class:`~vqgan_cli.models.kv_cache.StaticDecoder`; ``compiled``: its step under
    ``torch.compile``, compiled once per batch size and length); otherwise a full forward per
    token (the reference's plain loop), which draws the very same tokens. ``on_token``: called
    with each new token (B,) and its position, so a caller can show progress or stop (by raising).
    """
    B, Lc = cond.shape
    if len(generators) != B:
        raise SamplingError(f"{len(generators)} generators for a batch of {B}")
    if Lc + n_tokens - 1 > gpt.block_size:
        raise SamplingError(f"{Lc} conditioning + {n_tokens} image tokens exceed the prior's "
                            f"block size {gpt.block_size}")
    g = Guided(gpt, opts.cfg_scale)
    tokens = cond.new_zeros(B, 0) if prefix is None else prefix.long()
    if tokens.shape[1] >= n_tokens:
        return tokens[:, :n_tokens]
    start = tokens.shape[1]
    u = step_uniforms(generators, n_tokens - start)  # (B, steps)
    if not cached:
        while tokens.shape[1] < n_tokens:
            seq = g.join(torch.cat((cond, tokens), 1),
                         None if null_cond is None else torch.cat((null_cond, tokens), 1))
            nxt = draw_tokens(g.full_last(seq), opts, u[:, tokens.shape[1] - start])
            tokens = torch.cat((tokens, nxt[:, None]), 1)
            if on_token is not None:
                on_token(nxt, tokens.shape[1] - 1)
        return tokens
    decoder = StaticDecoder(gpt, g.rows(B), Lc + n_tokens - 1, compiled)
    first = g.join(torch.cat((cond, tokens), 1),
                   None if null_cond is None else torch.cat((null_cond, tokens), 1))
    nxt = mix_and_draw(decoder.prefill(first)[:, -1], u[:, 0], g.scale, opts)
    out = [tokens, nxt[:, None]]
    for step in range(start, n_tokens):
        if on_token is not None:
            on_token(nxt, step)
        if step + 1 < n_tokens:  # feed this token, draw the next (one compiled graph when compiled)
            nxt = decoder.step(g.double(nxt[:, None]), Lc + step, mix_and_draw, u[:, step + 1 - start],
                               g.scale, opts)
            out.append(nxt[:, None])
    return torch.cat(out, 1)


def mix_and_draw(logits: torch.Tensor, u: torch.Tensor, scale: float, opts: SamplingOptions) -> torch.Tensor:
    """Tokens (B,) from the model's logits (rows, V): guidance's mix when ``scale != 1`` (rows =
    2B, conditional first), then :func:`draw_tokens` with the uniform numbers ``u`` (B,)."""
    return draw_tokens(mix(logits, scale), opts, u)


def mix(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: rows (2B, V), conditional first, -> ``u + scale * (c - u)``
    (B, V); ``scale == 1``: the logits as they are (no unconditional half)."""
    if scale == 1.0:
        return logits
    c, u = logits.float().chunk(2)
    return u + scale * (c - u)
