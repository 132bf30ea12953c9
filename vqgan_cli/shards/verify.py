"""Check a token shard folder against its manifest (``vqgan verify-shards``): what encode-dataset
recorded (sha256, counts) and what stage two will rely on (dtype, grid, token ranges, labels)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from vqgan_cli.checkpoints.format import file_sha256
from vqgan_cli.shards.format import MANIFEST, RANK_RECORD_RE, SHARD_RE, ShardError, load_manifest, read_shard


class VerifyReport(NamedTuple):
    """What ``verify-shards`` found: ok only when ``problems`` is empty."""

    ok: bool
    shards: int
    samples: int
    problems: list[str]


def verify_folder(root: str | Path) -> VerifyReport:
    """Check every shard against the manifest: presence, sha256, sample count, unique keys,
    dtype, grid shape, token ranges, conditioning alignment and class labels.

    A folder without a manifest raises ShardError (nothing to verify); a corrupt or foreign
    manifest is reported as the one problem found."""
    root = Path(root)
    try:
        m = load_manifest(root)
    except ShardError as e:
        if not (root / MANIFEST).is_file():
            raise
        return VerifyReport(False, 0, 0, [str(e)])
    problems: list[str] = []
    entries = m.get("shards", [])
    if not m.get("complete"):
        problems.append(f"encoding unfinished: {len(entries)} of {m.get('n_shards')} shards")
    n_embed, dtype = m["tokenizer"]["n_embed"], np.dtype(m["dtype"])
    cond = m.get("cond") or None
    grid = tuple(m["grid"]) if m.get("grid") else None
    classes = set(((m.get("labels") or {}).get("table") or {}).values())
    samples, seen = 0, set()
    for e in entries:
        p = root / e["name"]
        if not p.is_file():
            problems.append(f"{e['name']}: missing")
            continue
        if (sha := file_sha256(p)) != e["sha256"]:
            problems.append(f"{e['name']}: sha256 {sha[:12]}... differs from the manifest's "
                            f"{e['sha256'][:12]}...")
        try:
            found = _check_shard(p, n_embed, dtype, cond, grid, classes, m["identity"]["flip_copies"])
        except ShardError as err:
            problems.append(str(err))
            continue
        problems += [f"{e['name']}: {x}" for x in found.problems]
        if dup := seen & found.keys:
            problems.append(f"{e['name']}: ids also stored in an earlier shard, e.g. {sorted(dup)[0]!r}")
        seen |= found.keys
        if found.samples != e["count"]:
            problems.append(f"{e['name']}: {found.samples} samples, the manifest says {e['count']}")
        samples += found.samples
    recorded = {e["name"] for e in entries}
    problems += [f"{p.name}: shard not recorded in the manifest" for p in sorted(root.iterdir())
                 if SHARD_RE.match(p.name) and p.name not in recorded]
    if records := sorted(p.name for p in root.iterdir() if RANK_RECORD_RE.match(p.name)):
        problems.append(f"{records[0]} (and {len(records) - 1} more): shards recorded by the ranks of a torchrun "
                        "launch that did not finish; re-run its encode-dataset command to merge and finish them")
    return VerifyReport(not problems, len(entries), samples, problems)


class _ShardCheck(NamedTuple):
    samples: int
    problems: list[str]
    keys: set[str]


def _check_shard(path: Path, n_embed: int, dtype: np.dtype, cond: dict | None,
                 grid: tuple | None, classes: set[int], flip: bool) -> _ShardCheck:
    problems: list[str] = []
    keys: set[str] = set()
    n = 0
    for s in read_shard(path):
        n += 1
        if s.key in keys:
            problems.append(f"{s.key}: duplicate key")
        keys.add(s.key)
        grids = [("tokens", s.tokens, n_embed, dtype)]
        if flip:
            grids.append(("tokens_flip", s.tokens_flip, n_embed, dtype))
        if cond:
            cdt = np.dtype(cond["dtype"])
            grids.append(("cond", s.cond, cond["vocab_size"], cdt))
            if flip:
                grids.append(("cond_flip", s.cond_flip, cond["vocab_size"], cdt))
        for name, arr, vocab, dt in grids:
            if arr is None:
                problems.append(f"{s.key}: no {name}")
                continue
            if arr.dtype != dt or arr.ndim != 2 or (grid and tuple(arr.shape) != grid) \
                    or arr.shape != s.tokens.shape:
                problems.append(f"{s.key}: {name} is {arr.dtype} {arr.shape}, expected {dt} {grid or 'grid'}")
            elif arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
                problems.append(f"{s.key}: {name} values outside 0..{vocab - 1}")
        if classes and s.label not in classes:
            problems.append(f"{s.key}: class label {s.label} is not in the manifest's label table")
        if len(problems) > 20:
            problems.append("... (more problems not listed)")
            break
    return _ShardCheck(n, problems, keys)
