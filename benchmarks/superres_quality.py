#!/usr/bin/env python
"""Stochastic super-resolution against bicubic upsampling on held-out built-in scenes.

    python benchmarks/superres_quality.py [--prior runs/quickstart_superres/prior.safetensors]
        [--seeds 1000000,1000001,...] [--size 512x320] [--scale 4] [--n 1] [--top-k K]
        [--temperature T] [--window exact|fast] [--precision fp32|bf16] [--threads T]
        [--save-images DIR] [--out table.md]

For each held-out scene (seeds from VAL_SEED_BASE, never trained on) the real render at --size is
shrunk --scale times (PIL bicubic, which antialiases: what a user's small photo looks like) and
then brought back to --size three ways: bicubic upsampling, `vqgan upscale` (the library call the
command makes, so the same code runs), and, as the bound the prior cannot beat, the tokenizer's
own reconstruction of the real render. Each is scored against the real render: PSNR (dB) and the
label agreement of its token cells with the scene's map (vqgan_cli.evaluate.map_agreement). Seconds are
per upscaled image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_line  # a sibling script: benchmarks/ is on sys.path
from PIL import Image

from vqgan_cli.data.dataset import VAL_SEED_BASE
from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.data.transforms import image_to_tensor, tensor_to_image
from vqgan_cli.evaluate.map_agreement import fit_cell_classifier, label_agreement
from vqgan_cli.images import save_png
from vqgan_cli.metrics import psnr
from vqgan_cli.sample.inputs import load_models
from vqgan_cli.sample.request import UpscaleRequest
from vqgan_cli.sample.run import run_upscale


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(psnr(image_to_tensor(a)[None], image_to_tensor(b)[None])[0])


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per method, averaged over the seeds."""
    width, height = args.size
    models = load_models(args.prior, None, torch.device("cpu"))
    tok = models.tokenizer
    f = tok.factor
    classifier = fit_cell_classifier(factor=f)
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, image: np.ndarray, real: np.ndarray, labels: np.ndarray, secs: float = 0.0) -> None:
        r = rows.setdefault(name, {"psnr": [], "agreement": [], "seconds": []})
        r["psnr"].append(_psnr(image, real))
        r["agreement"].append(label_agreement(image, labels, f, classifier))
        r["seconds"].append(secs)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            scene = render_landscape(seed, height, width)
            low = Image.fromarray(scene.image).resize((width // args.scale, height // args.scale),
                                                      Image.Resampling.BICUBIC)
            low_path = Path(tmp) / f"low_{seed}.png"
            save_png(low_path, np.asarray(low))
            bicubic = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC))
            with torch.no_grad():
                _, idx = tok.encode(image_to_tensor(scene.image)[None])
                recon = tensor_to_image(tok.decode_indices(idx)[0])
            add("real render (ceiling)", scene.image, scene.image, scene.labels)
            add("tokenizer reconstruction (bound)", recon, scene.image, scene.labels)
            add(f"bicubic x{args.scale}", bicubic, scene.image, scene.labels)
            out = Path(args.save_images or tmp) / f"upscaled_{seed}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            req = UpscaleRequest(prior=args.prior, image=str(low_path), scale=args.scale, out=str(out),
                                 n=args.n, seed=0, temperature=args.temperature, top_k=args.top_k,
                                 window=args.window, precision=args.precision, device="cpu")
            report = run_upscale(req, models)
            for path in report.files:
                up = np.asarray(Image.open(path).convert("RGB"))
                add(f"vqgan upscale x{args.scale}", up, scene.image, scene.labels, report.seconds / args.n)
            if args.save_images:
                save_png(Path(args.save_images, f"real_{seed}.png"), scene.image)
                save_png(Path(args.save_images, f"low_{seed}.png"), np.asarray(low))
                save_png(Path(args.save_images, f"bicubic_{seed}.png"), bicubic)
    return [{"method": k, **{m: statistics.fmean(v) for m, v in r.items()}, "images": len(r["psnr"])}
            for k, r in rows.items()]


def table(rows: list[dict]) -> str:
    lines = ["| method | PSNR (dB) | label agreement | s / image | images |", "|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] else "-"
        lines.append(f"| {r['method']} | {r['psnr']:.2f} | {r['agreement']:.3f} | {secs} | {r['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", default="runs/quickstart_superres/prior.safetensors")
    p.add_argument("--seeds", default=",".join(str(VAL_SEED_BASE + k) for k in range(4)),
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--size", default="512x320", type=_size)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--n", type=int, default=1, help="upscaled samples per scene")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--window", default="fast")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (as vqgan upscale)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-images", default=None)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if any(s < VAL_SEED_BASE for s in args.seeds):
        p.error(f"--seeds: use held-out scenes (>= {VAL_SEED_BASE}); lower seeds are training scenes")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    text = table(measure(args))
    print(text)
    print(f"({len(args.seeds)} held-out scenes at {args.size[0]}x{args.size[1]}, top-k {args.top_k}, "
          f"temperature {args.temperature}, window {args.window}, {args.precision}; "
          f"{time.perf_counter() - t0:.0f} s in all)")
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
