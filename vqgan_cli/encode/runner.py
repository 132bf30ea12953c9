"""encode-dataset: images (and conditioning) -> token shards, resumable and exact.

Shard ``s`` covers input items ``[s * shard_size, (s + 1) * shard_size)`` and is batched from its
own first item, so its bytes depend on nothing but those items: a resumed run (which restarts at
the first unrecorded shard) writes what an uninterrupted run writes. Loader workers decode,
resize and crop while the main process runs the encoder.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqgan_cli.checkpoints import file_sha256, weights_sha256
from vqgan_cli.config import to_dict
from vqgan_cli.data import BadFile, DataError
from vqgan_cli.data.maps import one_hot
from vqgan_cli.data.shards import MANIFEST_FORMAT, MANIFEST_VERSION, TokenSample, token_dtype
from vqgan_cli.encode.inputs import (EncodeUsageError, InputItem, Prepare, assign_labels,
                                     builtin_classes, list_items, pair_maps)
from vqgan_cli.encode.store import OutputFolder, open_output
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.train.reporting import TrainProgress, console
from vqgan_cli.train.runtime import resolve_device

COND_KINDS = ("seg", "depth", "labels")  # plus lowres:S


@dataclass
class EncodeOptions:
    """Everything encode-dataset needs; see ``vqgan encode-dataset --help`` for each option."""

    tokenizer: str
    data: str
    out: str
    size: int | None = None  # default: the tokenizer's training resolution
    keep_aspect: bool = False
    batch_size: int = 32
    workers: int = 2
    shard_size: int = 1000
    flip_copies: bool = False
    limit: int | None = None
    root: str | None = None
    cond: str | None = None  # seg | depth | labels | lowres:S
    cond_tokenizer: str | None = None
    cond_data: str | None = None
    n_labels: int | None = None
    label_shift: int = 0
    labels: str | None = None  # folders | path to a CSV
    missing: str = "stop"  # a missing cond map / class label: stop or skip the image
    device: str = "auto"
    overwrite: bool = False
    command: str | None = None


class EncodeResult(NamedTuple):
    out: Path
    shards: int
    samples: int
    skipped: int
    encoded_now: int  # images encoded by this invocation (0 when everything was already done)
    seconds: float
    images_per_s: float
    grid: tuple[int, int] | None
    vocab_size: int


@dataclass
class _Cond:
    kind: str
    model: VQGAN | None
    vocab: int
    n_labels: int | None
    lowres: int | None


def _load(path: str) -> tuple[VQGAN, dict]:
    from vqgan_cli.loading import load_tokenizer

    model = load_tokenizer(path)
    vocab = int(getattr(model.quantize, "n_tokens", model.config.quantizer.n_embed))
    info = {"path": str(path), "weights_sha256": weights_sha256(model.state_dict()), "n_embed": vocab,
            "factor": model.factor, "modality": model.config.modality, "config": to_dict(model.config)}
    return model, info


def _parse_cond(opts: EncodeOptions, tok: VQGAN) -> tuple[str | None, int | None]:
    kind = opts.cond
    if kind is None and opts.cond_tokenizer is not None:
        raise EncodeUsageError("--cond-tokenizer needs --cond seg, depth or lowres:S")
    if kind is None:
        return None, None
    if kind.startswith("lowres:"):
        try:
            s = int(kind.split(":", 1)[1])
        except ValueError:
            s = 0
        if s < 2:
            raise EncodeUsageError(f"--cond {kind}: expected lowres:S with an integer S >= 2")
        return "lowres", s
    if kind not in COND_KINDS:
        raise EncodeUsageError(f"--cond {kind}: expected one of seg, depth, labels, lowres:S")
    if kind in ("seg", "depth") and opts.cond_tokenizer is None:
        hint = " (or --cond labels for raw label maps on the token grid)" if kind == "seg" else ""
        raise EncodeUsageError(f"--cond {kind} needs --cond-tokenizer (a {kind} tokenizer){hint}")
    if kind == "labels" and opts.cond_tokenizer is not None:
        raise EncodeUsageError("--cond labels uses raw label maps; drop --cond-tokenizer or use --cond seg")
    return kind, None


def _setup_cond(opts: EncodeOptions, tok: VQGAN, builtin: bool) -> tuple[_Cond | None, dict | None]:
    kind, lowres = _parse_cond(opts, tok)
    if kind is None:
        return None, None
    model, info = (None, None)
    if opts.cond_tokenizer is not None:
        model, info = _load(opts.cond_tokenizer)
        want = {"seg": "segmentation", "depth": "depth", "lowres": "image"}[kind]
        if model.config.modality != want:
            raise EncodeUsageError(f"--cond-tokenizer {opts.cond_tokenizer} is a {model.config.modality} "
                                   f"tokenizer; --cond {opts.cond} needs a {want} tokenizer")
        if model.factor != tok.factor:
            raise EncodeUsageError(f"--cond-tokenizer has factor {model.factor} but the image tokenizer "
                                   f"{tok.factor}: conditioning tokens must share the image's grid")
    if kind == "lowres" and model is None:
        model = tok  # the image tokenizer encodes the low-resolution copy
    n_labels = None
    if kind in ("seg", "labels"):
        if model is not None:
            n_labels = model.config.n_labels
            if opts.n_labels is not None and opts.n_labels != n_labels:
                raise EncodeUsageError(f"--n-labels {opts.n_labels} differs from the cond tokenizer's {n_labels}")
        else:
            n_labels = opts.n_labels or (len(builtin_classes()) if builtin else None)
            if n_labels is None:
                raise EncodeUsageError("--cond labels on map files needs --n-labels (the label vocabulary)")
        if builtin and n_labels < len(builtin_classes()):
            raise EncodeUsageError(f"builtin:landscapes has {len(builtin_classes())} classes but n_labels "
                                   f"is {n_labels}")
    if kind == "depth" and builtin:
        raise EncodeUsageError("builtin:landscapes has no depth maps")
    vocab = int(getattr(model.quantize, "n_tokens", model.config.quantizer.n_embed)) if model is not None \
        and kind != "labels" else int(n_labels)  # type: ignore[arg-type]
    desc = {"kind": opts.cond, "tokenizer": info if opts.cond_tokenizer else None, "vocab_size": vocab,
            "dtype": token_dtype(vocab).name, "n_labels": n_labels,
            "classes": builtin_classes() if builtin and kind in ("seg", "labels") else None,
            "note": {"labels": "raw label maps, nearest-downsampled to the token grid (the label at "
                               "the centre pixel of each f x f cell); vocabulary = n_labels",
                     "lowres": f"{lowres}x bicubic downsample then upsample, encoded by "
                               f"{'the cond tokenizer' if opts.cond_tokenizer else 'the image tokenizer'}"
                     }.get(kind)}
    return _Cond(kind, model, vocab, n_labels, lowres), desc


class _Items(Dataset):
    """Map-style view of the inputs for loader workers: never raises for a bad file."""

    def __init__(self, items: list[InputItem], prep: Prepare):
        self.items, self.prep = items, prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        meta = {"index": index, "key": it.key, "label": it.label, "path": it.path}
        if it.problem is not None:
            return {**meta, "skip": it.problem}
        try:
            return {**meta, **self.prep(it)}
        except BadFile as e:
            return {**meta, "skip": e.reason, "path": e.path}
        except DataError as e:  # e.g. a label outside n_labels: must stop the run
            return {**meta, "fatal": str(e)}


def _collate(samples: list[dict]) -> dict:
    """Metadata in order plus one stacked group per image shape (several only with --keep-aspect)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        if "image" in s:
            groups.setdefault(tuple(s["image"].shape), []).append(i)
    out = []
    for pos in groups.values():
        g = {"pos": pos, "image": torch.stack([samples[i]["image"] for i in pos])}
        if "map" in samples[pos[0]]:
            g["map"] = torch.stack([samples[i]["map"] for i in pos])
        out.append(g)
    meta = [{k: v for k, v in s.items() if k not in ("image", "map")} for s in samples]
    return {"meta": meta, "groups": out}


def shard_batches(todo: list[int], n_items: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches of the shards still to do; each shard is batched from its own first item."""
    out = []
    for s in todo:
        start, end = s * shard_size, min((s + 1) * shard_size, n_items)
        out += [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]
    return out


@torch.inference_mode()
def _tokens(model: VQGAN, x: torch.Tensor, flip: bool, seed: int) -> torch.Tensor:
    """Token grids of ``x`` (and of its mirror image, appended), one forward for both."""
    if flip:
        x = torch.cat([x, x.flip(-1)])
    torch.manual_seed(seed)  # only a remapping tokenizer with unknown_index=random draws
    return model.encode(x).indices.cpu()


def encode_dataset(opts: EncodeOptions, progress: bool = True) -> EncodeResult:
    """Encode ``opts.data`` into token shards under ``opts.out`` (resuming what is there)."""
    started = time.perf_counter()
    for name, v, lo in (("--batch-size", opts.batch_size, 1), ("--shard-size", opts.shard_size, 1),
                        ("--workers", opts.workers, 0), ("--limit", opts.limit or 1, 1)):
        if v < lo:
            raise EncodeUsageError(f"{name} must be >= {lo}, got {v}")
    if opts.missing not in ("stop", "skip"):
        raise EncodeUsageError(f"--missing must be stop or skip, got {opts.missing!r}")
    try:
        device = resolve_device(opts.device)
    except RuntimeError as e:
        raise EncodeUsageError(str(e)) from None
    tok, tok_info = _load(opts.tokenizer)
    ae = tok.config.autoencoder
    if tok.config.modality != "image" or ae.in_channels != 3:
        raise EncodeUsageError(f"--tokenizer {opts.tokenizer} takes {ae.in_channels}-channel "
                               f"{tok.config.modality} input, but --data gives RGB images (3 channels); "
                               "pass the image tokenizer (a map tokenizer goes to --cond-tokenizer)")
    size = opts.size or ae.resolution
    if size % tok.factor:
        raise EncodeUsageError(f"--size {size} is not a multiple of the tokenizer's factor {tok.factor}")
    builtin = opts.data.startswith("builtin:")
    cond, cond_desc = _setup_cond(opts, tok, builtin)
    items = list_items(opts.data, opts.root, opts.limit)
    if cond is not None and cond.kind in ("seg", "depth", "labels"):
        pair_maps(items, opts.cond_data, opts.missing)
    table = assign_labels(items, opts.labels, opts.missing) if opts.labels else None
    labels = None
    if table is not None:
        n_cls = max(table.values()) + 1
        names: list[str | None] = [None] * n_cls
        for k, v in table.items():
            names[v] = k
        labels = {"source": opts.labels, "table": table, "names": names, "n_classes": n_cls}

    out = Path(opts.out)
    n_shards = -(-len(items) // opts.shard_size)
    keys_hash = hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest()
    identity = {
        "tokenizer_sha256": tok_info["weights_sha256"],
        "cond_tokenizer_sha256": cond_desc["tokenizer"]["weights_sha256"] if cond_desc and cond_desc["tokenizer"]
        else None,
        "data": opts.data if builtin else str(Path(opts.data).resolve()), "n_items": len(items),
        "items_sha256": keys_hash, "size": size, "keep_aspect": opts.keep_aspect,
        "flip_copies": opts.flip_copies, "shard_size": opts.shard_size, "cond": opts.cond,
        "cond_data": str(Path(opts.cond_data).resolve()) if opts.cond_data else None,
        "n_labels": cond.n_labels if cond else None, "label_shift": opts.label_shift,
        "labels": opts.labels, "labels_csv_sha256": file_sha256(opts.labels)
        if opts.labels and opts.labels != "folders" else None, "missing": opts.missing,
    }
    grid = None if opts.keep_aspect else [size // tok.factor] * 2
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "command": opts.command or shlex.join(["vqgan", *sys.argv[1:]]),
        "identity": identity, "tokenizer": tok_info, "cond": cond_desc,
        "vocab_size": max(tok_info["n_embed"], cond.vocab if cond else 0),
        "dtype": token_dtype(tok_info["n_embed"]).name, "grid": grid,
        "image_size": [size, size] if grid else None, "labels": labels,
        "n_items": len(items), "n_shards": n_shards, "shard_size": opts.shard_size,
        "shards": [], "skipped": [], "counts": {}, "complete": False,
        "run": {"batch_size": opts.batch_size, "workers": opts.workers, "device": str(device)},
    }
    folder, notes = open_output(out, manifest, opts.overwrite)
    for n in notes:
        console.print(f"[yellow]{n}[/]")
    todo = [s for s in range(n_shards) if s not in folder.done]
    prep = Prepare(size, opts.keep_aspect, tok.factor,
                   {"seg": "seg", "labels": "seg", "depth": "depth"}.get(cond.kind) if cond else None,
                   cond.lowres if cond else None, cond.n_labels if cond else None, opts.label_shift)
    tok.to(device).eval()
    if cond is not None and cond.model is not None:
        cond.model.to(device).eval()
    done_items = sum(e["items"][1] - e["items"][0] for e in folder.manifest["shards"])
    encoded, t0 = 0, time.perf_counter()
    if todo:
        encoded, t0 = _run(folder, items, todo, prep, tok, cond, opts, device, progress, done_items)
    folder.manifest["complete"] = True
    folder.save()
    m = folder.manifest
    secs = time.perf_counter() - t0
    return EncodeResult(out, len(m["shards"]), m["counts"]["samples"], m["counts"]["skipped"], encoded,
                        time.perf_counter() - started, encoded / secs if encoded and secs > 0 else 0.0,
                        tuple(grid) if grid else None, m["vocab_size"])


def _run(folder: OutputFolder, items: list[InputItem], todo: list[int], prep: Prepare, tok: VQGAN,
         cond: _Cond | None, opts: EncodeOptions, device: torch.device, progress: bool,
         done_items: int) -> tuple[int, float]:
    """The encode loop; returns (images encoded, start time of the first batch's wait)."""
    batches = shard_batches(todo, len(items), opts.shard_size, opts.batch_size)
    loader = DataLoader(_Items(items, prep), batch_sampler=batches, num_workers=opts.workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    dt_img = np.dtype(folder.manifest["dtype"])
    dt_cond = np.dtype(cond and folder.manifest["cond"]["dtype"] or "uint8")
    f, flip = tok.factor, opts.flip_copies
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
                    x = g["image"].to(device, non_blocking=True)
                    idx = _tokens(tok, x, flip, first).numpy()
                    cidx = _cond_tokens(cond, g, device, flip, f, first).numpy() if cond is not None else None
                    for j, p in enumerate(g["pos"]):
                        s = meta[p]
                        results[p] = TokenSample(
                            s["key"], idx[j].astype(dt_img),
                            cidx[j].astype(dt_cond) if cidx is not None else None, s["label"],
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
                rate = encoded / max(time.perf_counter() - t0, 1e-9)
                bar.update(done_items + encoded, rate, "img", f"shard {shard + 1}/{folder.manifest['n_shards']}")
        finally:
            if writer is not None:
                writer.abort()
    return encoded, t0


def _cond_tokens(cond: _Cond, g: dict, device: torch.device, flip: bool, f: int, seed: int) -> torch.Tensor:
    m = g["map"].to(device, non_blocking=True)
    if cond.kind == "labels":  # label at the centre pixel of every f x f cell
        grids = [m[:, f // 2::f, f // 2::f]]
        if flip:
            grids.append(m.flip(-1)[:, f // 2::f, f // 2::f])
        return torch.cat(grids).long().cpu()
    if cond.kind == "seg":
        m = one_hot(m.long(), cond.n_labels)  # type: ignore[arg-type]
    return _tokens(cond.model, m, flip, seed)  # type: ignore[arg-type]
