"""Datasets that turn a DataConfig into samples: ``{"image", "seg"?, "depth"?, "key"}``.

Map-style for folders, file lists and the built-in landscapes; an IterableDataset over tar
shards. Training randomness (crop, flip) comes from a generator seeded by (seed, epoch, index),
so a resumed run draws exactly what the uninterrupted run would. Call ``set_epoch`` before
creating each epoch's DataLoader iterator (with ``persistent_workers=False`` the dataset is
copied to the workers at that moment). Use :func:`collate` as the DataLoader's ``collate_fn``.
"""

from __future__ import annotations

import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from vqgan_cli.data.config import DataConfig
from vqgan_cli.data.errors import BadFile, DataError, DataWarning
from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, Window, render_landscape
from vqgan_cli.data.maps import MapData, check_labels, one_hot, read_map
from vqgan_cli.data.sampler import reader_slot
from vqgan_cli.data.sources import Item, MapIndex, Source, resolve_source, shard_keys, split_member_name
from vqgan_cli.data.transforms import (
    CropBox,
    Geometry,
    apply_geometry,
    choose_geometry,
    image_to_tensor,
    read_image,
    resize_smaller_side,
)

SPLITS = ("train", "val")
MODALITIES = ("image", "segmentation", "depth")
VAL_SEED_BASE = 1_000_000  # built-in validation scenes; training seeds stay below this
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")


@dataclass
class Prep:
    """What every sample needs to know: crop geometry, label checks and the bad-file policy."""

    size: int
    resize: int
    train: bool
    flip: bool
    label_shift: int
    n_labels: int | None
    bad_files: str
    seed: int
    epoch: int = 0

    def rng(self, *index: int) -> np.random.Generator | None:
        """The sample's generator in training (None in validation: centre crop, no flip)."""
        return np.random.default_rng([self.seed, self.epoch, *index]) if self.train else None

    def fail(self, err: BadFile, key: str) -> dict:
        """Apply ``bad_files``: raise, or warn and return a skipped marker for :func:`collate`."""
        if self.bad_files == "stop":
            raise err
        warnings.warn(f"skipping {err}", DataWarning, stacklevel=3)
        return {"skipped": str(err), "key": key}


def make_sample(rgb: np.ndarray, mapped: MapData | None, key: str, prep: Prep,
                rng: np.random.Generator | None, map_name: str = "") -> dict:
    """Resize the smaller side, then cut the same crop (and flip) from the image and its map."""
    if mapped is not None and mapped.array.shape[:2] != rgb.shape[:2]:
        raise BadFile(map_name, f"map is {mapped.array.shape[1]}x{mapped.array.shape[0]} but its image is "
                                f"{rgb.shape[1]}x{rgb.shape[0]}")
    if mapped is not None and mapped.kind == "seg":
        check_labels(mapped.array, prep.n_labels, map_name)
    image, upscaled = resize_smaller_side(rgb, prep.resize, "image")
    geo = choose_geometry(image.shape[0], image.shape[1], prep.size, rng, prep.flip)
    sample = {"image": image_to_tensor(apply_geometry(image, geo)), "key": key, "upscaled": upscaled}
    if mapped is not None:
        kind = "labels" if mapped.kind == "seg" else "depth"
        arr = apply_geometry(resize_smaller_side(mapped.array, prep.resize, kind).array, geo)
        if mapped.kind == "seg":
            sample["seg"] = torch.from_numpy(arr.astype(np.int64))
        else:
            sample["depth"] = torch.from_numpy(arr.astype(np.float32))[None]
    return sample


def _read_paired_map(source: str | bytes, name: str, modality: str, prep: Prep) -> MapData:
    mapped = read_map(source, name, prep.label_shift)
    wanted = {"segmentation": "seg", "depth": "depth"}.get(modality)
    if wanted is not None and mapped.kind != wanted:
        raise DataError(f"{name}: is a {mapped.kind} map but the modality is {modality}")
    return mapped


class _Epochs:
    """Datasets whose random crops and flips are drawn from (seed, epoch, index): the sampler
    selects the epoch before each pass, so a resumed run draws what the straight run drew."""

    prep: Prep

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops/flips (and, for shards, shard order) the next pass draws."""
        self.prep.epoch = epoch


class FileDataset(_Epochs, Dataset):
    """Image files (from a folder or a file list), each optionally paired with a map by key."""

    def __init__(self, items: list[Item], maps: MapIndex | None, prep: Prep, modality: str):
        self.items, self.maps, self.prep, self.modality = items, maps, prep, modality

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        try:
            mapped, map_name = None, ""
            if self.maps is not None:
                map_name = self.maps.find(item.key) or ""
                if not map_name:
                    raise BadFile(item.path, f"no paired map in {self.maps.folder} (key {item.key!r})")
            rgb = read_image(item.path)
            if map_name:
                mapped = _read_paired_map(map_name, map_name, self.modality, self.prep)
            return make_sample(rgb, mapped, item.key, self.prep, self.prep.rng(index), map_name)
        except BadFile as e:
            return self.prep.fail(e, item.key)


class LandscapeDataset(_Epochs, Dataset):
    """``builtin:landscapes``: scene ``seeds[i]`` rendered at ``resize`` and cropped to ``size``.

    With ``sizes`` (training only), each sample is a random ``size`` crop of the scene rendered with
    a side drawn log-uniform in ``sizes``, the paper's random crops of large images: only the crop
    window is rendered, so a crop of a 512-pixel scene costs what a 64-pixel scene does.
    """

    def __init__(self, seeds: range, prep: Prep, sizes: tuple[int, ...] | None = None):
        self.seeds, self.prep, self.sizes = seeds, prep, sizes

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> dict:
        seed = self.seeds[index]
        rng = self.prep.rng(index)
        if self.sizes is not None and rng is not None:
            return self._crop_of_scaled_scene(seed, rng)
        scene = render_landscape(seed, self.prep.resize, self.prep.resize)
        mapped = MapData("seg", scene.labels.astype(np.int32))
        return make_sample(scene.image, mapped, f"landscape-{seed:07d}", self.prep,
                           rng, f"builtin:landscapes seed {seed}")

    def _crop_of_scaled_scene(self, seed: int, rng: np.random.Generator) -> dict:
        lo, hi = self.sizes  # type: ignore[misc]
        side = max(self.prep.size, int(round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))))
        geo = choose_geometry(side, side, self.prep.size, rng, self.prep.flip)
        box = geo.box
        scene = render_landscape(seed, side, side, Window(box.top, box.left, box.size, box.size))
        whole = Geometry(CropBox(0, 0, box.size), geo.flip)
        return {"image": image_to_tensor(apply_geometry(scene.image, whole)),
                "seg": torch.from_numpy(apply_geometry(scene.labels, whole).astype(np.int64)),
                "key": f"landscape-{seed:07d}", "upscaled": False}


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample of a webdataset tar, in stored order, streaming."""
    with tarfile.open(path, "r|*") as tf:
        key, fields = None, {}
        for member in tf:
            if not member.isfile():
                continue
            k, ext = split_member_name(member.name)
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            fields[ext] = data
        if key is not None:
            yield key, fields



class ShardDataset(_Epochs, IterableDataset):
    """Samples of webdataset tar shards, split across DDP ranks and DataLoader workers.

    With at least as many shards as (ranks x workers) each slot reads whole shards; otherwise every
    slot reads all shards and keeps every n-th sample, so small shard counts still split evenly.
    ``keep`` restricts shards to given keys (the held-out split), ``drop`` removes keys.
    ``tag_positions``: each sample gets ``index`` = (shard number << 32) | position in the shard,
    its place in one process's reading order (an evaluation split over ranks sorts by it).
    """

    tag_positions = False

    def __init__(self, shards: list[str], maps: MapIndex | None, prep: Prep, modality: str,
                 keep: dict[str, set[str]] | None = None, drop: dict[str, set[str]] | None = None):
        self.shards, self.maps, self.prep, self.modality = shards, maps, prep, modality
        self.keep, self.drop = keep, drop or {}

    def _sample(self, shard: str, key: str, fields: dict[str, bytes], rng_index: tuple[int, int]) -> dict:
        name = f"{shard}:{key}"
        try:
            img_field = next((f for f in IMAGE_FIELDS if f in fields), None)
            if img_field is None:
                raise BadFile(name, f"no image field (has {sorted(fields)})")
            rgb = read_image(fields[img_field], f"{name}.{img_field}")
            mapped, map_name = None, ""
            inline = next((f for f in ("seg.png", "depth.png") if f in fields), None)
            if inline is not None:
                map_name = f"{name}.{inline}"
                mapped = _read_paired_map(fields[inline], map_name, self.modality, self.prep)
            elif self.maps is not None:
                map_name = self.maps.find(key) or ""
                if not map_name:
                    raise BadFile(name, f"no paired map in {self.maps.folder} (key {key!r})")
                mapped = _read_paired_map(map_name, map_name, self.modality, self.prep)
            rng = self.prep.rng(*rng_index)
            return make_sample(rgb, mapped, key, self.prep, rng, map_name)
        except BadFile as e:
            return self.prep.fail(e, key)

    def __iter__(self) -> Iterator[dict]:
        order = list(range(len(self.shards)))
        if self.prep.train:
            np.random.default_rng([self.prep.seed, self.prep.epoch]).shuffle(order)
        slot, n_slots = reader_slot()
        by_shard = len(order) >= n_slots
        mine = order[slot::n_slots] if by_shard else order
        count = 0
        for si in mine:
            shard = self.shards[si]
            keep, drop = (self.keep or {}).get(shard), self.drop.get(shard, set())
            if self.keep is not None and keep is None:
                continue
            try:
                for pos, (key, fields) in enumerate(iter_tar(shard)):
                    if key in drop or (keep is not None and key not in keep):
                        continue
                    count += 1
                    if not by_shard and (count - 1) % n_slots != slot:
                        continue
                    sample = self._sample(shard, key, fields, (si, pos))
                    yield {**sample, "index": (si << 32) | pos} if self.tag_positions else sample
            except (tarfile.TarError, OSError) as e:
                yield self.prep.fail(BadFile(shard, f"unreadable tar shard: {e}"), Path(shard).name)


def _holdout_shards(shards: list[str], count: int) -> dict[str, set[str]]:
    """Keys of the last ``count`` samples over the shards (reads tar headers from the end)."""
    out: dict[str, set[str]] = {}
    need = count
    for shard in reversed(shards):
        if need <= 0:
            break
        keys = shard_keys(shard)[-need:]
        out[shard] = set(keys)
        need -= len(keys)
    if need > 0:
        raise DataError(f"{shards[0]}...: only {count - need} samples in all shards, cannot hold out "
                        f"val_count = {count}; lower data.val_count or set data.val")
    return out


def _source_dataset(src: Source, maps_dir: str | None, prep: Prep, modality: str,
                    holdout: int | None, split: str) -> Dataset:
    """A dataset over a file or shard source; ``holdout`` > 0 splits off its last items."""
    maps = MapIndex(maps_dir) if maps_dir else None
    if modality != "image" and maps is None and src.kind == "files":
        raise DataError(f"{src.name}: modality {modality} needs paired maps (set data.maps)")
    if src.kind == "files":
        items = src.items
        if holdout:
            if holdout >= len(items):
                raise DataError(f"{src.name}: only {len(items)} images, cannot hold out val_count = "
                                f"{holdout}; lower data.val_count or set data.val")
            items = items[:-holdout] if split == "train" else items[-holdout:]
        return FileDataset(items, maps, prep, modality)
    shards = [i.path for i in src.items]
    if holdout:
        held = _holdout_shards(shards, holdout)
        if split == "train":
            return ShardDataset(shards, maps, prep, modality, drop=held)
        return ShardDataset(shards, maps, prep, modality, keep=held)
    return ShardDataset(shards, maps, prep, modality)


def build_dataset(cfg: DataConfig, split: str, modality: str, n_labels: int | None,
                  seed: int = 0) -> Dataset:
    """The dataset of ``split`` ("train" random crops/flips, "val" centre crops) for ``modality``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    train = split == "train"
    prep = Prep(cfg.size, cfg.resize_to, train, cfg.flip and train, cfg.label_shift, n_labels,
                cfg.bad_files, seed)
    own = cfg.train if train or cfg.val is None else cfg.val
    src = resolve_source(own, cfg.root)
    if src.kind == "builtin":
        if modality == "depth":
            raise DataError(f"{own}: has no depth maps; use it for image or segmentation")
        if n_labels is not None and n_labels < len(LANDSCAPE_CLASSES):
            raise DataError(f"{own}: has {len(LANDSCAPE_CLASSES)} classes but n_labels = {n_labels}")
        if train:
            sizes = tuple(cfg.builtin_sizes) if cfg.builtin_sizes is not None else None
            return LandscapeDataset(range(cfg.builtin_train), prep, sizes)
        return LandscapeDataset(range(VAL_SEED_BASE, VAL_SEED_BASE + cfg.val_count), prep)
    if train or cfg.val is not None:
        maps_dir = cfg.maps if train else (cfg.val_maps or cfg.maps)
        holdout = cfg.val_count if cfg.val is None else 0
        return _source_dataset(src, maps_dir, prep, modality, holdout, "train" if train else "val")
    return _source_dataset(src, cfg.maps, prep, modality, cfg.val_count, "val")


def collate(samples: list[dict]) -> dict:
    """Stack tensors, drop skipped samples and report them in ``"skipped"`` (a list of messages).

    ``"upscaled"`` counts images that were smaller than ``resize``. A batch whose samples were all
    skipped has no ``"image"``: check for it before the forward pass.
    """
    good = [s for s in samples if "skipped" not in s]
    out: dict = {"key": [s["key"] for s in good],
                 "skipped": [s["skipped"] for s in samples if "skipped" in s],
                 "upscaled": sum(bool(s.get("upscaled", False)) for s in good)}
    for name in ("image", "seg", "depth"):
        have = [name in s for s in good]
        if good and all(have):
            out[name] = torch.stack([s[name] for s in good])
        elif any(have):
            raise DataError(f"batch mixes samples with and without {name!r}: {out['key']}")
    return out


def model_input(batch: dict, modality: str, n_labels: int | None) -> torch.Tensor:
    """The tensor a tokenizer of ``modality`` encodes: RGB, one-hot labels, or depth."""
    if modality == "image":
        need = "image"
    elif modality == "segmentation":
        need = "seg"
        if n_labels is None:
            raise DataError("modality segmentation needs n_labels for the one-hot input")
    elif modality == "depth":
        need = "depth"
    else:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if need not in batch:
        raise DataError(f"modality {modality} needs {need!r} in the batch, which has "
                        f"{sorted(k for k in batch if isinstance(batch[k], torch.Tensor))}; "
                        "set data.maps to a folder of paired maps")
    if need == "seg":
        return one_hot(batch["seg"], n_labels)  # type: ignore[arg-type]
    return batch[need]
