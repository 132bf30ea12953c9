"""An epoch-seeded sampler that can resume mid-epoch at exactly the next sample."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation of ``range(length)``, padded and strided so every rank gets the same
    count (like DistributedSampler), and resumable: ``start_at(epoch, i)`` makes the next pass
    begin at this rank's ``i``-th index of that epoch.

    The permutation depends only on ``(seed, epoch)``, so a resumed run sees the same order as
    an uninterrupted one. ``len()`` is what the next pass yields (per rank, minus any resume
    offset), so ``len(DataLoader)`` matches the batches it actually produces.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    @property
    def per_rank(self) -> int:
        """Indices each rank sees in a full epoch (the data padded up to a multiple of ranks)."""
        return -(-self.length // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next pass uses (a pending resume is kept)."""
        self.epoch = epoch

    def start_at(self, epoch: int, index_in_epoch: int) -> None:
        """Resume: the next pass is ``epoch`` starting at this rank's ``index_in_epoch``-th index."""
        if not 0 <= index_in_epoch <= self.per_rank:
            raise ValueError(f"index_in_epoch {index_in_epoch} is not in 0..{self.per_rank}")
        self.epoch = epoch
        self._resume = (epoch, index_in_epoch)

    def _offset(self) -> int:
        return self._resume[1] if self._resume and self._resume[0] == self.epoch else 0

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index list for ``epoch``, ignoring any resume offset."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        while len(order) < total:  # pad by wrapping so every rank has the same count
            order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        offset = self._offset()
        self._resume = None  # the offset applies to one pass only
        return iter(self.epoch_indices(self.epoch)[offset:])

    def __len__(self) -> int:
        return self.per_rank - self._offset()


def reader_slot() -> tuple[int, int]:
    """(slot, n_slots) of this reader among all DDP ranks times DataLoader workers.

    Streaming datasets split their input by it, so every rank and worker reads a disjoint part.
    """
    import torch
    from torch.utils.data import get_worker_info

    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw
