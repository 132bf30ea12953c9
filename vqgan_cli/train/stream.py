"""The training data as an endless stream of batches that a checkpoint can restart exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from vqgan_cli.runtime import Runtime, resolve_workers
from vqgan_cli.train import TrainingError


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # batches consumed in this epoch, per process


class BatchStream:
    """Endless batches over epochs, restartable at an exact (epoch, batch) position.

    Map-style datasets go through a ResumableSampler (shuffled per epoch by seed, split by rank);
    iterable datasets (tar shards) split themselves and are fast-forwarded on resume. The
    loader gets its own seeded generator so that making an iterator never consumes the global
    RNG: a resumed run then draws exactly the random numbers a straight run draws.
    """

    def __init__(self, dataset: Dataset, batch_size: int, workers: int | str, seed: int, rt: Runtime,
                 collate: Callable, position: DataPosition | None = None, shuffle: bool = True):
        from vqgan_cli.data.sampler import ResumableSampler

        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = resolve_workers(workers)  # `auto` fits the machine
        self.seed = seed
        self.collate = collate
        self.position = position or DataPosition()
        self.iterable = isinstance(dataset, IterableDataset)
        self.sampler = None if self.iterable else ResumableSampler(
            len(dataset), seed=seed, rank=rt.rank, world_size=rt.world_size, shuffle=shuffle)  # type: ignore[arg-type]
        if self.sampler is not None and len(self.sampler) < batch_size:
            raise TrainingError(f"the data has {len(dataset)} items, fewer than one batch of "  # type: ignore[arg-type]
                                f"{batch_size} per process: add data or lower train.batch_size")
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        pos = self.position
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(pos.epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pos.epoch)
        if self.sampler is not None:
            self.sampler.start_at(pos.epoch, pos.batch * self.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                            num_workers=self.workers, collate_fn=self.collate, drop_last=True,
                            generator=gen, persistent_workers=False,
                            prefetch_factor=4 if self.workers else None)
        self._it = iter(loader)
        if self.iterable:
            for _ in range(pos.batch):
                next(self._it)

    def next(self) -> dict:
        if self._it is None:
            self._start_epoch()
        assert self._it is not None
        try:
            batch = next(self._it)
        except StopIteration:
            if self.position.batch == 0:
                raise TrainingError("the data produced no batch at all: every file was skipped or "
                                    "the source is empty") from None
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._start_epoch()
            return self.next()
        self.position = DataPosition(self.position.epoch, self.position.batch + 1)
        return batch

    def close(self) -> None:
        self._it = None
