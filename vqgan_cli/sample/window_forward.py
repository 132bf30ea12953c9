"""GPT forwards that compute only what a window's output needs, their memory, and bf16 sampling.

A window forward is fed only up to its output position (causal attention: later positions
cannot change that output), and its last layer computes only the rows that are read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F

from vqgan_cli.models.gpt import GPT, KVCache, LayerKV
from vqgan_cli.models.kv_cache import attend, cache_dtype, fused_qkv
from vqgan_cli.sample.tokens import SamplingError

SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")  # what a request may ask for; auto resolves to one of the others


@contextmanager
def precision_context(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """fp32: nothing changes. bf16: autocast, with every Linear weight of ``model`` cast to bf16
    once for the duration (restored on exit). Sampling runs without gradients, and autocast then
    re-casts each weight at every call (its cast cache only serves tensors that record
    gradients); casting once gives the same numbers without that cost. bf16 is 2-3x faster on
    CPUs with avx512_bf16; its tokens differ from float32's."""
    if precision not in SAMPLING_PRECISIONS[1:]:
        raise SamplingError(f"`precision` must be one of fp32, bf16 here (auto is resolved before), got {precision!r}")
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


def _cache_dtype(gpt: GPT) -> torch.dtype:
    """Window caches follow the decoding cache's rule (:func:`~vqgan_cli.models.kv_cache.cache_dtype`)."""
    w = gpt.head.weight
    return cache_dtype(w.device, w.dtype)


def element_size(gpt: GPT) -> int:
    return torch.empty((), dtype=_cache_dtype(gpt)).element_size()


def new_caches(gpt: GPT, rows: int, positions: int) -> list[LayerKV]:
    """Zeroed per-layer keys/values for ``rows`` windows of ``positions`` positions (zeros, not
    empty: a masked position still multiplies its value by 0, and 0 * NaN is NaN)."""
    c = gpt.cfg
    return KVCache.empty(c.n_layer, rows, c.n_head, positions, c.head_dim, device=gpt.head.weight.device,
                         dtype=_cache_dtype(gpt)).layers


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
    y = attend(q, k, v, mask)  # (N, nh, 1, hs)
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


def _project(h: torch.Tensor, qkv: tuple[torch.Tensor, torch.Tensor], n_head: int,
             keys_only: bool = False) -> torch.Tensor:
    """Queries, keys and values of ``h`` (N, T, C) in one matmul (:func:`fused_qkv`) as (N, T,
    3, nh, hs); ``keys_only``: keys and values, (N, T, 2, nh, hs)."""
    w, b = qkv
    N, T, C = h.shape
    if keys_only:
        w, b = w[C:], b[C:]
    return F.linear(h, w, b).view(N, T, -1, n_head, C // n_head)


def take_rows(kv: list[LayerKV], rows: torch.Tensor) -> list[LayerKV]:
    """Copies of cache rows ``rows`` (N,) of every layer. ``index_select``, not ``kv.k[rows]``:
    advanced indexing of a whole (S, nh, P, hs) cache is 3-7x slower on the CPU (138 us against
    21 us for 16 rows of 4 x 128 x 64 in bf16), and ``fast`` gathers at every step."""
    return [LayerKV(layer.k.index_select(0, rows), layer.v.index_select(0, rows)) for layer in kv]


def put_rows(kv: list[LayerKV], rows: torch.Tensor, src: list[LayerKV]) -> None:
    """Write ``src`` (N rows per layer) back to cache rows ``rows`` (N,, distinct): a copy per
    row, which is 2-3x faster than ``index_put_``/``index_copy_`` on the CPU at these sizes."""
    for n, r in enumerate(rows.tolist()):
        for layer, mine in zip(kv, src, strict=True):
            layer.k[r].copy_(mine.k[n])
            layer.v[r].copy_(mine.v[n])


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
    for n, (blk, layer, qkv) in enumerate(zip(gpt.blocks, kv, fused_qkv(gpt), strict=True)):
        a = blk.attn
        h = blk.ln1(x)
        final = n + 1 == len(gpt.blocks)  # the last layer needs queries of the rows read only
        proj = _project(h, qkv, gpt.cfg.n_head, keys_only=final)  # (N, T, 2 or 3, nh, hs)
        layer.k[at[:, None], :, write] = proj[:, :, -2].to(layer.k.dtype)
        layer.v[at[:, None], :, write] = proj[:, :, -1].to(layer.v.dtype)
        ks, vs = (layer.k, layer.v) if sel is None else take_rows([layer], sel)[0]  # (N, nh, P, hs)
        if not final:
            y = attend(proj[:, :, 0].transpose(1, 2), ks, vs, allowed[:, None])
            x = x + a.proj(y.transpose(1, 2).reshape(x.shape))
            x = x + blk.mlp(blk.ln2(x))
        else:
            hq, xq = h[rows, last][:, None], x[rows, last][:, None]  # (N, 1, C)
            x = _last_block(blk, x, hq, xq, ks, vs, allowed[rows, last][:, None, None])
    return gpt.head(gpt.ln_f(x[:, 0]))


def prefill_shared(gpt: GPT, prefix: torch.Tensor, kv: list[LayerKV], rows: torch.Tensor) -> None:
    """Write the keys/values of positions 0..n-1 of cache rows ``rows`` (R,) from their first
    tokens ``prefix`` (R, n). Every window's conditioning starts at position 0, so windows with
    the same conditioning crop (a uniform patch of sky, the null map of guidance) have the same
    keys/values there: they are computed once per distinct prefix and copied to each row."""
    uniq, inv = torch.unique(prefix, dim=0, return_inverse=True)  # (U, n), (R,)
    _prefill_unique(gpt, uniq, inv, kv, rows)


def _prefill_unique(gpt: GPT, uniq: torch.Tensor, inv: torch.Tensor, kv: list[LayerKV],
                    rows: torch.Tensor) -> None:
    """:func:`prefill_shared` for prefixes already made unique: ``uniq`` (U, n), row r's is ``inv[r]``."""
    U, n = uniq.shape
    x = gpt.tok_emb(uniq) + gpt.pos_emb[:, :n]  # (U, n, C)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    for layer, blk, qkv in zip(kv, gpt.blocks, fused_qkv(gpt), strict=True):
        a = blk.attn
        final = blk is gpt.blocks[-1]  # the last layer's outputs are not needed, only its keys/values
        proj = _project(blk.ln1(x), qkv, gpt.cfg.n_head, keys_only=final)  # (U, n, 2 or 3, nh, hs)
        k, v = proj[:, :, -2].transpose(1, 2), proj[:, :, -1].transpose(1, 2)  # (U, nh, n, hs)
        layer.k[rows, :, :n] = k.index_select(0, inv).to(layer.k.dtype)
        layer.v[rows, :, :n] = v.index_select(0, inv).to(layer.v.dtype)
        if not final:
            y = attend(proj[:, :, 0].transpose(1, 2), k, v, causal)
            x = x + a.proj(y.transpose(1, 2).reshape(x.shape))
            x = x + blk.mlp(blk.ln2(x))


def forward_windows(gpt: GPT, seq: torch.Tensor, lc: int) -> torch.Tensor:
    """Logits (N, V) of the last position of windows ``seq`` (N, T) whose first ``lc`` tokens are
    conditioning: :func:`forward_last`'s result, with the conditioning's keys/values shared
    between windows that have the same conditioning (:func:`prefill_shared`)."""
    N, T = seq.shape
    shared = lc - 1  # the last conditioning position's output may be the one read: not shared
    if shared < 1:
        return forward_last(gpt, seq)
    uniq, inv = torch.unique(seq[:, :shared], dim=0, return_inverse=True)
    if len(uniq) > 0.75 * N:  # little to share (low-resolution images rarely repeat): the plain way is cheaper
        return forward_last(gpt, seq)
    kv = new_caches(gpt, N, T + 1)  # + a scratch slot (forward_rows)
    _prefill_unique(gpt, uniq, inv, kv, torch.arange(N, device=seq.device))
    start = torch.full((N,), shared, device=seq.device)
    return forward_rows(gpt, seq[:, shared:], start, T - shared - 1, kv)


class PrefixStore:
    """The conditioning keys/values of every distinct window prefix of a run, computed before
    sampling: a spatial map is known in full up front, and a 1280x832 landscape map has about
    300 distinct 8x8 label crops among its 832 ``fast`` windows, so each is computed once, in
    large batches, and copied into a window's cache when the window starts."""

    def __init__(self, gpt: GPT, uniq: torch.Tensor, index: torch.Tensor, chunk: int):
        U, n = uniq.shape
        self.layers = new_caches(gpt, U, n)
        self.index, self.n = index, n
        for c0 in range(0, U, chunk):  # already distinct: no second torch.unique
            rows = torch.arange(c0, min(c0 + chunk, U), device=uniq.device)
            _prefill_unique(gpt, uniq[rows], torch.arange(len(rows), device=uniq.device), self.layers, rows)

    @classmethod
    def build(cls, gpt: GPT, prefixes: torch.Tensor, room: float, chunk: int) -> PrefixStore | None:
        """A store for ``prefixes`` (M, n), or None when its keys/values would not fit in
        ``room`` bytes (the caller then shares prefixes within each step only)."""
        uniq, index = torch.unique(prefixes, dim=0, return_inverse=True)
        if len(uniq) * cache_bytes(gpt, prefixes.shape[1], element_size(gpt)) > room:
            return None
        return cls(gpt, uniq, index, max(chunk, 1))

    def copy_to(self, kv: list[LayerKV], rows: torch.Tensor, which: torch.Tensor) -> None:
        """Positions 0..n-1 of cache rows ``rows`` get the keys/values of prefixes ``which``."""
        idx = self.index[which]
        for layer, st in zip(kv, take_rows(self.layers, idx), strict=True):
            layer.k[rows, :, :self.n] = st.k
            layer.v[rows, :, :self.n] = st.v
