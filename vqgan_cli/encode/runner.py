"""encode-dataset: images (and conditioning) -> token shards, resumable and exact.

Shard ``s`` covers input items ``[s * shard_size, (s + 1) * shard_size)`` and is batched from its
own first item, so its bytes depend on nothing but those items: a resumed run (which restarts at
the first unrecorded shard) writes what an uninterrupted run writes. A shard holds fewer samples
than ``shard_size`` when inputs were skipped; the manifest lists each skipped input with why.
For the same reason torchrun ranks can share the shards and write what one process writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.markup import escape
from torch.utils.data import DataLoader

from vqgan_cli.checkpoints.format import file_sha256
from vqgan_cli.console import TrainProgress, console
from vqgan_cli.data import DataError
from vqgan_cli.encode.inputs import (
    EncodeUsageError,
    InputItem,
    Prepare,
    assign_labels,
    list_items,
    pair_maps,
    to_model_range,
)
from vqgan_cli.encode.loader import EncodeItems, collate_groups, shard_batches
from vqgan_cli.encode.models import Cond, cond_tokens_of, load_for_encoding, setup_cond, tokens_of
from vqgan_cli.encode.ranks import OtherRanks, finish_shared, idle_note, my_shards, open_shared
from vqgan_cli.encode.store import OutputFolder
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.runtime import (
    Runtime,
    announce_precision,
    autocast,
    check_same_arguments,
    resolve_workers,
    setup_runtime,
    shutdown,
)
from vqgan_cli.shards.format import MANIFEST_FORMAT, MANIFEST_VERSION, TokenSample, token_dtype


@dataclass
class EncodeOptions:
    """Everything encode-dataset needs; ``vqgan encode-dataset --help`` explains each option."""

    tokenizer: str
    data: str
    out: str
    config: str | None = None  # the official tokenizer's YAML (default: found in its run folder)
    size: int | None = None  # smaller side; default: the tokenizer's training resolution
    keep_aspect: bool = False
    batch_size: int = 32
    workers: int | str = "auto"  # loader processes; auto: runtime.resolve_workers (fits the cores)
    shard_size: int = 1000  # input items per shard
    flip_copies: bool = False
    limit: int | None = None
    root: str | None = None
    cond: str | None = None  # seg | depth | labels | lowres:S
    cond_tokenizer: str | None = None
    cond_data: str | None = None
    n_labels: int | None = None
    label_shift: int = 0
    labels: str | None = None  # folders | path to a CSV
    missing: str = "stop"  # an image without cond map / class label: stop, or skip the image
    device: str = "auto"
    precision: str = "auto"  # of the encoder: auto | fp32 | bf16 (see vqgan_cli.runtime)
    threads: int | None = None  # torch intra-op threads of the encoder (CPU)
    overwrite: bool = False
    command: str | None = None  # recorded in the manifest; default: the equivalent CLI command


class EncodeResult(NamedTuple):
    out: Path
    shards: int
    samples: int
    skipped: int
    encoded_now: int  # inputs processed by this invocation (0 when everything was already done)
    seconds: float
    images_per_s: float  # inputs per second of the encode loop (worker start-up included)
    grid: tuple[int, int] | None  # None with --keep-aspect (grids vary)
    vocab_size: int
    main: bool = True  # False on torchrun ranks other than 0, which print nothing

    def summary(self) -> dict[str, object]:
        """What the command prints at the end, in reading order."""
        return {"folder": str(self.out), "shards": self.shards, "samples": self.samples,
                "skipped inputs": self.skipped, "grid": "x".join(map(str, self.grid)) if self.grid else "varies",
                "vocab size": self.vocab_size, "encoded now": self.encoded_now,
                "images/s": self.images_per_s, "time": f"{self.seconds:.1f} s"}


def command_line(opts: EncodeOptions) -> str:
    """The CLI command equivalent to ``opts`` (non-default options only)."""
    args = ["vqgan", "encode-dataset"]
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if f.name == "command" or v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return shlex.join(args)


def _workers(opts: EncodeOptions) -> int:
    """``workers`` as a number (``auto`` fits this machine's cores); a usage error when it is neither."""
    try:
        return resolve_workers(opts.workers)
    except ValueError:
        raise EncodeUsageError(f"`workers` must be a number or auto, got {opts.workers!r}") from None


def _check_options(opts: EncodeOptions) -> None:
    for name, v, lo in (("`batch_size`", opts.batch_size, 1), ("`shard_size`", opts.shard_size, 1),
                        ("`workers`", _workers(opts), 0),
                        ("`limit`", 1 if opts.limit is None else opts.limit, 1),
                        ("`size`", opts.size or 8, 8)):
        if v < lo:
            raise EncodeUsageError(f"{name} must be >= {lo}, got {v}")
    if opts.missing not in ("stop", "skip"):
        raise EncodeUsageError(f"`missing` must be stop or skip, got {opts.missing!r}")


def _label_table(items: list[InputItem], opts: EncodeOptions) -> dict | None:
    if not opts.labels:
        return None
    table = assign_labels(items, opts.labels, opts.missing)
    n_cls = max(table.values()) + 1
    names: list[str | None] = [None] * n_cls
    for k, v in table.items():
        names[v] = k
    return {"source": opts.labels, "table": table, "names": names, "n_classes": n_cls}


def _manifest(opts: EncodeOptions, items: list[InputItem], tok_info: dict, cond: Cond | None,
              cond_desc: dict | None, labels: dict | None, size: int, device: torch.device) -> dict:
    """The new manifest; ``identity`` holds what must match for a resume to be exact."""
    builtin = opts.data.startswith("builtin:")
    identity = {
        "tokenizer_sha256": tok_info["weights_sha256"],
        "cond_tokenizer_sha256": ((cond_desc or {}).get("tokenizer") or {}).get("weights_sha256"),
        "data": opts.data if builtin else str(Path(opts.data).resolve()), "n_items": len(items),
        "items_sha256": hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest(),
        "size": size, "keep_aspect": opts.keep_aspect, "flip_copies": opts.flip_copies,
        "shard_size": opts.shard_size, "cond": opts.cond,
        "cond_data": str(Path(opts.cond_data).resolve()) if opts.cond_data else None,
        "n_labels": cond.n_labels if cond else None, "label_shift": opts.label_shift,
        "labels": opts.labels, "missing": opts.missing,
        "labels_csv_sha256": file_sha256(opts.labels) if opts.labels not in (None, "folders") else None,
    }
    grid = None if opts.keep_aspect else [size // tok_info["factor"]] * 2
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "command": opts.command or command_line(opts),
        "identity": identity, "tokenizer": tok_info, "cond": cond_desc,
        "vocab_size": max(tok_info["n_embed"], cond.vocab if cond else 0),
        "dtype": token_dtype(tok_info["n_embed"]).name, "grid": grid,
        "image_size": [size, size] if grid else None, "labels": labels,
        "n_items": len(items), "n_shards": -(-len(items) // opts.shard_size), "shard_size": opts.shard_size,
        "shards": [], "skipped": [], "counts": {}, "complete": False,
        "run": {"batch_size": opts.batch_size, "workers": _workers(opts), "device": str(device)},
    }


def encode_dataset(opts: EncodeOptions, progress: bool = True) -> EncodeResult:
    """Encode ``opts.data`` into token shards under ``opts.out``, resuming what is already there.

    Every check (tokenizers, channels, source, maps, labels, output folder, a manifest of other
    settings) runs before the first image is decoded; they raise EncodeUsageError. Under torchrun
    the ranks share the shards (:mod:`vqgan_cli.encode.ranks`); the folder ends the same.
    """
    started = time.perf_counter()
    _check_options(opts)
    try:
        rt = setup_runtime(opts.device, opts.threads)
    except RuntimeError as e:
        raise EncodeUsageError(str(e)) from None
    try:
        return _run(opts, rt, progress and rt.is_main, started)
    finally:
        shutdown(rt)  # on every path: a process group left open aborts the process at exit


def _run(opts: EncodeOptions, rt: Runtime, progress: bool, started: float) -> EncodeResult:
    """encode_dataset in one process or one torchrun rank (``progress``: this one shows it)."""
    check_same_arguments(rt, {k: v for k, v in dataclasses.asdict(opts).items() if k != "command"},
                         "encode-dataset")
    device = rt.device
    precision = announce_precision(opts.precision, device, key="--precision", show=rt.is_main)
    tok, tok_info = load_for_encoding(opts.tokenizer, opts.config)
    ae = tok.config.autoencoder
    if tok.config.modality != "image" or ae.in_channels != 3:
        raise EncodeUsageError(f"`tokenizer` {opts.tokenizer} takes {ae.in_channels}-channel "
                               f"{tok.config.modality} input, but `data` gives RGB images (3 channels); "
                               "pass the image tokenizer (a map tokenizer goes to `cond_tokenizer`)")
    size = opts.size or ae.resolution
    if size % tok.factor:
        raise EncodeUsageError(f"`size` {size} is not a multiple of the tokenizer's factor {tok.factor}")
    builtin = opts.data.startswith("builtin:")
    cond, cond_desc = setup_cond(opts.cond, opts.cond_tokenizer, opts.n_labels, tok, builtin)
    items = list_items(opts.data, opts.root, opts.limit)
    if cond is not None and cond.kind != "lowres":
        pair_maps(items, opts.cond_data, opts.missing)
    labels = _label_table(items, opts)
    manifest = _manifest(opts, items, tok_info, cond, cond_desc, labels, size, device)
    manifest["run"].update(precision.record(), world_size=rt.world_size)
    check_same_arguments(rt, manifest["identity"], "encode-dataset (the inputs, tokenizers and settings "
                         "each rank found)")
    folder, notes = open_shared(Path(opts.out), manifest, opts.overwrite, rt)
    for n in [*notes, idle_note(folder, rt) if rt.is_main else None]:
        if n:
            console.print(f"[yellow]{escape(n)}[/]")
    todo = my_shards(folder, rt)
    map_kind = {"seg": "seg", "labels": "seg", "depth": "depth"}.get(cond.kind) if cond else None
    prep = Prepare(size, opts.keep_aspect, tok.factor, map_kind, cond.lowres if cond else None,
                   cond.n_labels if cond else None, opts.label_shift)
    tok.to(device).eval()
    if cond is not None and cond.model is not None:
        cond.model.to(device).eval()
    done_items = sum(e["items"][1] - e["items"][0] for e in folder.manifest["shards"])
    if todo and rt.is_main and (warning := folder.space_warning(len(items) - done_items)):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    encoded, rate, others, t_loop = 0, 0.0, OtherRanks(folder, rt), time.perf_counter()
    if todo:
        encoded, rate = _encode_shards(folder, items, todo, prep, tok, cond, opts, device, progress,
                                       done_items, precision.name, others)
    encoded = finish_shared(folder, encoded, rt, others)
    m = folder.manifest
    grid = tuple(m["grid"]) if m["grid"] else None
    if rt.distributed:  # all ranks' inputs over rank 0's loop and wait, as one process counts its loop
        rate = encoded / max(time.perf_counter() - t_loop, 1e-9)
    seconds = time.perf_counter() - started
    return EncodeResult(folder.out, len(m["shards"]), m["counts"]["samples"], m["counts"]["skipped"],
                        encoded, seconds, rate, grid, m["vocab_size"], rt.is_main)  # type: ignore[arg-type]


def _encode_shards(folder: OutputFolder, items: list[InputItem], todo: list[int], prep: Prepare,
                   tok: VQGAN, cond: Cond | None, opts: EncodeOptions, device: torch.device,
                   progress: bool, done_items: int, precision: str,
                   others: OtherRanks) -> tuple[int, float]:
    """The encode loop over this process's shards still to do; returns (inputs processed,
    inputs/s). The encoders run under ``precision``'s autocast; the quantizer's distances stay in
    float32. ``others``: the other torchrun ranks (rank 0's bar shows their progress too)."""
    batches = shard_batches(todo, len(items), opts.shard_size, opts.batch_size)
    loader = DataLoader(EncodeItems(items, prep), batch_sampler=batches, num_workers=_workers(opts),
                        collate_fn=collate_groups, pin_memory=device.type == "cuda")
    dt_img = np.dtype(folder.manifest["dtype"])
    dt_cond = np.dtype(folder.manifest["cond"]["dtype"]) if cond else None
    flip, n_shards = opts.flip_copies, folder.manifest["n_shards"]
    writer, shard, skipped, encoded = None, -1, [], 0
    t0 = time.perf_counter()
    with TrainProgress(len(items), done_items, f"encode {folder.out.name}", progress) as bar:
        try:
            for batch in loader:
                meta = batch["meta"]
                first = meta[0]["index"]
                if first // opts.shard_size != shard:
                    shard, skipped = first // opts.shard_size, []
                    writer = folder.writer(shard)
                results: dict[int, TokenSample] = {}
                for g in batch["groups"]:
                    n = len(g["pos"])
                    x = to_model_range(g["image"].to(device, non_blocking=True))
                    with autocast(device, precision):
                        idx = tokens_of(tok, x, flip, first).numpy()
                        cidx = None
                        if cond is not None:
                            cidx = cond_tokens_of(cond, g["map"], device, flip, tok.factor, first).numpy()
                    for j, p in enumerate(g["pos"]):
                        results[p] = TokenSample(
                            meta[p]["key"], idx[j].astype(dt_img),
                            cidx[j].astype(dt_cond) if cidx is not None else None, meta[p]["label"],
                            idx[n + j].astype(dt_img) if flip else None,
                            cidx[n + j].astype(dt_cond) if flip and cidx is not None else None)
                for p, s in enumerate(meta):
                    if "fatal" in s:
                        raise DataError(s["fatal"])
                    if "skip" in s:
                        skipped.append({"id": s["key"], "path": s["path"], "reason": s["skip"]})
                        bar.log(f"[yellow]skipped[/] {s['key']}: {s['skip']}")
                    else:
                        writer.write(results[p])  # type: ignore[union-attr]
                encoded += len(meta)
                end = min((shard + 1) * opts.shard_size, len(items))
                if meta[-1]["index"] + 1 == end:
                    folder.commit(shard, writer, (shard * opts.shard_size, end), skipped)  # type: ignore[arg-type]
                    writer = None
                    left = len(items) - done_items - encoded
                    if progress and not folder.space_checked and (warning := folder.space_warning(left)):
                        console.print(f"[yellow]warning:[/] {escape(warning)}")
                rate = encoded / max(time.perf_counter() - t0, 1e-9)
                bar.update(done_items + encoded + others.items(), rate, "img", f"shard {shard + 1}/{n_shards}")
        finally:
            if writer is not None:
                writer.abort()
        rate = encoded / max(time.perf_counter() - t0, 1e-9)
        others.wait(lambda n: bar.update(done_items + encoded + n, rate, "img",
                                         f"waiting for the other ranks ({n} of their inputs done)"))
    return encoded, rate
