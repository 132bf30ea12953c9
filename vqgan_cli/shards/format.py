"""Token shards: the on-disk hand-over from the tokenizer (stage one) to the prior (stage two).

A shard is a plain tar (readable by ``tar`` and ``webdataset``) whose samples are keyed by the
source id and hold ``tokens.npy`` (the (h, w) grid in the smallest integer dtype that fits the
codebook), optionally ``cond.npy`` (conditioning tokens on the same grid), ``cls`` (a class index
as text) and, with flip copies, ``tokens_flip.npy`` / ``cond_flip.npy`` (the encoding of the
mirrored image, not a mirrored grid: tokens are not flip-equivariant). ``manifest.json`` beside
the shards says what produced them; the prior reads vocab sizes and grid shape from it.

Bytes are a function of content only (fixed member order, mtime 0, no user names), so an
interrupted and resumed encode ends with the same files as an uninterrupted one.

``manifest.json`` keys: ``tokenizer`` (path, weights_sha256, n_embed, factor, config), ``cond``
(kind, tokenizer or null, vocab_size, dtype, n_labels, classes) or null, ``vocab_size`` (shared
table: max of both), ``dtype``, ``grid`` ([h, w]; null when grids vary), ``labels`` (source,
table name -> index, names, n_classes) or null, ``shards`` (index, name, count, sha256, bytes,
items [first, end) of the inputs, skipped), ``skipped`` (id, path, reason), ``counts``,
``complete``, ``command``, ``identity`` (what a resume must match) and ``run`` (batch size,
workers, device, precision, world_size: the number of torchrun processes of the last launch).

Under torchrun the shards are the same files one process writes (same names and bytes); while a
launch runs, or after one was killed, ``.progress-rank-NNNNN.json`` files hold the shards each
rank has committed, and the next run of the command merges them into the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from vqgan_cli.checkpoints.format import file_sha256
from vqgan_cli.data.sampler import reader_slot
from vqgan_cli.data.sources import split_member_name
from vqgan_cli.faults import naming

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vqgan-token-shards"
MANIFEST_VERSION = 1
FLIP_SUFFIX = "_flip"
VARIANTS = ("all", "random", "original")


class ShardError(Exception):
    """A token shard folder that cannot be used as it is; the message names the file."""


SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")  # the names shard_name gives
RANK_RECORD_RE = re.compile(r"^\.progress-rank-(\d{5})\.json$")  # the names rank_record_name gives


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def rank_record_name(rank: int) -> str:
    """Where one torchrun rank of encode-dataset records the shards it committed until rank 0
    merges them into the manifest (only rank 0 writes ``manifest.json``)."""
    return f".progress-rank-{rank:05d}.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest integer dtype holding ``0..vocab_size-1``: uint8 up to 256 codes, then int16/int32
    (signed beyond uint8 because torch handles int16/int32 everywhere, uint16 barely)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 2 ** 15:
        return np.dtype(np.int16)
    if vocab_size <= 2 ** 31:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size {vocab_size} does not fit int32")


def escape_key(key: str) -> str:
    """Source id -> tar member stem: webdataset splits a member name at the first dot of its
    base name, so dots (and the escape character) are percent-encoded."""
    return key.replace("%", "%25").replace(".", "%2E")


def unescape_key(stem: str) -> str:
    return stem.replace("%2E", ".").replace("%25", "%")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


@dataclass
class TokenSample:
    """One stored sample: its source id, token grid and, where present, conditioning and class."""

    key: str
    tokens: np.ndarray  # (h, w)
    cond: np.ndarray | None = None  # (h, w), same grid as tokens
    label: int | None = None
    tokens_flip: np.ndarray | None = None
    cond_flip: np.ndarray | None = None

    def members(self) -> list[tuple[str, bytes]]:
        """(field, bytes) in the fixed order every shard uses."""
        out = [("tokens.npy", npy_bytes(self.tokens))]
        if self.cond is not None:
            out.append(("cond.npy", npy_bytes(self.cond)))
        if self.label is not None:
            out.append(("cls", str(int(self.label)).encode()))
        if self.tokens_flip is not None:
            out.append((f"tokens{FLIP_SUFFIX}.npy", npy_bytes(self.tokens_flip)))
        if self.cond_flip is not None:
            out.append((f"cond{FLIP_SUFFIX}.npy", npy_bytes(self.cond_flip)))
        return out


class ShardWriter:
    """Streams samples into one tar with reproducible headers; ``close`` fsyncs and returns the
    file's sha256 so the caller can record it before the shard is renamed into place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, sample: TokenSample) -> None:
        stem = escape_key(sample.key)
        with naming(self.path):
            for fld, data in sample.members():
                info = tarfile.TarInfo(f"{stem}.{fld}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> str:
        with naming(self.path):
            self._tar.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        return file_sha256(self.path)

    def abort(self) -> None:
        """Delete the unfinished file. Never raises: it runs while another error (often a full
        disk, which closing the tar would hit again) is on its way to the user."""
        with contextlib.suppress(OSError):
            self._fh.close()  # the tar's end blocks are not written: the file goes anyway
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def altered_shard(path: str | Path, have: str, want: str, command: str | None) -> ShardError:
    """The error for a shard whose bytes no longer match the manifest, with the remedy."""
    how = f"`{command}`" if command else "the encode-dataset command that wrote it"
    return ShardError(f"{path}: sha256 {have[:12]}... differs from the manifest's {want[:12]}...: the shard "
                      "changed after encode-dataset wrote it, and its tokens cannot be trusted. Re-run "
                      f"{how} (it re-encodes the shards that fail verification, and only those), then "
                      "run this command again")


def read_shard(path: str | Path, sha256: str | None = None, command: str | None = None) -> Iterator[TokenSample]:
    """Samples of one shard in stored order; a ShardError names the shard on any damage.

    With ``sha256`` the file is read whole and hashed before its first sample is given out, and
    a mismatch raises (``command``: the encode-dataset command to name in the remedy).
    """
    current: TokenSample | None = None
    try:
        if sha256 is not None:
            whole = Path(path).read_bytes()
            if (have := hashlib.sha256(whole).hexdigest()) != sha256:
                raise altered_shard(path, have, sha256, command)
            opened = tarfile.open(fileobj=io.BytesIO(whole), mode="r:")
        else:
            opened = tarfile.open(path, mode="r:")
        with opened as tf:
            for member in tf:
                if not member.isfile():
                    continue
                stem, fld = split_member_name(member.name)
                key = unescape_key(stem)
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    current = TokenSample(key, np.zeros((0, 0), np.uint8))
                if fld == "cls":
                    current.label = int(data.decode())
                elif fld.endswith(".npy") and fld[:-4] in ("tokens", "cond", "tokens_flip", "cond_flip"):
                    setattr(current, fld[:-4], npy_array(data))
                else:
                    raise ShardError(f"{path}: unexpected member {member.name}")
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise ShardError(f"{path}: damaged shard ({e})") from None
    if current is not None:
        yield current


@dataclass
class TokenManifest:
    """What stage two needs from ``manifest.json``: vocabularies, grid, shards, labels."""

    root: Path
    n_embed: int
    cond_vocab: int | None  # None: unconditional (or class labels only)
    grid: tuple[int, int] | None  # None when grids vary (--keep-aspect)
    shards: list[dict]
    labels: list[str | None] | None  # class index -> name (None for unused indices)
    flip: bool
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Shared embedding table size: image and conditioning tokens use one table (PAPER.md)."""
        return max(self.n_embed, self.cond_vocab or 0)

    @property
    def num_samples(self) -> int:
        return sum(int(s["count"]) for s in self.shards)

    @property
    def n_classes(self) -> int | None:
        return len(self.labels) if self.labels is not None else None

    def shard_paths(self) -> list[Path]:
        return [self.root / s["name"] for s in self.shards]


def load_manifest(root: str | Path) -> dict:
    """The one reader of ``manifest.json`` (encode's resume, verify and stage two all use it):
    the parsed file, with a ShardError when it is absent, corrupt or of another format/version."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ShardError(f"{root}: no {MANIFEST} (not a token shard folder written by encode-dataset)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from None
    fmt, version = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (None, None)
    if fmt != MANIFEST_FORMAT or version != MANIFEST_VERSION:
        raise ShardError(f"{path}: format {fmt!r} version {version!r}, expected {MANIFEST_FORMAT!r} "
                         f"version {MANIFEST_VERSION} (not an encode-dataset manifest)")
    return raw


def read_manifest(root: str | Path, require_complete: bool = True) -> TokenManifest:
    """A shard folder's manifest as stage two needs it (see :func:`load_manifest`)."""
    root = Path(root)
    raw = load_manifest(root)
    if require_complete and not raw.get("complete"):
        raise ShardError(f"{root}: encoding is unfinished ({len(raw.get('shards', []))} of "
                         f"{raw.get('n_shards')} shards); re-run the encode-dataset command to finish it")
    cond = raw.get("cond") or {}
    grid = raw.get("grid")
    labels = (raw.get("labels") or {}).get("names")
    return TokenManifest(root, int(raw["tokenizer"]["n_embed"]), cond.get("vocab_size"),
                         tuple(grid) if grid else None, list(raw.get("shards", [])), labels,
                         bool(raw.get("identity", {}).get("flip_copies")), raw)



class TokenShardDataset(IterableDataset):
    """Streams token samples for stage two: shard order and a sample buffer shuffled per epoch,
    split across DDP ranks and loader workers, with aligned random crops of image and
    conditioning grids (``crop=(h, w)``, for sliding-window training) or whole grids.

    Splitting is by shard when there are at least as many shards as readers (no shard is read
    twice), else by sample position. Each item is a dict: ``key``, ``tokens`` (int64 (h, w)),
    and where stored ``cond`` (int64, same window) and ``label``. ``variants``: ``all`` yields
    flip copies as extra samples, ``random`` picks one variant per sample and epoch,
    ``original`` ignores flips. ``verify``: each shard is checked against the manifest's
    sha256 the first time this reader opens it (a reader is this object, or a copy in each
    loader worker), and an altered one raises a ShardError before any of its samples is used.
    """

    def __init__(self, root: str | Path, crop: tuple[int, int] | None = None, shuffle: bool = True,
                 seed: int = 0, buffer_size: int = 1024, variants: str = "all",
                 with_cond: bool = True, split: tuple[int, int] | None = None, verify: bool = True):
        super().__init__()
        if variants not in VARIANTS:
            raise ValueError(f"variants must be one of {VARIANTS}, got {variants!r}")
        self.manifest = read_manifest(root)
        self.crop = tuple(crop) if crop is not None else None
        if self.crop is not None and self.manifest.grid is not None:
            gh, gw = self.manifest.grid
            if self.crop[0] > gh or self.crop[1] > gw:
                raise ValueError(f"crop {self.crop} is larger than the token grid {self.manifest.grid} "
                                 f"of {root}")
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, max(1, buffer_size)
        self.variants, self.with_cond = variants, with_cond
        self.fixed_split = split
        self.epoch = 0
        self.digests = {self.manifest.root / e["name"]: e["sha256"] for e in self.manifest.shards
                        if verify and e.get("sha256")}
        self.verified: set[Path] = set()

    def set_epoch(self, epoch: int) -> None:
        """Each epoch reshuffles shards, buffer and crops (deterministically from the seed)."""
        self.epoch = epoch

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def _expand(self, s: TokenSample, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray, Any, Any]]:
        cond = s.cond if self.with_cond else None
        cond_f = s.cond_flip if self.with_cond else None
        pairs = [(s.tokens, cond)]
        if s.tokens_flip is not None and self.variants != "original":
            if self.variants == "all":
                pairs.append((s.tokens_flip, cond_f))
            elif rng.random() < 0.5:
                pairs = [(s.tokens_flip, cond_f)]
        for tokens, c in pairs:
            yield s.key, tokens, c, s.label

    def _finish(self, item: tuple, rng: np.random.Generator) -> dict | None:
        key, tokens, cond, label = item
        if self.crop is not None:
            (h, w), (ch, cw) = tokens.shape, self.crop
            if h < ch or w < cw:
                return None  # only with varying grids; the fixed-grid case is refused up front
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            tokens = tokens[top:top + ch, left:left + cw]
            cond = cond[top:top + ch, left:left + cw] if cond is not None else None
        out: dict[str, Any] = {"key": key, "tokens": torch.from_numpy(tokens.astype(np.int64))}
        if cond is not None:
            out["cond"] = torch.from_numpy(cond.astype(np.int64))
        if label is not None:
            out["label"] = label
        return out

    def __iter__(self) -> Iterator[dict]:
        me, n = self.fixed_split or reader_slot()
        rng = np.random.default_rng([self.seed, self.epoch, me])
        paths = self.manifest.shard_paths()
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(paths))
            paths = [paths[i] for i in order]
        by_shard = len(paths) >= n
        mine = paths[me::n] if by_shard else paths

        def stream() -> Iterator[tuple]:
            position = 0
            command = self.manifest.raw.get("command")
            for p in mine:
                want = None if p in self.verified else self.digests.get(p)
                for s in read_shard(p, want, command):
                    self.verified.add(p)
                    if by_shard or position % n == me:
                        yield from self._expand(s, rng)
                    position += 1

        if not self.shuffle:
            for item in stream():
                if (out := self._finish(item, rng)) is not None:
                    yield out
            return
        buffer: list[tuple] = []
        for item in stream():
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = int(rng.integers(0, len(buffer)))
            buffer[j], item = item, buffer[j]
            if (out := self._finish(item, rng)) is not None:
                yield out
        for j in rng.permutation(len(buffer)):
            if (out := self._finish(buffer[j], rng)) is not None:
                yield out
