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
from vqgan_cli.models.kv_cache import Attention, Fused, Heads, KVCache, LayerKV, cache_dtype

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
    """Multi-head causal self-attention with minGPT's separate key/query/value/proj layers.

    It exposes its two halves instead of one forward, so that every way of running the
    transformer (:meth:`GPT.run`) shares them: :meth:`heads` projects a normed input to
    queries/keys/values, and :meth:`output` turns the attention result back into the residual
    update. What attends to what (a causal mask, a key/value cache) is the caller's part."""

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

    def fused(self) -> Fused:
        """The query, key and value projections as one weight (3C, C) and bias (3C,): one matmul
        instead of three, which halves a decoding step's projection time in bfloat16 at batch 1.
        A snapshot of the current weights: take a new one after changing them."""
        with torch.no_grad():
            return (torch.cat((self.query.weight, self.key.weight, self.value.weight)),
                    torch.cat((self.query.bias, self.key.bias, self.value.bias)))

    def heads(self, h: torch.Tensor, fused: Fused | None = None, queries: bool = True) -> Heads:
        """Queries, keys and values of the normed input ``h`` (B, T, C), each (B, nh, T, hs);
        ``queries=False`` skips the queries (None). ``fused``: this layer's :meth:`fused`
        snapshot (one matmul), else the three layers (what training differentiates)."""
        B, T, C = h.shape
        nh = self.n_head
        if fused is None:
            split = lambda t: t.view(B, T, nh, C // nh).transpose(1, 2)  # noqa: E731
            q = split(F.linear(h, self.query.weight, self.query.bias)) if queries else None
            return q, split(F.linear(h, self.key.weight, self.key.bias)), \
                split(F.linear(h, self.value.weight, self.value.bias))
        w, b = fused if queries else (fused[0][C:], fused[1][C:])
        parts = F.linear(h, w, b).view(B, T, -1, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)
        return (parts[0] if queries else None), parts[-2], parts[-1]

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The residual update from the attention result ``y`` (B, nh, T, hs): heads side by
        side, then the output projection (B, T, C)."""
        B, nh, T, hs = y.shape
        out = F.linear(y.transpose(1, 2).reshape(B, T, nh * hs), self.proj.weight, self.proj.bias)
        return F.dropout(out, self.resid_drop.p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over ``x`` (B, T, C) on its own."""
        q, k, v = self.heads(x)
        return self.output(causal_attention(q, k, v, self.attn_pdrop if self.training else 0.0))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Every position attends to itself and the positions before it (the training forward)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def _norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)).

    In two steps so that callers choose the attention: :meth:`heads` (queries/keys/values of
    ln1(x)) and :meth:`finish` (the attention output's residual, then the MLP's). The functional
    calls skip nn.Module call overhead, which counts when decoding one token at a time."""

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

    def heads(self, x: torch.Tensor, fused: Fused | None = None, queries: bool = True) -> Heads:
        """Queries (None when ``queries`` is False), keys and values of ``x`` (B, T, C)."""
        return self.attn.heads(_norm(x, self.ln1), fused, queries)

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, C) updated by the attention result ``y`` (B, nh, T, hs) and the MLP."""
        x = x + self.attn.output(y)
        fc, out = self.mlp[0], self.mlp[2]
        h = F.linear(F.gelu(F.linear(_norm(x, self.ln2), fc.weight, fc.bias)), out.weight, out.bias)
        return x + F.dropout(h, self.mlp[3].p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        return self.finish(x, causal_attention(q, k, v, self.attn.attn_pdrop if self.training else 0.0))


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

    # -- the one layer loop --------------------------------------------------------------------

    def embed(self, idx: torch.Tensor, pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Token plus position embeddings (N, T, C) of ``idx`` (N, T): positions pos..pos+T-1
        for an int or a 0-d tensor ``pos`` (the same for every row), or ``pos`` (N, T) itself."""
        x = F.embedding(idx, self.tok_emb.weight)
        T = idx.shape[1]
        if isinstance(pos, int):
            x = x + self.pos_emb[:, pos:pos + T]
        elif pos.dim() == 0:
            x = x + self.pos_emb[0].index_select(0, pos + torch.arange(T, device=pos.device))
        else:
            x = x + self.pos_emb[0, pos]
        return F.dropout(x, self.drop.p, self.training)

    def run(self, x: torch.Tensor, attention: Attention, fused: list[Fused] | None = None,
            read: torch.Tensor | None = None, outputs: bool = True) -> torch.Tensor | None:
        """The blocks over embedded ``x`` (N, T, C), ``attention(layer, q, k, v)`` deciding what
        each query attends to (causal, through a cache, ...); the result (N, T, C) before
        ``ln_f``. Every forward of the prior is this loop with its own ``attention``.

        ``fused``: per layer, :meth:`CausalSelfAttention.fused` (decoding without gradients).
        ``read`` (N,): only that position of each row is read from the output, so the last block
        computes its query, attention and MLP for it alone (result (N, 1, C)). ``outputs=False``:
        no output is read; the last block computes keys and values only (``attention`` gets
        ``q=None``, and the result is None), which is all a cache prefill needs."""
        last = len(self.blocks) - 1
        for n, blk in enumerate(self.blocks):
            f = None if fused is None else fused[n]
            if n < last or (read is None and outputs):
                q, k, v = blk.heads(x, f)
                x = blk.finish(x, attention(n, q, k, v))
                continue
            _, k, v = blk.heads(x, f, queries=False)
            if not outputs:
                attention(n, None, k, v)
                return None
            x = x[torch.arange(len(x), device=x.device), read][:, None]  # (N, 1, C)
            q, _, _ = blk.heads(x, f)  # the query of the read position only (its keys are above)
            x = blk.finish(x, attention(n, q, k, v))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab) from the blocks' output."""
        return F.linear(_norm(x, self.ln_f), self.head.weight)

    def fused(self) -> list[Fused]:
        """Every layer's fused query/key/value projection (:meth:`CausalSelfAttention.fused`)."""
        return [blk.attn.fused() for blk in self.blocks]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (B, T) int64 -> logits (B, T, vocab); position t sees tokens 0..t."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        p = self.blocks[0].attn.attn_pdrop if self.training else 0.0
        x = self.run(self.embed(idx), lambda n, q, k, v: causal_attention(q, k, v, p))
        return self.logits(x)

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
        dropout: the cache exists for decoding only, and it keeps the fused projection of the
        weights it started with: after changing the weights, start a new cache (its
        keys/values came from the old ones anyway).
        """
        B, t = idx.shape
        pos = cache.length if pos is None else pos
        if not 0 <= pos <= cache.length:
            raise ValueError(f"pos must be in [0, cache.length={cache.length}], got {pos}")
        if pos + t > cache.max_len:
            raise ValueError(f"positions up to {pos + t} exceed the cache's max_len {cache.max_len}")
        if B != cache.batch_size:
            raise ValueError(f"batch size {B} differs from the cache's {cache.batch_size}")
        if cache.qkv is None:
            cache.qkv = self.fused()
        x = self.run(self.embed(idx, pos), cache.attention(pos, t), cache.qkv)
        cache.length = pos + t
        return self.logits(x)


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
