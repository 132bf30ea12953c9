#!/usr/bin/env python
"""What train-prior's shard check (``data.verify: first``) costs: reading every sample of a shard
folder through the stage-two reader with and without the sha256 check.

    python benchmarks/shard_check.py --shards runs/quickstart/shards [--repeats 7]
    python benchmarks/shard_check.py --synthetic 4 --samples 300      # quickstart-layout shards

The reader is ``TokenShardDataset`` as training uses it (every flip variant, no shuffling, so both
modes do identical work apart from the check). With the check a shard is read whole, hashed, and
parsed from memory; without it the tar is parsed from the file. Runs alternate between the two
modes after one warm-up read (the files are in the page cache for both); the median of each is
reported. ``--synthetic`` writes shards with the quickstart shards' layout (32x32 uint8 tokens,
label grid, flip copies of both) in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line  # a sibling script: benchmarks/ is on sys.path

from vqgan_cli.shards.format import MANIFEST, MANIFEST_FORMAT, ShardWriter, TokenSample, TokenShardDataset, shard_name


def write_synthetic(root: Path, n_shards: int, samples: int, grid: int = 32) -> Path:
    """Shards in the layout of the quickstart's (tokens, cond and both flips, uint8)."""
    rng = np.random.default_rng(0)
    entries = []
    for s in range(n_shards):
        w = ShardWriter(root / shard_name(s))
        for i in range(samples):
            t = rng.integers(0, 256, (2, grid, grid), dtype=np.uint8)  # the grid and its flip copy
            c = rng.integers(0, 8, (2, grid, grid), dtype=np.uint8)
            w.write(TokenSample(f"landscape-{s * samples + i:07d}", t[0], c[0], None, t[1], c[1]))
        sha = w.close()
        entries.append({"index": s, "name": shard_name(s), "count": samples, "sha256": sha,
                        "bytes": (root / shard_name(s)).stat().st_size, "items": [s * samples, (s + 1) * samples],
                        "skipped": []})
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "complete": True, "grid": [grid, grid],
                "tokenizer": {"n_embed": 256, "weights_sha256": "0" * 64, "factor": 8},
                "cond": {"kind": "labels", "vocab_size": 8, "dtype": "uint8"}, "labels": None,
                "identity": {"flip_copies": True}, "shards": entries, "n_shards": n_shards}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def read_all(root: Path, verify: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(1 for _ in TokenShardDataset(root, shuffle=False, variants="all", verify=verify, split=(0, 1)))
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="a shard folder written by encode-dataset")
    ap.add_argument("--synthetic", type=int, default=4, help="without --shards: this many shards")
    ap.add_argument("--samples", type=int, default=300, help="samples per synthetic shard")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.shards or write_synthetic(Path(tmp), args.synthetic, args.samples)
        files = sorted(root.glob("shard-*.tar"))
        size = sum(p.stat().st_size for p in files)
        read_all(root, True)  # warm-up: page cache, imports
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                seconds, n = read_all(root, verify)
                times[verify].append(seconds)
        t0 = time.perf_counter()
        for p in files:
            hashlib.sha256(p.read_bytes()).hexdigest()
        hash_only = time.perf_counter() - t0
    plain, checked = statistics.median(times[False]), statistics.median(times[True])
    print(f"{root}: {len(files)} shard(s), {n} samples read (flip variants included), {size / 1e6:.2f} MB")
    print(f"{'read without check':<24}{plain * 1e3:10.1f} ms   {plain * 1e3 / len(files):8.1f} ms/shard")
    print(f"{'read with sha256 check':<24}{checked * 1e3:10.1f} ms   {checked * 1e3 / len(files):8.1f} ms/shard")
    print(f"{'check costs':<24}{(checked - plain) * 1e3:10.1f} ms   "
          f"{(checked - plain) * 1e3 / len(files):8.1f} ms/shard   {(checked - plain) / size * 1e9:6.2f} ms/MB   "
          f"{100 * (checked - plain) / plain:+.1f}% of reading")
    print(f"{'sha256 of the files alone':<24}{hash_only * 1e3:10.1f} ms   ({size / hash_only / 1e6:.0f} MB/s)")


if __name__ == "__main__":
    main()
