"""Token shard format and the stage-two reader, on synthetic token grids (no model needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import write_shards
from torch.utils.data import DataLoader

from vqgan_cli.shards.format import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardError,
    ShardWriter,
    TokenSample,
    TokenShardDataset,
    escape_key,
    read_manifest,
    read_shard,
    shard_name,
    token_dtype,
    unescape_key,
)


def _samples(n: int, grid=(6, 8), n_embed=300, cond_vocab=20, seed=0, flip=False, labels=True):
    rng = np.random.default_rng(seed)
    dt, cdt = token_dtype(n_embed), token_dtype(cond_vocab)
    out = []
    for i in range(n):
        # the conditioning grid encodes its own position so crops can be checked for alignment
        tokens = rng.integers(0, n_embed, grid).astype(dt)
        cond = (np.arange(grid[0] * grid[1]).reshape(grid) % cond_vocab).astype(cdt)
        out.append(TokenSample(f"dir/img.{i:03d}", tokens, cond, i % 5 if labels else None,
                               rng.integers(0, n_embed, grid).astype(dt) if flip else None,
                               cond[:, ::-1].copy() if flip else None))
    return out


def write_folder(root: Path, samples: list[TokenSample], per_shard: int, n_embed=300, cond_vocab=20,
                 flip=False) -> Path:
    """A minimal complete shard folder, as encode-dataset would leave it."""
    root.mkdir(parents=True, exist_ok=True)
    entries = write_shards(root, samples, per_shard)
    grid = list(samples[0].tokens.shape)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": True,
                "tokenizer": {"n_embed": n_embed}, "dtype": token_dtype(n_embed).name,
                "cond": {"vocab_size": cond_vocab, "dtype": token_dtype(cond_vocab).name},
                "grid": grid, "labels": {"names": [str(i) for i in range(5)],
                                         "table": {str(i): i for i in range(5)}},
                "identity": {"flip_copies": flip}, "shards": entries, "n_shards": len(entries)}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("vocab,dtype", [(2, np.uint8), (256, np.uint8), (257, np.int16),
                                         (16384, np.int16), (32768, np.int16), (32769, np.int32),
                                         (2 ** 20, np.int32)])
def test_token_dtype_is_the_smallest_that_fits(vocab, dtype):
    dt = token_dtype(vocab)
    assert dt == np.dtype(dtype)
    assert np.iinfo(dt).max >= vocab - 1
    assert np.array([vocab - 1]).astype(dt)[0] == vocab - 1


def test_keys_with_dots_survive_the_member_name():
    for key in ("a", "sub/dir/x.y.z", "100%.png", "a%2Eb"):
        assert unescape_key(escape_key(key)) == key
        assert "." not in escape_key(key).rsplit("/", 1)[-1]


def test_write_read_equality_and_reproducible_bytes(tmp_path):
    samples = _samples(7, flip=True)
    paths = []
    for name in ("a.tar", "b.tar"):
        w = ShardWriter(tmp_path / name)
        for s in samples:
            w.write(s)
        assert w.close() == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        paths.append(tmp_path / name)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # content-only bytes: no mtimes or owners
    back = list(read_shard(paths[0]))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert b.tokens.dtype == np.int16 and b.cond.dtype == np.uint8
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.cond, b.cond)
        np.testing.assert_array_equal(a.tokens_flip, b.tokens_flip)
        np.testing.assert_array_equal(a.cond_flip, b.cond_flip)
        assert a.label == b.label


def test_shards_are_plain_webdataset_tars(tmp_path):
    import tarfile

    import webdataset as wds

    samples = _samples(4)
    root = write_folder(tmp_path / "s", samples, per_shard=4)
    with tarfile.open(root / shard_name(0)) as tf:
        names = tf.getnames()
        assert all(m.mtime == 0 and m.uname == "" for m in tf.getmembers())
    assert names[:3] == ["dir/img%2E000.tokens.npy", "dir/img%2E000.cond.npy", "dir/img%2E000.cls"]
    ds = wds.WebDataset(str(root / shard_name(0)), shardshuffle=False).decode()
    got = list(ds)
    assert [g["__key__"] for g in got] == [escape_key(s.key) for s in samples]
    np.testing.assert_array_equal(got[2]["tokens.npy"], samples[2].tokens)
    assert got[3]["cls"] == samples[3].label


def test_damaged_shard_is_a_shard_error(tmp_path):
    root = write_folder(tmp_path / "s", _samples(3), per_shard=3)
    p = root / shard_name(0)
    p.write_bytes(p.read_bytes()[:700])
    with pytest.raises(ShardError, match="shard-000000.tar"):
        list(read_shard(p))


def test_manifest_gives_vocab_and_grid(tmp_path):
    root = write_folder(tmp_path / "s", _samples(5), per_shard=2)
    m = read_manifest(root)
    got = (m.vocab_size, m.n_embed, m.cond_vocab, m.grid, m.num_samples, m.n_classes)
    assert got == (300, 300, 20, (6, 8), 5, 5)
    raw = json.loads((root / MANIFEST).read_text())
    raw["complete"] = False
    (root / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ShardError, match="unfinished"):
        read_manifest(root)


@pytest.mark.parametrize("change", [{"version": MANIFEST_VERSION + 1}, {"format": "other"}, "corrupt"])
def test_every_reader_of_the_manifest_applies_the_same_rules(tmp_path, change):
    """Stage two, verify-shards and encode-dataset's resume all refuse the same manifests."""
    from vqgan_cli.encode import EncodeUsageError
    from vqgan_cli.encode.store import open_output
    from vqgan_cli.shards.verify import verify_folder

    root = write_folder(tmp_path / "s", _samples(3), per_shard=3)
    assert verify_folder(root).ok
    if change == "corrupt":
        (root / MANIFEST).write_text("{not json")
    else:
        raw = json.loads((root / MANIFEST).read_text())
        (root / MANIFEST).write_text(json.dumps({**raw, **change}))
    why = "corrupt manifest" if change == "corrupt" else "not an encode-dataset manifest"
    with pytest.raises(ShardError, match=why):
        read_manifest(root)
    report = verify_folder(root)
    assert not report.ok and len(report.problems) == 1 and why in report.problems[0]
    with pytest.raises(EncodeUsageError, match=why):
        open_output(root, {"identity": {}, "shards": []}, overwrite=False)
    with pytest.raises(ShardError, match="no manifest.json"):
        verify_folder(tmp_path / "empty")


def test_reader_whole_grids_in_order(tmp_path):
    samples = _samples(5)
    root = write_folder(tmp_path / "s", samples, per_shard=2)
    got = list(TokenShardDataset(root, crop=None, shuffle=False))
    assert [g["key"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples, strict=True):
        assert g["tokens"].dtype == torch.int64 and g["tokens"].shape == (6, 8)
        assert torch.equal(g["tokens"], torch.from_numpy(s.tokens.astype(np.int64)))
        assert g["label"] == s.label


def test_crops_are_aligned_between_tokens_and_cond(tmp_path):
    samples = _samples(12, cond_vocab=64)  # 6x8 = 48 positions, no wrap-around
    root = write_folder(tmp_path / "s", samples, per_shard=4, cond_vocab=64)
    by_key = {s.key: s for s in samples}
    ds = TokenShardDataset(root, crop=(3, 5), shuffle=True, seed=3, buffer_size=4)
    offsets = set()
    for g in ds:
        assert g["tokens"].shape == (3, 5) and g["cond"].shape == (3, 5)
        flat = int(g["cond"][0, 0])  # the cond grid holds each cell's raster position
        top, left = divmod(flat, 8)
        offsets.add((top, left))
        full = by_key[g["key"]]
        window = (slice(top, top + 3), slice(left, left + 5))
        assert torch.equal(g["tokens"], torch.from_numpy(full.tokens[window].astype(np.int64)))
        assert torch.equal(g["cond"], torch.from_numpy(full.cond[window].astype(np.int64)))
    assert len(offsets) > 3  # crops really move
    with pytest.raises(ValueError, match="larger than the token grid"):
        TokenShardDataset(root, crop=(7, 2))


def test_shuffle_is_seeded_and_changes_with_the_epoch(tmp_path):
    root = write_folder(tmp_path / "s", _samples(20), per_shard=5)
    keys = lambda ds: [g["key"] for g in ds]  # noqa: E731
    a, b = TokenShardDataset(root, seed=1, buffer_size=6), TokenShardDataset(root, seed=1, buffer_size=6)
    ka = keys(a)
    assert ka == keys(b) and sorted(ka) == sorted(s.key for s in _samples(20))
    assert ka != sorted(ka)
    a.set_epoch(1)
    assert keys(a) != ka and sorted(keys(a)) == sorted(ka)


@pytest.mark.parametrize("n", [2, 3, 7])  # fewer and more readers than the 3 shards
def test_split_across_readers_covers_every_sample_once(tmp_path, n):
    samples = _samples(9)
    root = write_folder(tmp_path / "s", samples, per_shard=3)
    seen = []
    for me in range(n):
        seen += [g["key"] for g in TokenShardDataset(root, shuffle=True, seed=0, split=(me, n))]
    assert sorted(seen) == sorted(s.key for s in samples)


def test_loader_workers_split_and_flip_variants(tmp_path):
    samples = _samples(8, flip=True)
    root = write_folder(tmp_path / "s", samples, per_shard=2, flip=True)
    loader = DataLoader(TokenShardDataset(root, crop=(2, 2), seed=0), batch_size=4, num_workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted([s.key for s in samples] * 2)  # "all": each flip copy is a sample
    once = [g["key"] for g in TokenShardDataset(root, variants="random", seed=0)]
    assert sorted(once) == sorted(s.key for s in samples)
    orig = {g["key"]: g["tokens"] for g in TokenShardDataset(root, variants="original", shuffle=False)}
    assert all(torch.equal(orig[s.key], torch.from_numpy(s.tokens.astype(np.int64))) for s in samples)
