"""Incremental decoding of the GPT prior: preallocated key/value caches and the attention over them.

Sampling one token at a time spends most of its time on per-call overhead, not arithmetic: at
batch 1 a step of a small prior is a few hundred tiny kernels. The caches here are allocated once
at their final shape and written in place; :meth:`KVCache.attention` gives ``GPT.run`` the
attention of a step over a cache (eager, any number of new tokens, rewinds allowed), and
:class:`StaticDecoder` a fixed-shape one-token step that ``torch.compile`` can capture whole
(no Python-side shape changes: the position is a tensor, the mask covers the whole buffer).
Both compute the same maths as ``GPT.forward`` (tests compare them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # annotations only: gpt.py builds on this module
    from vqgan_cli.models.gpt import GPT

Fused = tuple[torch.Tensor, torch.Tensor]  # one layer's query/key/value weight (3C, C) and bias (3C,)
Heads = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]  # q (None: not computed), k, v


class Attention(Protocol):
    """What ``GPT.run`` asks at every layer: the attention result (N, nh, Tq, hs) of queries
    ``q`` over (at least) the keys/values ``k``/``v`` (N, nh, T, hs) of the new positions, which
    the implementation may store first. ``q`` is None when the layer's output is not needed."""

    def __call__(self, layer: int, q: torch.Tensor | None, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor | None: ...


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
        # first decoding step (``GPT.fused``)
        self.qkv: list[Fused] | None = None

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

    def attention(self, pos: int, t: int) -> Attention:
        """The attention of ``t`` new positions pos..pos+t-1 (``GPT.run``): their keys/values are
        written into the cache, and each attends to every cached position up to its own."""
        end = pos + t
        keys = self.layers[0].k
        # the CPU's bfloat16 matmuls copy a slice of the cache at every call (171 us against 96
        # us for the whole 256-position buffer at 8 x 4 heads), so they read whole buffers, with
        # a mask that hides the positions after each row's own; other kernels take the slice
        span = self.max_len if keys.dtype != torch.float32 and keys.device.type == "cpu" else end
        mask = None
        if t > 1 or span > end:  # a row sees the cached positions and the new ones up to its own
            mask = torch.ones(t, span, dtype=torch.bool, device=keys.device).tril(diagonal=pos)

        def attention(n: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
            kv = self.layers[n]
            kv.k[:, :, pos:end] = k
            kv.v[:, :, pos:end] = v
            return None if q is None else attend(q, kv.k[:, :, :span], kv.v[:, :, :span], mask)
        return attention


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




# --------------------------------------------------------------------------------------------
# the fixed-shape decoding step


def decode_step(gpt: GPT, fused: list[Fused], layers: list[LayerKV], positions: torch.Tensor,
                idx: torch.Tensor, pos: torch.Tensor, then: Callable | None = None, *extra: object) -> torch.Tensor:
    """Logits (B, vocab) of one new token per row ``idx`` (B, 1) at position ``pos`` (a 0-d
    long tensor), through caches ``layers`` of fixed shape (B, nh, max_len, hs): the key/value
    write is an ``index_copy_`` at ``pos`` and the attention reads the whole buffer with a mask
    ``positions <= pos``, so nothing in it depends on ``pos`` as a Python number and one
    compiled graph serves every step. ``then(logits, *extra)``, when given, runs inside the same
    graph on the logits (a sampler's draw) and its result is returned instead."""
    allowed = (positions <= pos).view(1, 1, 1, -1)  # this step's row sees the cache up to its own position
    at = pos.view(1)

    def attention(n: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        kv = layers[n]
        kv.k.index_copy_(2, at, k.to(kv.k.dtype))
        kv.v.index_copy_(2, at, v.to(kv.v.dtype))
        return None if q is None else attend(q, kv.k, kv.v, allowed)
    logits = gpt.logits(gpt.run(gpt.embed(idx, pos), attention, fused))[:, -1]
    return logits if then is None else then(logits, *extra)


_COMPILED: dict[str, Callable] = {}


def compiled_step(device: torch.device) -> Callable:
    """:func:`decode_step` under ``torch.compile`` (whole graph, static shapes: compiled once per
    batch size, cache length and dtype); on CUDA with CUDA graphs (``reduce-overhead``), which
    replay a step's kernels in one launch."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[mode]


class StaticDecoder:
    """Decoding ``batch_size`` sequences of up to ``max_len`` positions: a prefill of several
    tokens (eager), then one-token steps through :func:`decode_step`, compiled or not.

    The cache and the fused projections are taken once, at creation, from the weights as they
    are then (under the precision context the sampler runs in)."""

    def __init__(self, gpt: GPT, batch_size: int, max_len: int, compiled: bool = False):
        self.gpt = gpt
        self.cache = gpt.new_cache(batch_size, max_len)
        self.cache.qkv = gpt.fused()
        device = self.cache.layers[0].k.device
        self.positions = torch.arange(max_len, device=device)
        if compiled and device.type == "cuda":
            for layer in self.cache.layers:  # CUDA graphs replay fixed addresses: say these are
                torch._dynamo.mark_static_address(layer.k)
                torch._dynamo.mark_static_address(layer.v)
        self._step = compiled_step(device) if compiled else None

    @property
    def fused(self) -> list[Fused]:
        """The fused projections the cache was started with (``KVCache.qkv``)."""
        assert self.cache.qkv is not None
        return self.cache.qkv

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, t, vocab) of the first ``t`` tokens ``idx`` (B, t)."""
        return self.gpt.forward_cached(idx, self.cache, 0)

    def step(self, idx: torch.Tensor, pos: int, then: Callable | None = None, *extra: object) -> torch.Tensor:
        """Logits (B, vocab) of ``idx`` (B, 1) at position ``pos`` (after every earlier one), or
        ``then(logits, *extra)`` (:func:`decode_step`; compiled, in the same graph).

        Eager, the step reads the cache up to ``pos`` only (``GPT.forward_cached``: measured
        faster than the fixed-shape step run eagerly, which reads the whole buffer)."""
        if self._step is None:
            logits = self.gpt.forward_cached(idx, self.cache, pos)[:, -1]
            return logits if then is None else then(logits, *extra)
        at = torch.tensor(pos, device=self.positions.device)
        out = self._step(self.gpt, self.fused, self.cache.layers, self.positions, idx, at, then, *extra)
        self.cache.length = pos + 1
        return out
