"""GPT forwards that compute only what a window's output needs, their memory, and bf16 sampling.

A window forward is fed only up to its output position (causal attention: later positions
cannot change that output), and its last layer computes only the rows that are read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vqgan_cli.models.gpt import GPT, KVCache, LayerKV, causal_attention
from vqgan_cli.models.kv_cache import Fused, attend, cache_dtype
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


def forward_last(gpt: GPT, idx: torch.Tensor, fused: list[Fused] | None = None) -> torch.Tensor:
    """Logits (N, V) of the last position of ``idx`` (N, T): the plain forward, except that the
    last block computes its query, attention output and MLP for that position only."""
    N, T = idx.shape

    def attention(n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # every position's query, causally; the last block's single query sees everything
        return causal_attention(q, k, v) if q.shape[2] > 1 else attend(q, k, v, None)
    read = torch.full((N,), T - 1, device=idx.device)
    return gpt.logits(gpt.run(gpt.embed(idx), attention, fused, read=read)[:, 0])


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
                 kv: list[LayerKV], sel: torch.Tensor | None = None,
                 fused: list[Fused] | None = None) -> torch.Tensor:
    """Logits (N, V) at position ``last`` of each row of ``idx`` (N, T), fed through the caches
    ``kv`` (each layer (S, nh, P, hs); position P - 1 is a scratch slot) at their rows ``sel``
    (N,; all S rows in order when None). Row n's tokens sit at positions ``start[n] + t``,
    after its cached positions, and are written into its cache; rows may start at different
    positions. Tokens past a row's ``last`` write keys/values beyond it, which that row's next
    feed overwrites before anything attends to them. ``fused``: ``gpt.fused()``, taken once
    per sampling run by the caller (else here)."""
    N, T = idx.shape
    P = kv[0].k.shape[2]
    dev = idx.device
    pos = start[:, None] + torch.arange(T, device=dev)  # (N, T)
    # whole (contiguous) cache rows: a slice of them would be copied by every matmul; the mask
    # hides the positions not yet written, and the scratch slot (queries sit below P - 1)
    allowed = torch.arange(P, device=dev)[None, None, :] <= pos[:, :, None]  # (N, T, P)
    rows = torch.arange(N, device=dev)
    at = sel if sel is not None else rows
    last = torch.as_tensor(last, device=dev).expand(N)
    write = pos.clamp(max=P - 1)

    def attention(n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layer = kv[n]
        layer.k[at[:, None], :, write] = k.transpose(1, 2).to(layer.k.dtype)  # (N, T, nh, hs)
        layer.v[at[:, None], :, write] = v.transpose(1, 2).to(layer.v.dtype)
        ks, vs = (layer.k, layer.v) if sel is None else take_rows([layer], sel)[0]  # (N, nh, P, hs)
        # every fed position's query, or (the last block) the read position's alone
        mask = allowed[:, None] if q.shape[2] == T else allowed[rows, last][:, None, None]
        return attend(q, ks, vs, mask)
    x = gpt.embed(idx, pos.clamp(max=gpt.block_size - 1))
    return gpt.logits(gpt.run(x, attention, fused, read=last)[:, 0])


def prefill_shared(gpt: GPT, prefix: torch.Tensor, kv: list[LayerKV], rows: torch.Tensor,
                   fused: list[Fused] | None = None) -> None:
    """Write the keys/values of positions 0..n-1 of cache rows ``rows`` (R,) from their first
    tokens ``prefix`` (R, n). Every window's conditioning starts at position 0, so windows with
    the same conditioning crop (a uniform patch of sky, the null map of guidance) have the same
    keys/values there: they are computed once per distinct prefix and copied to each row."""
    uniq, inv = torch.unique(prefix, dim=0, return_inverse=True)  # (U, n), (R,)
    _prefill_unique(gpt, uniq, inv, kv, rows, fused)


def _prefill_unique(gpt: GPT, uniq: torch.Tensor, inv: torch.Tensor, kv: list[LayerKV],
                    rows: torch.Tensor, fused: list[Fused] | None = None) -> None:
    """:func:`prefill_shared` for prefixes already made unique: ``uniq`` (U, n), row r's is ``inv[r]``."""
    U, n = uniq.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=uniq.device).tril()

    def attention(i: int, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        layer = kv[i]
        layer.k[rows, :, :n] = k.index_select(0, inv).to(layer.k.dtype)
        layer.v[rows, :, :n] = v.index_select(0, inv).to(layer.v.dtype)
        return None if q is None else attend(q, k, v, causal)
    gpt.run(gpt.embed(uniq), attention, fused, outputs=False)  # the last layer: keys/values only


def forward_windows(gpt: GPT, seq: torch.Tensor, lc: int, fused: list[Fused] | None = None) -> torch.Tensor:
    """Logits (N, V) of the last position of windows ``seq`` (N, T) whose first ``lc`` tokens are
    conditioning: :func:`forward_last`'s result, with the conditioning's keys/values shared
    between windows that have the same conditioning (:func:`prefill_shared`)."""
    N, T = seq.shape
    shared = lc - 1  # the last conditioning position's output may be the one read: not shared
    if shared < 1:
        return forward_last(gpt, seq, fused)
    uniq, inv = torch.unique(seq[:, :shared], dim=0, return_inverse=True)
    if len(uniq) > 0.75 * N:  # little to share (low-resolution images rarely repeat): the plain way is cheaper
        return forward_last(gpt, seq, fused)
    kv = new_caches(gpt, N, T + 1)  # + a scratch slot (forward_rows)
    _prefill_unique(gpt, uniq, inv, kv, torch.arange(N, device=seq.device), fused)
    start = torch.full((N,), shared, device=seq.device)
    return forward_rows(gpt, seq[:, shared:], start, T - shared - 1, kv, fused=fused)


class PrefixStore:
    """The conditioning keys/values of every distinct window prefix of a run, computed before
    sampling: a spatial map is known in full up front, and a 1280x832 landscape map has about
    300 distinct 8x8 label crops among its 832 ``fast`` windows, so each is computed once, in
    large batches, and copied into a window's cache when the window starts."""

    def __init__(self, gpt: GPT, uniq: torch.Tensor, index: torch.Tensor, chunk: int,
                 fused: list[Fused] | None = None):
        U, n = uniq.shape
        self.layers = new_caches(gpt, U, n)
        self.index, self.n = index, n
        for c0 in range(0, U, chunk):  # already distinct: no second torch.unique
            rows = torch.arange(c0, min(c0 + chunk, U), device=uniq.device)
            _prefill_unique(gpt, uniq[rows], torch.arange(len(rows), device=uniq.device), self.layers, rows, fused)

    @classmethod
    def build(cls, gpt: GPT, prefixes: torch.Tensor, room: float, chunk: int,
              fused: list[Fused] | None = None) -> PrefixStore | None:
        """A store for ``prefixes`` (M, n), or None when its keys/values would not fit in
        ``room`` bytes (the caller then shares prefixes within each step only)."""
        uniq, index = torch.unique(prefixes, dim=0, return_inverse=True)
        if len(uniq) * cache_bytes(gpt, prefixes.shape[1], element_size(gpt)) > room:
            return None
        return cls(gpt, uniq, index, max(chunk, 1), fused)

    def copy_to(self, kv: list[LayerKV], rows: torch.Tensor, which: torch.Tensor) -> None:
        """Positions 0..n-1 of cache rows ``rows`` get the keys/values of prefixes ``which``."""
        idx = self.index[which]
        for layer, st in zip(kv, take_rows(self.layers, idx), strict=True):
            layer.k[rows, :, :self.n] = st.k
            layer.v[rows, :, :self.n] = st.v
