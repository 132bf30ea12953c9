"""encode-dataset under torchrun: one folder set-up, a fixed deal of shards, one merge at the end.

Shards stay the unit of work: shard ``s`` holds inputs ``[s * shard_size, (s + 1) * shard_size)``
whatever the number of processes, so N ranks write the very files one process writes (same names,
same bytes). Rank 0 opens the folder (identity check, recovery, folding in the records of a killed
launch) while the others wait, then they read its manifest; the shards still missing are dealt
out ``todo[rank::world]``, the same deal on every rank. Each rank records its commits in its own
file (:mod:`vqgan_cli.encode.store`); rank 0 watches those files (progress, and the end of the
last shard) and then merges them into the manifest; there is no collective after the set-up.
A resumed launch deals out only what is missing, so it may use another world size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from vqgan_cli.encode.inputs import EncodeUsageError
from vqgan_cli.encode.store import OutputFolder, drop_rank_records, merge_rank_records, open_output
from vqgan_cli.runtime import Runtime
from vqgan_cli.shards.format import RANK_RECORD_RE, load_manifest


def open_shared(out: Path, manifest: dict, overwrite: bool, rt: Runtime) -> tuple[OutputFolder, list[str]]:
    """:func:`open_output` on rank 0 only (one writer of the folder); the other ranks wait for it
    and then read the manifest it saved. A refusal on rank 0 stops every rank."""
    if not rt.distributed:
        return open_output(out, manifest, overwrite)
    folder, notes, error = None, [], None
    if rt.is_main:
        try:
            folder, notes = open_output(out, manifest, overwrite)
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    said: list[str | None] = [f"{error}" if error is not None else None]
    dist.broadcast_object_list(said, src=0)
    if error is not None:
        raise error
    if said[0] is not None:
        raise EncodeUsageError(f"rank {rt.rank} stopped: rank 0 could not open `out` (its error above)")
    if folder is None:
        folder = OutputFolder(out, load_manifest(out))
    folder.rank = rt.rank
    return folder, notes


def my_shards(folder: OutputFolder, rt: Runtime) -> list[int]:
    """This rank's part of the shards still missing: depends only on the manifest (the same on
    every rank) and the world size."""
    todo = [s for s in range(folder.manifest["n_shards"]) if s not in folder.done]
    return todo[rt.rank::rt.world_size]


def idle_note(folder: OutputFolder, rt: Runtime) -> str | None:
    """Shards are the unit of work: fewer shards left than ranks leaves ranks idle."""
    left = folder.manifest["n_shards"] - len(folder.done)
    if not rt.distributed or not 0 < left < rt.world_size:
        return None
    return (f"only {left} shard(s) left for {rt.world_size} ranks: {rt.world_size - left} rank(s) have nothing "
            "to do (each shard is encoded by one rank; a smaller --shard-size spreads a small data set wider)")


class OtherRanks:
    """Rank 0's view of the other ranks, through their records: the inputs they have committed in
    this launch (for the one progress bar) and the wait for their last shard. Waiting on files,
    not in a collective, because a collective times out (gloo 30 min, nccl 10 min) while a slower
    rank still encodes its last shard; a rank that dies makes torchrun stop rank 0 instead."""

    def __init__(self, folder: OutputFolder, rt: Runtime, every_s: float = 1.0):
        self.folder, self.rt, self.every_s = folder, rt, every_s
        self.active = rt.distributed and rt.is_main
        self.at, self.shards, self.inputs = -every_s, set(), 0

    def _read(self) -> None:
        shards, inputs = set(), 0
        for p in self.folder.out.iterdir():
            m = RANK_RECORD_RE.match(p.name)
            if m is None or int(m[1]) == self.rt.rank:
                continue
            try:
                entries = json.loads(p.read_text())["shards"]
            except (OSError, ValueError, KeyError, TypeError):
                return  # a record read while a rank replaces it: next time
            shards |= {int(e["index"]) for e in entries}
            inputs += sum(e["items"][1] - e["items"][0] for e in entries)
        self.at, self.shards, self.inputs = time.monotonic(), shards, inputs

    def items(self) -> int:
        """Inputs the other ranks have committed (re-read at most once per ``every_s``)."""
        if self.active and time.monotonic() - self.at >= self.every_s:
            self._read()
        return self.inputs

    def wait(self, show: Callable[[int], None], poll_s: float = 0.2) -> None:
        """Until every shard is committed by some rank; ``show(items())`` while waiting."""
        while self.active and not set(range(self.folder.manifest["n_shards"])) <= self.folder.done | self.shards:
            time.sleep(poll_s)
            self._read()
            show(self.inputs)


def finish_shared(folder: OutputFolder, encoded: int, rt: Runtime, others: OtherRanks) -> int:
    """After this process's last shard: in one process, or on rank 0 once every rank's shards are
    committed, the manifest takes the ranks' records and is marked complete (one atomic write).
    Returns the inputs this launch encoded (all ranks on rank 0); other ranks just return."""
    if rt.distributed and not rt.is_main:
        return encoded  # its shards are in its record: rank 0 merges them
    others.wait(lambda n: None)
    if rt.distributed:
        encoded += others.inputs
        merge_rank_records(folder.out, folder.manifest)
    folder.manifest["complete"] = True
    folder.save()
    drop_rank_records(folder.out)
    return encoded
