"""An evaluation split over torchrun ranks: each rank measures a disjoint share of the items
(:func:`~vqgan_cli.runtime.my_share`), then every rank gets all measurements back in the items'
original order, so set-level numbers (FID, KID, IS, means, codebook usage) are computed from the
same arrays, in the same order, as in one process. In one process every helper is a pass-through.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vqgan_cli.data import DataError
from vqgan_cli.data.dataset import ShardDataset, collate
from vqgan_cli.runtime import Runtime, any_rank, gather_rows, my_share

T = TypeVar("T")


def single_process(device: torch.device | str = "cpu") -> Runtime:
    """The runtime of a call made without torchrun (the library's default)."""
    return Runtime(torch.device(device))


class _IndexedItems(torch.utils.data.Dataset):
    """This rank's items of a map-style dataset, each tagged with its index in the whole set."""

    def __init__(self, inner: torch.utils.data.Dataset, indices: list[int]):
        self.inner, self.indices = inner, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        return {**self.inner[i], "index": i}


class FirstItems(torch.utils.data.IterableDataset):
    """The first ``n`` items of a streamed dataset."""

    def __init__(self, inner: torch.utils.data.IterableDataset, n: int):
        super().__init__()
        self.inner, self.n = inner, n

    def __iter__(self):  # noqa: ANN204
        for i, item in enumerate(self.inner):
            if i >= self.n:
                return
            yield item


_UNPLACED = 1 << 62  # an unreadable tar shard's marker has no position: it sorts last


def _tag_positions(shards: torch.utils.data.IterableDataset) -> None:
    """Make a tar-shard dataset tag each item with its place in one process's reading order
    (``ShardDataset.tag_positions``). Under torchrun the shard dataset splits itself over the
    ranks; its own split is kept."""
    if not isinstance(shards, ShardDataset):
        raise DataError(f"{type(shards).__name__}: a stream whose items cannot be placed in order; "
                        "evaluate it in one process")
    shards.tag_positions = True


def _first_positions(shards: list[str], n: int) -> int:
    """The tag of the ``n``-th item of the shards in order (tar headers only): a rank's items
    up to it are its part of the first ``n``."""
    from vqgan_cli.data.sources import shard_keys

    last, seen = -1, 0
    for si, path in enumerate(shards):
        try:
            count = len(shard_keys(path))
        except (tarfile.TarError, OSError):  # reading it yields one "unreadable shard" marker
            continue
        for pos in range(count):
            if seen == n:
                return last
            last, seen = (si << 32) | pos, seen + 1
    return last


class _PlacedStream(torch.utils.data.IterableDataset):
    """A tagged shard stream (this rank's part, as it splits itself), cut after tag ``last``."""

    def __init__(self, inner: torch.utils.data.IterableDataset, last: int | None):
        super().__init__()
        self.inner, self.last = inner, last

    def __iter__(self):  # noqa: ANN204
        for item in self.inner:
            i = item.get("index", _UNPLACED)
            if self.last is not None and self.last < i < _UNPLACED:
                return
            yield {**item, "index": i}


def share_dataset(ds: torch.utils.data.Dataset, rt: Runtime) -> torch.utils.data.Dataset:
    """This rank's share of ``ds`` (all of it in one process), items tagged with ``index``.

    Map-style datasets: items rank, rank + world, ... (:func:`my_share`). Streams of tar shards
    split themselves over the ranks; ``limit`` (a :class:`FirstItems`) then becomes "the
    items up to the limit-th of the whole stream", found from the shards' headers."""
    if not isinstance(ds, torch.utils.data.IterableDataset):
        return _IndexedItems(ds, my_share(len(ds), rt))
    inner = ds.inner if isinstance(ds, FirstItems) else ds
    _tag_positions(inner)
    if not rt.distributed:
        return _PlacedStream(ds, None)
    last = _first_positions(inner.shards, ds.n) if isinstance(ds, FirstItems) else None
    return _PlacedStream(inner, last)


def collate_indexed(samples: list[dict]) -> dict:
    """:func:`~vqgan_cli.data.dataset.collate`, keeping the indices of the good and the skipped items."""
    out = collate(samples)
    out["index"] = [s["index"] for s in samples if "skipped" not in s]
    out["skipped_index"] = [s["index"] for s in samples if "skipped" in s]
    return out


def padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with its last row repeated up to ``size`` rows (the caller keeps the first rows of
    the results). On the CPU a network's result for an image depends on the batch size (kernels
    are chosen by it; measured: batch 1 differs from batch 2 in the last float32 bits), not on
    the other images or their order, so computing every image in a batch of the same size gives
    the same numbers however the items were split over ranks or thinned by unreadable files."""
    n = x.shape[0]
    if n >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])


def gather_arrays(index: list[int], arrays: list[np.ndarray], rt: Runtime) -> list[np.ndarray]:
    """Every rank's rows of each array (row k belongs to item ``index[k]``), in item order.
    Gathered as tensors (exact: no conversion), on the process group's device."""
    if not rt.distributed:
        return arrays
    idx = gather_rows(torch.tensor(index, dtype=torch.long, device=rt.device), rt).cpu()
    order = torch.argsort(idx, stable=True)
    out = []
    for a in arrays:
        t = gather_rows(torch.from_numpy(np.ascontiguousarray(a)).to(rt.device), rt).cpu()
        out.append(t[order].numpy())
    return out


def gather_objects(index: list[int], items: list[T], rt: Runtime) -> list[T]:
    """Every rank's ``items`` (item k belongs to index ``index[k]``), in index order; for small
    things (per-image rows, skip messages): they travel pickled."""
    if not rt.distributed:
        return items
    parts: list[Any] = [None] * rt.world_size
    dist.all_gather_object(parts, list(zip(index, items, strict=True)))
    pairs = sorted((p for part in parts for p in part), key=lambda p: p[0])
    return [item for _, item in pairs]


def gather_set(items: set, rt: Runtime) -> set:
    """The union of every rank's ``items``."""
    if not rt.distributed:
        return items
    parts: list[Any] = [None] * rt.world_size
    dist.all_gather_object(parts, items)
    return set().union(*parts)


def from_main(make: Callable[[], T], rt: Runtime) -> T:
    """``make()`` run once, on rank 0, and its result sent to every rank (the cell classifier:
    20 s of fitting that other ranks need not repeat)."""
    if not rt.distributed:
        return make()
    box: list[Any] = [on_every_rank(make if rt.is_main else lambda: None, rt)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_every_rank(work: Callable[[], T], rt: Runtime) -> T:
    """``work()`` (this rank's share), then a check that every rank finished it: a rank that
    failed re-raises its error, the others stop with its message instead of waiting forever in
    the gather that follows."""
    if not rt.distributed:
        return work()
    error: Exception | None = None
    try:
        result = work()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
        error = e
    if any_rank(error is not None, rt):
        said: list[Any] = [None] * rt.world_size
        dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        rank, msg = next((r, m) for r, m in enumerate(said) if m is not None)
        raise DataError(f"rank {rank} of {rt.world_size} failed, so every rank stops: {msg}")
    return result
