"""Incremental decoding of the GPT prior: a preallocated key/value cache and a lean forward over it.

Sampling one token at a time spends most of its time on per-call overhead, not arithmetic: at
batch 1 a step of a small prior is a few hundred tiny kernels. :func:`decode` therefore calls the
functional ops on the GPT's own parameters directly (no module calls, no dropout), projects
queries, keys and values in one matmul (:func:`fused_qkv`), writes each step's keys/values in
place, and attends with the kernel measured fastest for the shape and dtype (:func:`attend`). It
computes the same maths as ``GPT.forward`` (tests compare the two)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from vqgan_cli.models.gpt import GPT


class LayerKV(NamedTuple):
    """One layer's preallocated keys and values, each (B, nh, max_len, hs)."""

    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    """Keys/values of every layer for incremental decoding, allocated once.

    Steps write in place at their positions instead of concatenating, so decoding N tokens costs
    no reallocation and memory is known up front. ``length`` counts the valid positions.
    """

    def __init__(self, layers: list[LayerKV], length: int = 0):
        self.layers = layers
        self.length = length
        # the fused projection of the weights this cache's keys/values come from, taken at its
        # first decoding step (:func:`fused_qkv`'s staleness check costs ~30 us, once per step)
        self.qkv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def empty(cls, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        """Zeroed buffers for ``max_len`` positions of ``batch_size`` sequences."""
        shape = (batch_size, n_head, max_len, head_dim)
        layers = [LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                          torch.zeros(shape, device=device, dtype=dtype)) for _ in range(n_layer)]
        return cls(layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]


def cache_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    """The dtype keys/values are kept in on ``device``: the autocast dtype when autocast is on
    there (they are computed in it anyway), else the weights' dtype."""
    on = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if on else weights


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``q`` (N, nh, T, hs) over ``k``/``v`` (N, nh, L, hs) where ``mask`` (broadcast
    to (N, nh, T, L)) allows. Measured on the CPU (``benchmarks/sampling.py``): the fused kernel
    wins in float32 except for one query row of many sequences; in bfloat16 plain matmuls win
    everywhere (2x with several query rows, up to 8x with one). Other devices: the fused kernel."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    on_cpu = q.device.type == "cpu"
    if not on_cpu or (q.dtype == torch.float32 and (q.shape[2] > 1 or q.shape[0] <= 4)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, nh, T, L)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


def fused_qkv(gpt: GPT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the query, key and value projections as one weight (3C, C) and bias (3C,): one
    matmul instead of three, which halves a decoding step's projection time in bfloat16 at batch
    1. Built from the current weights and rebuilt when any of them changes (another dtype from
    ``precision_context``, an optimiser step, a loaded state dict: new storage or a new version);
    the snapshot keeps the source tensors alive, so a storage address cannot be reused meanwhile."""
    sources = [t for blk in gpt.blocks for m in (blk.attn.query, blk.attn.key, blk.attn.value)
               for t in (m.weight, m.bias)]
    key = tuple((t.data_ptr(), t._version) for t in sources)
    snap = gpt.__dict__.get("_fused_qkv")
    if snap is None or snap[0] != key:
        with torch.no_grad():
            w = [(torch.cat(sources[i:i + 6:2]), torch.cat(sources[i + 1:i + 6:2])) for i in range(0, len(sources), 6)]
        gpt.__dict__["_fused_qkv"] = snap = (key, w, [t.data for t in sources])
    return snap[1]


def _norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def decode(gpt: GPT, idx: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """Logits (B, t, vocab) of tokens ``idx`` (B, t) at positions pos..pos+t-1, each attending to
    the cached positions before it and to the new ones up to itself. Writes their keys/values
    into ``cache`` and sets ``cache.length``; the caller checks the positions (``GPT.forward_cached``)."""
    B, t = idx.shape
    nh = gpt.cfg.n_head
    end = pos + t
    # the CPU's bfloat16 matmuls copy a slice of the cache at every call (171 us against 96 us
    # for the whole 256-position buffer at 8 x 4 heads), so they read whole buffers, with a mask
    # that hides the positions after each row's own; other kernels take the slice as it is
    keys = cache.layers[0].k
    whole = keys.dtype != torch.float32 and keys.device.type == "cpu"
    span = cache.max_len if whole else end
    mask = None
    if t > 1 or span > end:  # a row sees the cached positions and the new ones up to its own
        mask = torch.ones(t, span, dtype=torch.bool, device=idx.device).tril(diagonal=pos)
    x = F.embedding(idx, gpt.tok_emb.weight) + gpt.pos_emb[:, pos:end]  # (B, t, C)
    C = x.shape[-1]
    if cache.qkv is None:
        cache.qkv = fused_qkv(gpt)
    for blk, kv, (w, b) in zip(gpt.blocks, cache.layers, cache.qkv, strict=True):
        a = blk.attn
        qkv = F.linear(_norm(x, blk.ln1), w, b).view(B, t, 3, nh, C // nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, t, hs)
        kv.k[:, :, pos:end] = k
        kv.v[:, :, pos:end] = v
        y = attend(q, kv.k[:, :, :span], kv.v[:, :, :span], mask)  # (B, nh, t, hs)
        x = x + _linear(y.transpose(1, 2).reshape(B, t, C), a.proj)
        fc, out = blk.mlp[0], blk.mlp[2]
        x = x + _linear(F.gelu(_linear(_norm(x, blk.ln2), fc)), out)
    cache.length = end
    return F.linear(_norm(x, gpt.ln_f), gpt.head.weight)  # (B, t, vocab)
