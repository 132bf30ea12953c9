"""Typed settings of the data layer: where images (and paired maps) come from and how they are cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vqgan_cli.config import spec


@dataclass
class DataConfig:
    """Image source, paired maps and crop settings (PAPER.md, stage one: random crops in [-1, 1]).

    A source is a folder (searched recursively), a ``.txt`` file list (one path per line, relative
    to ``root`` or the list's folder), webdataset tar shard(s) with brace patterns such as
    ``data/shard-{000..009}.tar``, or ``builtin:landscapes`` (procedural scenes with labels).
    """

    train: str = spec("builtin:landscapes", existing_path=True,
                      help="folder | file list .txt | tar shard(s) | builtin:landscapes")
    val: str | None = spec(None, existing_path=True,
                           help="same kinds; None: builtin uses held-out seeds, other sources hold "
                                "out the last val_count items of train")
    root: str | None = spec(None, existing_path=True,
                            help="base folder for relative paths in file lists (default: the list's folder)")
    maps: str | None = spec(None, existing_path=True,
                            help="folder of paired maps found by file stem (segmentation or depth PNGs)")
    val_maps: str | None = spec(None, existing_path=True, help="maps of val (default: maps)")
    size: int = spec(256, ge=8, help="square crop size")
    resize: int | None = spec(None, ge=8, help="smaller side resized to this before cropping (default: size)")
    flip: bool = spec(False, help="random horizontal flip in training (same for the map)")
    workers: int | Literal["auto"] = spec("auto", ge=0, help="DataLoader worker processes; auto: the usable "
                                          "cores less one, at most 8 (runtime.resolve_workers)")
    label_shift: int = spec(0, ge=0, le=255, help="added to label values mod 256 (COCO: 1, so 255 -> 0)")
    val_count: int = spec(64, ge=0, help="held-out items when val is None")
    builtin_train: int = spec(100_000, ge=1, help="distinct built-in training scenes (seeds 0..n-1)")
    builtin_sizes: tuple[int, ...] | None = spec(
        None, help="[lo, hi]: built-in training scenes are rendered with a side drawn log-uniform in "
                   "[lo, hi] and a size-pixel crop is cut from them (only the crop is rendered); "
                   "None: whole scenes at resize")
    val_scene: tuple[int, ...] | None = spec(
        None, help="[width, height]: built-in held-out scenes of this size are also encoded and decoded "
                   "whole at validation (metrics prefixed large_)")
    val_scene_count: int = spec(8, ge=1, help="how many val_scene scenes")
    bad_files: str = spec("skip", choices=("skip", "stop"),
                          help="skip: warn and drop unreadable files; stop: raise naming the file")

    @property
    def resize_to(self) -> int:
        """The smaller side before cropping; never below the crop."""
        return self.resize if self.resize is not None else self.size

    def check(self) -> list[str]:
        problems = []
        if self.resize is not None and self.resize < self.size:
            problems.append(f"resize: {self.resize} is smaller than the crop size {self.size}")
        if self.builtin_sizes is not None:
            lo_hi = list(self.builtin_sizes)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or lo_hi[0] < self.size:
                problems.append(f"builtin_sizes: expected [lo, hi] with size ({self.size}) <= lo <= hi, "
                                f"got {lo_hi}")
        if self.val_scene is not None and (len(self.val_scene) != 2 or min(self.val_scene) < 8):
            problems.append(f"val_scene: expected [width, height], each >= 8, got {list(self.val_scene)}")
        return problems
