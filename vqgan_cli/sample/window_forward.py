"""GPT forwards that compute only what a window's output needs, their memory, and bf16 sampling.

A window forward is fed only up to its output position (causal attention: later positions
cannot change that output), and its last layer computes only the rows that are read."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F

from vqgan_cli.models.gpt import GPT, LayerKV
from vqgan_cli.sample.tokens import SamplingError

PRECISIONS = ("fp32", "bf16")


@contextmanager
def precision_context(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """fp32: nothing changes. bf16: autocast, with every Linear weight of ``model`` cast to bf16
    once for the duration (restored on exit). Sampling runs without gradients, and autocast then
    re-casts each weight at every call (its cast cache only serves tensors that record
    gradients); casting once gives the same numbers without that cost. bf16 is 2-3x faster on
    CPUs with avx512_bf16; its tokens differ from float32's."""
    if precision not in PRECISIONS:
        raise SamplingError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    dev = next(model.parameters()).device.type
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    saved = [(m.weight.data, None if m.bias is None else m.bias.data) for m in linears]
    try:
        for m in linears:
            m.weight.data = m.weight.data.to(torch.bfloat16)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(torch.bfloat16)
        with torch.autocast(dev, dtype=torch.bfloat16):
            yield
    finally:
        for m, (w, b) in zip(linears, saved, strict=True):
            m.weight.data = w
            if b is not None:
                m.bias.data = b


# --------------------------------------------------------------------------------------------
# memory


def element_size(gpt: GPT) -> int:
    dev = gpt.head.weight.device.type
    return 2 if torch.is_autocast_enabled(dev) else gpt.head.weight.element_size()


def forward_bytes(gpt: GPT, length: int) -> int:
    """Activation memory of one window forward of ``length`` tokens (one batch row)."""
    c = gpt.cfg
    return 4 * length * (12 * c.n_embd + 2 * c.n_head * min(length, 256))


def cache_bytes(gpt: GPT, length: int, elem: int = 4) -> int:
    """Keys and values of ``length`` positions, every layer (one batch row)."""
    c = gpt.cfg
    return 2 * c.n_layer * length * c.n_embd * elem


def as_mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# forwards that compute only what a window's output needs


def _last_block(blk: torch.nn.Module, x: torch.Tensor, hq: torch.Tensor, xq: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The last block for one query row per sequence: ``hq``/``xq`` (N, 1, C) its normed input
    and residual, ``k``/``v`` (N, nh, L, hs) the keys/values it attends to."""
    a = blk.attn
    q = a._heads(a.query(hq))  # (N, nh, 1, hs)
    y = _attend(q, k, v, mask)  # (N, nh, 1, hs)
    y = y.transpose(1, 2).reshape(xq.shape)  # (N, 1, C)
    xq = xq + a.proj(y)
    return xq + blk.mlp(blk.ln2(xq))


def forward_last(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) of the last position of ``idx`` (N, T): the plain forward, except that the
    last block computes its query, attention output and MLP for that position only."""
    N, T = idx.shape
    x = gpt.drop(gpt.tok_emb(idx) + gpt.pos_emb[:, :T])  # (N, T, C)
    for blk in gpt.blocks[:-1]:
        x = blk(x)
    blk = gpt.blocks[-1]
    h = blk.ln1(x)
    k, v = blk.attn._heads(blk.attn.key(h)), blk.attn._heads(blk.attn.value(h))  # (N, nh, T, hs)
    x = _last_block(blk, x, h[:, -1:], x[:, -1:], k, v, None)  # the last query sees everything
    return gpt.head(gpt.ln_f(x[:, 0]))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``q`` (N, nh, T, hs) over ``k``/``v`` (N, nh, L, hs) where ``mask`` (N, 1,
    T, L) allows. One query row: plain matmuls (the fused kernel's set-up costs more than the
    maths); several: the fused kernel."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    if q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, nh, 1, L)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


def forward_rows(gpt: GPT, idx: torch.Tensor, start: torch.Tensor, last: int | torch.Tensor,
                 kv: list[LayerKV], sel: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, V) at position ``last`` of each row of ``idx`` (N, T), fed through the caches
    ``kv`` (each layer (S, nh, P, hs); position P - 1 is a scratch slot) at their rows ``sel``
    (N,; all S rows in order when None). Row n's tokens sit at positions ``start[n] + t``,
    after its cached positions, and are written into its cache; rows may start at different
    positions. Tokens past a row's ``last`` write keys/values beyond it, which that row's next
    feed overwrites before anything attends to them."""
    N, T = idx.shape
    P = kv[0].k.shape[2]
    dev = idx.device
    pos = start[:, None] + torch.arange(T, device=dev)  # (N, T)
    x = gpt.tok_emb(idx) + gpt.pos_emb[0, pos.clamp(max=gpt.block_size - 1)]  # (N, T, C)
    # whole (contiguous) cache rows: a slice of them would be copied by every matmul; the mask
    # hides the positions not yet written, and the scratch slot (queries sit below P - 1)
    allowed = torch.arange(P, device=dev)[None, None, :] <= pos[:, :, None]  # (N, T, P)
    rows = torch.arange(N, device=dev)
    at = sel if sel is not None else rows
    last = torch.as_tensor(last, device=dev).expand(N)
    write = pos.clamp(max=P - 1)
    for n, blk in enumerate(gpt.blocks):
        a = blk.attn
        h = blk.ln1(x)
        k, v = a._heads(a.key(h)), a._heads(a.value(h))  # (N, nh, T, hs)
        layer = kv[n]
        layer.k[at[:, None], :, write] = k.transpose(1, 2).to(layer.k.dtype)
        layer.v[at[:, None], :, write] = v.transpose(1, 2).to(layer.v.dtype)
        ks, vs = (layer.k, layer.v) if sel is None else (layer.k[sel], layer.v[sel])  # (N, nh, P, hs)
        if n + 1 < len(gpt.blocks):
            q = a._heads(a.query(h))
            y = _attend(q, ks, vs, allowed[:, None])
            x = x + a.proj(y.transpose(1, 2).reshape(x.shape))
            x = x + blk.mlp(blk.ln2(x))
        else:
            hq, xq = h[rows, last][:, None], x[rows, last][:, None]  # (N, 1, C)
            x = _last_block(blk, x, hq, xq, ks, vs, allowed[rows, last][:, None, None])
    return gpt.head(gpt.ln_f(x[:, 0]))

