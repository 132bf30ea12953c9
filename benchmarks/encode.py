#!/usr/bin/env python
"""encode-dataset's images/s as a ratio to the bare encoder forward on the same batches in memory.

    python benchmarks/encode.py [--quick] [--preset quickstart|f16] [--images N] [--batch-size B]
                                [--workers W] [--threads T] [--rounds R] [--device cpu|cuda]

The data is a folder of JPEGs (procedural landscapes, 1.25 x 1.5 times the encoding size), so
encode-dataset pays for everything a real run pays for: listing, JPEG decoding, resizing and
cropping in loader workers, moving batches to the device, the encoder, and writing, hashing and
committing shards. The baseline decodes the same files beforehand and times only
``model.encode`` over the identical batches, already on the device. Ratio = encode-dataset
images/s / baseline images/s (1.0 would mean loading and writing are completely hidden behind
the encoder). Encode runs alternate with baseline runs; each encode run is compared with the
baselines right before and after it, and the median of these per-round ratios is reported, which
evens out load changes on a shared machine. On a busy CPU pass ``--threads 1``: with more
intra-op threads than free cores OpenMP stalls make both sides slow and erratic. The model has
random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_line  # a sibling script: benchmarks/ is on sys.path
from PIL import Image

from vqgan_cli.checkpoints.load import save_tokenizer
from vqgan_cli.config import load_recipe
from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.encode import EncodeOptions, encode_dataset, shard_batches
from vqgan_cli.encode.inputs import Prepare, list_items, to_model_range
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.runtime import autocast, resolve_precision

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def build_model(preset: str) -> tuple[VQGAN, int]:
    """(tokenizer with random weights, encoding size): the quickstart f8 model at 64 px, or the
    released f16-1024 architecture at 256 px."""
    if preset == "quickstart":
        from vqgan_cli.train.tokenizer import TokenizerRecipe

        cfg = load_recipe(TokenizerRecipe, RECIPES / "quickstart.yaml", []).model
        size = 64
    elif preset == "f16":
        cfg, size = TokenizerConfig(), 256
    else:
        raise SystemExit(f"unknown preset {preset!r}")
    torch.manual_seed(0)
    return VQGAN(cfg).eval(), size


def write_images(folder: Path, n: int, size: int) -> None:
    """n JPEGs larger than ``size`` (so every one is decoded, resized and cropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = int(size * 1.25), int(size * 1.5)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(render_landscape(i, h, w).image).save(buf, "JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buf.getvalue())


def bare_rate(model: VQGAN, batches: list[torch.Tensor], device: torch.device) -> float:
    """Images/s of model.encode alone over batches already on the device, at the precision
    encode-dataset's ``auto`` runs on this device."""
    precision = resolve_precision("auto", device, training=False).name
    with torch.inference_mode(), autocast(device, precision):
        model.encode(batches[0])  # warm-up (kernel selection, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for x in batches:
            model.encode(x).indices.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return sum(x.shape[0] for x in batches) / dt


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few images: checks that it runs, not speed")
    ap.add_argument("--preset", default="quickstart", choices=("quickstart", "f16"))
    ap.add_argument("--images", type=int, default=None, help="default 1024 (quickstart) / 64 (f16)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="encode-dataset runs, each between two baselines")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    rounds = 1 if args.quick else args.rounds
    n = args.images or (16 if args.quick else (1024 if args.preset == "quickstart" else 64))
    batch = min(args.batch_size, 8) if args.quick else args.batch_size
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    model, size = build_model(args.preset)
    work = Path(tempfile.mkdtemp(prefix="vqgan-bench-encode-"))
    try:
        write_images(work / "images", n, size)
        tok = save_tokenizer(work / "tok.safetensors", model)
        model.to(device)
        items = list_items(str(work / "images"), None, None)
        prep = Prepare(size, False, model.factor, None, None, None)
        groups = shard_batches([0], len(items), len(items), batch)
        batches = [to_model_range(torch.stack([prep(items[i])["image"] for i in g])).to(device)
                   for g in groups]
        bare, full = [bare_rate(model, batches, device)], []
        for _ in range(rounds):  # interleaved, so load changes on the machine hit both sides
            r = encode_dataset(EncodeOptions(str(tok), str(work / "images"), str(work / "out"), size=size,
                                             batch_size=batch, workers=args.workers,
                                             shard_size=max(1, n // 4),
                                             device=str(device), overwrite=True), progress=False)
            full.append(r.images_per_s)
            bare.append(bare_rate(model, batches, device))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, e = statistics.median(bare), statistics.median(full)
    # each encode run against the mean of the baselines just before and after it: neighbours in
    # time share the machine's load, so the per-round ratio is steadier than a ratio of medians
    ratios = [full[i] / ((bare[i] + bare[i + 1]) / 2) for i in range(rounds)]
    out = {"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
           "workers": args.workers, "batch": batch, "images": n, "encode_dataset_img_s": e,
           "bare_encoder_img_s": b, "ratios": ratios, "ratio": statistics.median(ratios)}
    print(f"encode-dataset {args.preset} ({size}px, batch {batch}, {args.workers} worker(s), "
          f"{out['threads']} thread(s), {device}, {n} images, {rounds} round(s))")
    print(f"  bare encoder forward : {b:8.2f} img/s  median of {', '.join(f'{x:.2f}' for x in bare)}")
    print(f"  encode-dataset       : {e:8.2f} img/s  median of {', '.join(f'{x:.2f}' for x in full)}")
    print(f"  ratio                : {out['ratio']:8.3f}  median of per-round ratios "
          f"{', '.join(f'{x:.3f}' for x in ratios)}")
    return out


if __name__ == "__main__":
    main()
