"""The transformer prior: a decoder-only GPT in the minGPT layout of the reference release.

Parameter and buffer names match the reference's ``transformer.*`` keys exactly (PAPER.md, stage
two), so an official state dict loads with ``strict=True`` once the ``transformer.`` prefix is
stripped. Attention runs through ``F.scaled_dot_product_attention`` (same maths as the explicit
mask/softmax of minGPT, fused kernels where available). The ``attn.mask`` buffer is kept only so
official checkpoints load; the causal structure comes from ``is_causal`` / explicit masks.
(minGPT's ``n_unmasked`` option, a bidirectional prefix in that mask, is not supported.)

Two forward paths:

- ``GPT.forward(idx)``: the plain full-sequence forward used for training and by ``prior.gpt``.
- ``GPT.forward_cached(idx, cache, pos)``: incremental decoding with a preallocated
  :class:`KVCache`; prefill several tokens at once, then one token per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from vqgan_cli.config import spec
from vqgan_cli.models.kv_cache import KVCache, LayerKV, cache_dtype, decode

__all__ = ["GPT", "GPTConfig", "GPTSize", "KVCache", "LayerKV", "param_groups"]


@dataclass
class GPTSize:
    """Depth, width and dropout of the GPT: what a prior recipe chooses (its ``model.*``); the
    vocabulary and block size follow from the data (:class:`GPTConfig`). Defaults are the
    released 24-layer, 16-head, 1024-wide transformers."""

    n_layer: int = spec(24, ge=1)
    n_head: int = spec(16, ge=1)
    n_embd: int = spec(1024, ge=1)
    embd_pdrop: float = spec(0.0, ge=0.0, lt=1.0)
    resid_pdrop: float = spec(0.0, ge=0.0, lt=1.0)
    attn_pdrop: float = spec(0.0, ge=0.0, lt=1.0)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check(self) -> list[str]:
        problems = []
        if self.n_head >= 1 and self.n_embd % self.n_head:
            problems.append(f"n_embd: must be a multiple of n_head ({self.n_head}), got {self.n_embd}")
        return problems


@dataclass(kw_only=True)
class GPTConfig(GPTSize):
    """Shape of the prior: its size plus the vocabulary and the longest input."""

    vocab_size: int = spec(ge=1, help="max of the image and conditioning codebook sizes")
    block_size: int = spec(ge=1, help="longest input sequence: len(c) + len(s) - 1")


# --------------------------------------------------------------------------------------------
# model


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with minGPT's separate key/query/value/proj layers."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.key = nn.Linear(C, C)
        self.query = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        self.attn_pdrop = cfg.attn_pdrop
        self.n_head = cfg.n_head
        # unused by the maths (SDPA masks itself) but part of the official state dict
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None, pos: int = 0) -> torch.Tensor:
        """``x`` (B, T, C). With ``kv``, x holds positions pos..pos+T-1; their keys/values are
        written into the cache and the queries attend to every cached position up to their own."""
        B, T, C = x.shape
        q = self._heads(self.query(x))  # (B, nh, T, hs)
        k = self._heads(self.key(x))  # (B, nh, T, hs)
        v = self._heads(self.value(x))  # (B, nh, T, hs)
        dropout_p = self.attn_pdrop if self.training else 0.0

        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            end = pos + T
            kv.k[:, :, pos:end] = k
            kv.v[:, :, pos:end] = v
            # the cache may be stored in another dtype than autocast computes in
            k_all = kv.k[:, :, :end].to(q.dtype)  # (B, nh, end, hs)
            v_all = kv.v[:, :, :end].to(q.dtype)  # (B, nh, end, hs)
            if T == 1:  # the newest token sees everything: no mask needed
                y = F.scaled_dot_product_attention(q, k_all, v_all, dropout_p=dropout_p)
            elif pos == 0:
                y = F.scaled_dot_product_attention(q, k_all, v_all, dropout_p=dropout_p, is_causal=True)
            else:
                # is_causal aligns top-left; queries here sit at the bottom right of (T, end)
                allowed = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed,
                                                   dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.attn = CausalSelfAttention(cfg)
        # a Sequential so the keys are mlp.0 / mlp.2 as in the official checkpoints
        self.mlp = nn.Sequential(
            nn.Linear(C, 4 * C),
            nn.GELU(),  # exact (erf) GELU, as trained
            nn.Linear(4 * C, C),
            nn.Dropout(cfg.resid_pdrop),
        )

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv, pos)  # (B, T, C)
        x = x + self.mlp(self.ln2(x))  # (B, T, C)
        return x


def init_gpt_weights(module: nn.Module) -> None:
    """minGPT init, applied per module: N(0, 0.02) weights, zero biases, LayerNorm (1, 0).

    The released priors were trained from this init; ``pos_emb`` starts at zero separately.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class GPT(nn.Module):
    """Decoder-only transformer over token ids; logits for the next token at every position."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        problems = cfg.check()
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        # a ModuleList names its children blocks.0, blocks.1, ... like minGPT's Sequential
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_gpt_weights)

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` leaves out tok_emb and pos_emb."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (B, T) int64 -> logits (B, T, vocab); position t sees tokens 0..t."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, :T])  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(self.ln_f(x))  # (B, T, vocab)

    # -- incremental decoding ------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``max_len`` tokens.

        ``dtype`` defaults to the autocast dtype when autocast is on (the keys/values are
        computed in it anyway), else to the weights' dtype.
        """
        max_len = self.cfg.block_size if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.block_size:
            raise ValueError(f"max_len must be in [1, block_size={self.cfg.block_size}], got {max_len}")
        ref = self.head.weight
        device = ref.device if device is None else torch.device(device)
        dtype = cache_dtype(device, ref.dtype) if dtype is None else dtype
        return KVCache.empty(self.cfg.n_layer, batch_size, self.cfg.n_head, max_len,
                             self.cfg.head_dim, device=device, dtype=dtype)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache, pos: int | None = None) -> torch.Tensor:
        """Logits (B, t, vocab) for new tokens ``idx`` (B, t) at positions pos..pos+t-1.

        Their keys/values go into ``cache`` and each attends to every earlier cached position,
        so the result equals ``forward(full)[:, pos:pos+t]``. ``pos`` defaults to
        ``cache.length``; a smaller ``pos`` overwrites (rewinds) the tail. No gradients and no
        dropout: the cache exists for decoding only (:func:`~vqgan_cli.models.kv_cache.decode`),
        and it keeps the fused projection of the weights it started with: after changing the
        weights, start a new cache (its keys/values came from the old ones anyway).
        """
        B, t = idx.shape
        pos = cache.length if pos is None else pos
        if not 0 <= pos <= cache.length:
            raise ValueError(f"pos must be in [0, cache.length={cache.length}], got {pos}")
        if pos + t > cache.max_len:
            raise ValueError(f"positions up to {pos + t} exceed the cache's max_len {cache.max_len}")
        if B != cache.batch_size:
            raise ValueError(f"batch size {B} differs from the cache's {cache.batch_size}")
        return decode(self, idx, cache, pos)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on Linear weights only; none on biases, LayerNorm, embeddings or
    pos_emb (PAPER.md). Every trainable parameter lands in exactly one group; frozen ones
    (requires_grad=False) in none."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # deduplicates shared parameters
        if not p.requires_grad:
            continue
        (decay if id(p) in linear_weights else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
