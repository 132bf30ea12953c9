"""Turn a source string into an ordered list of items, so every run sees the same order.

Kinds: a folder (recursive), a ``.txt`` file list, webdataset tar shards (brace patterns),
or ``builtin:<name>``. Order is deterministic (sorted for folders, as listed otherwise) because
the held-out validation split and exact resume both index into it.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import NamedTuple

from braceexpand import braceexpand

from vqgan_cli.data.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".jfif"})
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("landscapes",)


class Item(NamedTuple):
    """One image file (or one tar shard): its path and a stable id used to pair maps and name samples."""

    path: str
    key: str


class Source(NamedTuple):
    """A resolved source: ``kind`` is ``files``, ``shards`` or ``builtin``; ``name`` is what was asked."""

    kind: str
    items: list[Item]
    name: str


def _key_of(path: Path, base: Path | None) -> str:
    """Relative path without suffix (posix), so equal stems in different folders stay distinct."""
    if base is not None:
        try:
            return path.relative_to(base).with_suffix("").as_posix()
        except ValueError:
            pass
    return path.stem


def is_shard_source(source: str) -> bool:
    """Tar shards are recognised by name: ``x.tar`` or a brace pattern expanding to tars."""
    first = next(iter(braceexpand(source)), "")
    return first.endswith(".tar") or first.endswith(".tar.gz") or first.endswith(".tgz")


def list_folder(folder: str | Path) -> list[Item]:
    """Every image file below ``folder`` (recursively, following the sorted relative path)."""
    base = Path(folder)
    paths = sorted(p for p in base.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{base}: no image files found (looked recursively for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [Item(str(p), _key_of(p, base)) for p in paths]


def read_file_list(list_path: str | Path, root: str | Path | None = None) -> list[Item]:
    """Paths listed one per line (blank lines and ``#`` comments ignored), relative to ``root``.

    Only the first entry is checked for existence here, to catch a wrong ``root`` early without
    touching every file of a large list; later missing files are bad files at load time.
    """
    lp = Path(list_path)
    base = Path(root) if root is not None else lp.parent
    items = []
    for line in lp.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        full = p if p.is_absolute() else base / p
        items.append(Item(str(full), _key_of(full, base)))
    if not items:
        raise DataError(f"{lp}: the file list names no images")
    if not Path(items[0].path).exists():
        raise DataError(f"{lp}: first listed image {items[0].path} does not exist "
                        f"(paths are relative to {base}; set data.root if they live elsewhere)")
    return items


def expand_shards(pattern: str) -> list[Item]:
    """Brace-expand a shard pattern; every shard must exist (a missing one is a typo, not noise)."""
    paths = list(braceexpand(pattern))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{pattern}: shard {missing[0]} does not exist{more}")
    return [Item(p, Path(p).name) for p in paths]


def resolve_source(source: str, root: str | Path | None = None) -> Source:
    """Classify ``source`` and list its items; a DataError names the path when it is missing or empty."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise DataError(f"{source}: unknown built-in data set (known: "
                            f"{', '.join(BUILTIN_PREFIX + b for b in BUILTINS)})")
        return Source("builtin", [], source)
    if is_shard_source(source):
        return Source("shards", expand_shards(source), source)
    p = Path(source)
    if not p.exists():
        raise DataError(f"{source}: data source does not exist")
    if p.is_dir():
        return Source("files", list_folder(p), source)
    if p.suffix.lower() == ".txt":
        return Source("files", read_file_list(p, root), source)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return Source("files", [Item(str(p), p.stem)], source)
    raise DataError(f"{source}: not a folder, .txt file list, .tar shard or image")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/abc.seg.png`` -> key ``dir/abc``, field ``seg.png``."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def shard_keys(path: str | Path) -> list[str]:
    """Sample keys of a shard in stored order, reading only tar headers."""
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                key, _ = split_member_name(m.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


class MapIndex:
    """Map files below a folder, found by the image's relative key first, then by bare stem.

    Stems alone can collide across subfolders (``a/001.png``, ``b/001.png``); the relative key
    disambiguates and a bare stem is used only when unique.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: maps folder does not exist")
        self._by_key: dict[str, str] = {}
        self._by_stem: dict[str, list[str]] = {}
        for p in sorted(self.folder.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                self._by_key[_key_of(p, self.folder)] = str(p)
                self._by_stem.setdefault(p.stem, []).append(str(p))
        if not self._by_key:
            raise DataError(f"{self.folder}: no map files found")

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, key: str) -> str | None:
        """Path of the map paired with image ``key``, or None (ambiguous stems count as missing)."""
        if key in self._by_key:
            return self._by_key[key]
        hits = self._by_stem.get(Path(key).name, [])
        return hits[0] if len(hits) == 1 else None
