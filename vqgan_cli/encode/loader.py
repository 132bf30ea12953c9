"""Batches for the encoder: shard-aligned index batches, decoded in DataLoader workers.

Workers run :class:`~vqgan_cli.encode.inputs.Prepare` (decode, resize, crop, degrade) while the
main process encodes the previous batch; a bad file comes back as a ``skip`` record instead of
an exception, so one corrupt JPEG neither kills a worker nor shifts the batches after it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from vqgan_cli.data import BadFile, DataError
from vqgan_cli.encode.inputs import InputItem, Prepare


class EncodeItems(Dataset):
    """Map-style view of the inputs for loader workers: never raises for a bad file."""

    def __init__(self, items: list[InputItem], prep: Prepare):
        self.items, self.prep = items, prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        meta = {"index": index, "key": it.key, "label": it.label, "path": it.path}
        if it.problem is not None:
            return {**meta, "skip": it.problem}
        try:
            return {**meta, **self.prep(it)}
        except BadFile as e:
            return {**meta, "skip": e.reason, "path": e.path}
        except DataError as e:  # e.g. a label outside n_labels: must stop the run
            return {**meta, "fatal": str(e)}


def collate_groups(samples: list[dict]) -> dict:
    """Metadata in order plus one stacked group per image shape (several only with --keep-aspect)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        if "image" in s:
            groups.setdefault(tuple(s["image"].shape), []).append(i)
    out = []
    for pos in groups.values():
        g = {"pos": pos, "image": torch.stack([samples[i]["image"] for i in pos])}
        if "map" in samples[pos[0]]:
            g["map"] = torch.stack([samples[i]["map"] for i in pos])
        out.append(g)
    meta = [{k: v for k, v in s.items() if k not in ("image", "map")} for s in samples]
    return {"meta": meta, "groups": out}


def shard_batches(todo: list[int], n_items: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches of the shards still to do; each shard is batched from its own first item."""
    out = []
    for s in todo:
        start, end = s * shard_size, min((s + 1) * shard_size, n_items)
        out += [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]
    return out

