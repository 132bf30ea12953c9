"""What encode-dataset reads: the ordered input items, their paired maps and class labels, and
the per-item preparation that runs in DataLoader workers (decode, resize, crop, degrade).

Item order is the source order (sorted folders, file lists as listed, tar shards in stored
order, built-in seeds ascending), so shard ``s`` always covers the same items and a resumed
run re-creates exactly the shards an uninterrupted one writes.
"""

from __future__ import annotations

import csv
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from vqgan_cli.data import BadFile, DataError
from vqgan_cli.data.config import DataConfig
from vqgan_cli.data.dataset import IMAGE_FIELDS
from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, render_landscape
from vqgan_cli.data.maps import check_labels, read_map
from vqgan_cli.data.sources import MapIndex, resolve_source, split_member_name
from vqgan_cli.data.transforms import degrade, read_image, resize_smaller_side

MAP_FIELDS = ("seg.png", "depth.png")
CSV_ID_COLUMNS = ("key", "id", "path", "file", "filename", "image")
CSV_LABEL_COLUMNS = ("label", "class", "cls", "category")


class EncodeUsageError(Exception):
    """A problem with the command's inputs found before any work starts (exit code 2)."""


@dataclass
class InputItem:
    """One input image: where its pixels (and paired map) come from and its class label."""

    key: str
    kind: str  # file | tar | builtin
    path: str = ""  # image file, or the tar shard
    seed: int = 0  # builtin only
    fields: dict[str, tuple[int, int]] | None = None  # tar: field -> (offset, size)
    map_path: str | None = None  # paired map file (files/tar sources with --cond-data)
    label: int | None = None
    problem: str | None = None  # known before reading (missing map or label, policy skip)


def _tar_index(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {field: (data offset, size)}) per sample, from headers only, so workers can seek."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, fld = split_member_name(m.name)
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][fld] = (m.offset_data, m.size)
    except tarfile.ReadError as e:
        raise EncodeUsageError(f"{path}: not an uncompressed tar ({e}); encode-dataset reads plain "
                               ".tar shards (decompress .tar.gz first)") from None
    return out


def list_items(source: str, root: str | None, limit: int | None) -> list[InputItem]:
    """Items of ``source`` in source order (first ``limit``); usage errors for missing/empty sources."""
    try:
        src = resolve_source(source, root)
    except DataError as e:
        raise EncodeUsageError(str(e)) from None
    if src.kind == "builtin":
        n = limit if limit is not None else DataConfig().builtin_train
        return [InputItem(f"landscape-{s:07d}", "builtin", source, seed=s) for s in range(n)]
    items: list[InputItem] = []
    if src.kind == "files":
        items = [InputItem(i.key, "file", i.path) for i in src.items[:limit]]
    else:
        for shard in src.items:
            for key, fields in _tar_index(shard.path):
                items.append(InputItem(key, "tar", shard.path, fields=fields))
                if limit is not None and len(items) >= limit:
                    break
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise EncodeUsageError(f"{source}: the source holds no images")
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise EncodeUsageError(f"{source}: two inputs share the id {it.key!r}; samples are keyed by "
                                   "source id, so ids must be unique (tar shards: keys across shards)")
        seen.add(it.key)
    return items


def pair_maps(items: list[InputItem], cond_data: str | None, missing: str) -> int:
    """Attach paired maps (inline tar fields or a folder matched by key/stem); returns how many
    are missing. ``missing=stop`` raises naming the first ones; ``skip`` marks the items."""
    index = None
    if cond_data is not None:
        try:
            index = MapIndex(cond_data)
        except DataError as e:
            raise EncodeUsageError(str(e)) from None
    lacking = []
    for it in items:
        if it.kind == "builtin":
            continue
        if it.kind == "tar" and any(f in (it.fields or {}) for f in MAP_FIELDS):
            continue
        found = index.find(it.key) if index is not None else None
        if found is None:
            lacking.append(it)
        it.map_path = found
    if lacking and index is None and all(it.kind == "file" for it in lacking):
        raise EncodeUsageError("conditioning on maps needs `cond_data` FOLDER (maps paired by file stem)")
    if lacking and missing == "stop":
        names = ", ".join(it.key for it in lacking[:3])
        raise EncodeUsageError(f"{len(lacking)} of {len(items)} images have no paired map (e.g. {names}); "
                               "add the maps, or pass `missing` skip to leave those images out")
    for it in lacking:
        it.problem = "no paired conditioning map"
    return len(lacking)


def _csv_labels(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise EncodeUsageError(f"{path}: cannot read labels CSV ({e})") from None
    if not rows:
        raise EncodeUsageError(f"{path}: empty labels CSV")
    head = [h.strip().lower() for h in rows[0]]
    id_col = next((head.index(c) for c in CSV_ID_COLUMNS if c in head), None)
    lab_col = next((head.index(c) for c in CSV_LABEL_COLUMNS if c in head), None)
    if id_col is None or lab_col is None:
        raise EncodeUsageError(f"{path}: the header must name an id column ({'/'.join(CSV_ID_COLUMNS)}) "
                               f"and a label column ({'/'.join(CSV_LABEL_COLUMNS)}), got {rows[0]}")
    out = {}
    for row in rows[1:]:
        if len(row) > max(id_col, lab_col) and row[id_col].strip():
            ident = PurePosixPath(row[id_col].strip().replace("\\", "/"))
            out[str(ident.with_suffix("")) if ident.suffix else str(ident)] = row[lab_col].strip()
    return out


def label_table(names: set[str]) -> dict[str, int]:
    """Class name -> index: integer names keep their value (ImageNet-style ids), other names
    are numbered in sorted order, so the table does not depend on the item order."""
    if names and all(n.isdigit() for n in names):
        return {n: int(n) for n in sorted(names, key=int)}
    return {n: i for i, n in enumerate(sorted(names))}


def assign_labels(items: list[InputItem], spec: str, missing: str) -> dict[str, int]:
    """Class labels from parent folder names (``folders``) or a CSV (id,label); returns the table."""
    if spec == "folders":
        found = {it.key: str(PurePosixPath(it.key).parent) for it in items}
        found = {k: v for k, v in found.items() if v not in ("", ".")}
    else:
        by_id = _csv_labels(Path(spec))
        found = {}
        for it in items:
            hit = by_id.get(it.key, by_id.get(PurePosixPath(it.key).name))
            if hit is not None:
                found[it.key] = hit
    lacking = [it for it in items if it.key not in found and it.problem is None]
    if lacking and missing == "stop":
        names = ", ".join(it.key for it in lacking[:3])
        how = "has no parent folder" if spec == "folders" else f"is not in {spec}"
        raise EncodeUsageError(f"{len(lacking)} of {len(items)} images have no class label (e.g. {names} "
                               f"{how}); pass `missing` skip to leave them out")
    table = label_table(set(found.values()))
    if not table:
        raise EncodeUsageError(f"`labels` {spec}: no image got a class label")
    for it in items:
        if it.key in found:
            it.label = table[found[it.key]]
        elif it.problem is None:
            it.problem = "no class label"
    return table


@dataclass
class Prepare:
    """Per-item geometry and conditioning settings, sent to every loader worker."""

    size: int
    keep_aspect: bool
    factor: int
    map_kind: str | None  # seg | depth | None
    lowres: int | None
    n_labels: int | None
    label_shift: int = 0

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Centre (top, left, height, width): a size x size square, or with --keep-aspect both
        sides cut down to a multiple of f (< f pixels lost, no distortion)."""
        ch, cw = (h - h % self.factor, w - w % self.factor) if self.keep_aspect else (self.size, self.size)
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def load(self, it: InputItem) -> tuple[np.ndarray, Any, str]:
        """(RGB uint8, map array or None, map name)."""
        if it.kind == "builtin":
            scene = render_landscape(it.seed, self.size, self.size)
            labels = scene.labels.astype(np.int32) if self.map_kind == "seg" else None
            return scene.image, labels, f"builtin:landscapes seed {it.seed}"
        if it.kind == "file":
            rgb = read_image(it.path)
        else:
            fields = it.fields or {}
            img = next((f for f in IMAGE_FIELDS if f in fields), None)
            if img is None:
                raise BadFile(f"{it.path}:{it.key}", f"no image field (has {sorted(fields)})")
            rgb = read_image(_read_at(it.path, *fields[img]), f"{it.path}:{it.key}.{img}")
        if self.map_kind is None:
            return rgb, None, ""
        inline = next((f for f in MAP_FIELDS if f in (it.fields or {})), None)
        if inline is not None:
            name = f"{it.path}:{it.key}.{inline}"
            mapped = read_map(_read_at(it.path, *(it.fields or {})[inline]), name, self.label_shift)
        else:
            name = it.map_path or ""
            mapped = read_map(name, name, self.label_shift)
        if mapped.kind != self.map_kind:
            raise DataError(f"{name}: is a {mapped.kind} map but `cond` needs {self.map_kind} maps")
        if mapped.array.shape[:2] != rgb.shape[:2]:
            raise BadFile(name, f"map is {mapped.array.shape[1]}x{mapped.array.shape[0]} but its image is "
                                f"{rgb.shape[1]}x{rgb.shape[0]}")
        return rgb, mapped.array, name

    def __call__(self, it: InputItem) -> dict:
        """Everything the encoder needs for one item, or ``skip`` with the reason."""
        rgb, mapped, map_name = self.load(it)
        if mapped is not None and self.map_kind == "seg":
            check_labels(mapped, self.n_labels, map_name)  # LabelError: never skipped
        image = resize_smaller_side(rgb, self.size, "image").array
        top, left, ch, cw = self.crop_box(*image.shape[:2])
        crop = np.array(image[top:top + ch, left:left + cw])  # a writable copy for torch
        out: dict = {"image": rgb_bytes(crop)}
        if mapped is not None:
            kind = "labels" if self.map_kind == "seg" else "depth"
            m = resize_smaller_side(mapped, self.size, kind).array[top:top + ch, left:left + cw]
            # np.array copies: m may view a read-only buffer, which torch.from_numpy warns about
            out["map"] = (torch.from_numpy(m.astype(np.int16)) if kind == "labels"
                          else torch.from_numpy(np.array(m, dtype=np.float32))[None])
        if self.lowres:
            out["map"] = rgb_bytes(degrade(crop, self.lowres))
        return out


def rgb_bytes(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, H, W): workers hand over bytes, a quarter of the float32
    traffic; :func:`to_model_range` makes the model input on the device."""
    return torch.from_numpy(rgb).permute(2, 0, 1)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] with exactly the operations of
    ``data.transforms.image_to_tensor`` (so tokens equal those of a float pipeline, bit for bit)."""
    return x.float().div_(127.5).sub_(1.0)



def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def builtin_classes() -> list[str]:
    return list(LANDSCAPE_CLASSES)
