#!/usr/bin/env python
"""Do sliding-window samples follow their maps, and what do the windows leave in them?

    python benchmarks/window_quality.py [--prior runs/quickstart_prior/prior.safetensors]
        [--tokenizer PATH] [--seeds 1000000,1000001] [--size 1280x832] [--windows exact,fast]
        [--top-k 10] [--temperature 1.0] [--segment N,...] [--precision bf16] [--threads T]
        [--device cpu] [--classifier cells_f8.npz] [--out table.json|table.md] [--save-images DIR]

For every combination of window mode, top-k, temperature (and, for the ``fast`` window, segment)
each held-out map ``builtin:landscapes:SEED`` is sampled at ``--size`` exactly as
``vqgan sample --cond builtin:landscapes:SEED --seed SEED`` does (the library's ``run_sample``,
one image per call, the sampling seed = the map's seed), and the decoded PNG is measured against
the scene the map was rendered with:

- agreement: share of f x f cells whose class (``vqgan_cli.evaluate.map_agreement``: a classifier fitted
  on training scenes) equals the map's label at the cell centre;
- band: the largest amplitude of the row profile over periods from f*ch/2 - f to f*ch + f pixels
  (the window's vertical steps; ch = the prior's crop height in tokens), over the real render's;
- token: the same at exactly f pixels (one token), over the real render's;
- seam: median jump across rows at multiples of f*ch/2 over the jumps f rows above and below
  (1 = no seams; the real render's own value is in its row);
- speckles: share of cells inside one-label regions whose mean colour differs from the median of
  their 8 neighbours by more than 24 grey levels (``vqgan_cli.metrics.speckle_score``: dots of
  wrong colour in the sky; a real render: 0);
- bottom strip: mean luminance of the last token row minus the row above it, in grey levels
  (``vqgan_cli.metrics.bottom_edge_step``; the real render darkens downwards: slightly negative);
- s/img: seconds of sampling per image (no loading, no decoding).

Two reference rows: the real render (its agreement is the ceiling the classifier allows) and,
the tokenizer's reconstruction of it (encode + decode: the bound a prior over these tokens can
reach). Window modes are passed to the sampler by name (``--windows`` takes whatever
``vqgan sample --window`` accepts); ``--segment`` needs a sampler that has that option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_line  # a sibling script: benchmarks/ is on sys.path
from PIL import Image

from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.data.maps import cell_labels
from vqgan_cli.data.transforms import image_to_tensor
from vqgan_cli.evaluate.map_agreement import CellClassifier, fit_cell_classifier, label_agreement
from vqgan_cli.images import save_png, to_uint8
from vqgan_cli.metrics import band_score, bottom_edge_step, period_amplitude, seam_ratio, speckle_score
from vqgan_cli.runtime import resolve_device
from vqgan_cli.sample.decode import decode_grid
from vqgan_cli.sample.inputs import crop_grid, load_models
from vqgan_cli.sample.request import SampleRequest
from vqgan_cli.sample.run import run_sample

COLUMNS = ("agreement", "band", "token", "seam", "speckle", "bottom", "s/img")
HEADERS = ("agreement", "band / real", "token / real", "seam", "speckles", "bottom strip", "s/img")


def _list(text: str, cast):
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def _top_k(v: str) -> int | None:
    return None if v.lower() in ("none", "0", "") else int(v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default="runs/quickstart_prior/prior.safetensors")
    ap.add_argument("--tokenizer", default=None, help="default: the one the prior records")
    ap.add_argument("--seeds", default="1000000,1000001",
                    help="held-out built-in maps (validation scenes start at 1_000_000)")
    ap.add_argument("--size", default="1280x832", help="WxH pixels")
    ap.add_argument("--windows", default="exact,fast", help="window modes, passed to the sampler")
    ap.add_argument("--top-k", default="10", help="comma list; 'none' for no top-k")
    ap.add_argument("--temperature", default="1.0", help="comma list")
    ap.add_argument("--segment", default=None, help="comma list, for the 'fast' window only")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (as vqgan sample)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--band", default=None,
                    help="LO-HI periods in px for the band column (default f*ch/2 - f to f*ch + f)")
    ap.add_argument("--seam-period", type=int, default=None, help="px, a multiple of f (default f*ch/2)")
    ap.add_argument("--classifier", default=None,
                    help="cell classifier .npz: loaded if it exists, else fitted and saved there")
    ap.add_argument("--out", default=None, help="write the table: .md as markdown, else JSON")
    ap.add_argument("--save-images", default=None, help="folder for the samples, renders and reconstructions")
    return ap.parse_args(argv)


def settings(args: argparse.Namespace) -> list[dict]:
    """Every combination to sample: window x top-k x temperature (x segment for ``fast``)."""
    segments = _list(args.segment, int) if args.segment else [None]
    out = []
    for window in _list(args.windows, str):
        for k in _list(args.top_k, _top_k):
            for t in _list(args.temperature, float):
                for seg in (segments if window == "fast" else [None]):
                    out.append({"window": window, "top_k": k, "temperature": t, "segment": seg})
    return out


def classifier_for(path: str | None, factor: int) -> CellClassifier:
    if path is not None and Path(path).is_file():
        clf = CellClassifier.load(path)
        if clf.factor != factor:
            sys.exit(f"--classifier {path} was fitted on {clf.factor} px cells; the tokenizer's are {factor}")
        return clf
    t0 = time.perf_counter()
    clf = fit_cell_classifier(factor=factor)
    print(f"fitted the cell classifier ({len(clf.seeds)} training scenes x {len(clf.sizes)} sizes) "
          f"in {time.perf_counter() - t0:.1f} s")
    if path is not None:
        clf.save(path)
    return clf


class Measure:
    """The measurements of one image against the real render of its map."""

    def __init__(self, factor: int, crop_h: int, height: int, clf: CellClassifier,
                 band: str | None = None, seam_period: int | None = None):
        self.f, self.clf = factor, clf
        self.seam_period = seam_period or factor * crop_h // 2
        lo, hi = max(2, factor * crop_h // 2 - factor), factor * crop_h + factor
        if band:
            lo, hi = map(int, band.split("-"))
        # periods whose detrended profile still holds two whole periods (see period_amplitude)
        self.band = [p for p in range(lo, hi + 1) if height - 2 * (p // 2) >= 2 * p]

    def __call__(self, img: np.ndarray, labels: np.ndarray, real: np.ndarray) -> dict[str, float]:
        def ratio(fn) -> float:
            den = fn(real)
            return fn(img) / den if den > 0 else math.nan

        nan = math.nan
        return {"agreement": label_agreement(img, labels, self.f, self.clf),
                "band": ratio(lambda x: band_score(x, self.band)) if self.band else nan,
                "token": ratio(lambda x: period_amplitude(x, self.f)) if img.shape[0] >= 3 * self.f + 2 else nan,
                "seam": seam_ratio(img, self.seam_period, self.f)
                if img.shape[0] > self.seam_period + self.f else nan,
                "speckle": speckle_score(img, cell_labels(labels, self.f), self.f),
                "bottom": bottom_edge_step(img, self.f)}


def _mean(rows: list[dict[str, float]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan


def _label(s: dict) -> str:
    k = "none" if s["top_k"] is None else s["top_k"]
    seg = "" if s["segment"] is None else f" seg {s['segment']}"
    return f"{s['window']} k={k} T={s['temperature']:g}{seg}"


def _fmt(key: str, v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.4f}" if key in ("agreement", "speckle") else f"{v:.2f}"


def _json_safe(x):
    """NaN (a measure undefined at this size) as null: strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def table(rows: list[dict]) -> list[str]:
    """Markdown table lines: one row per setting and the two reference rows."""
    lines = ["| setting | " + " | ".join(HEADERS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(c, r.get(c)) for c in COLUMNS) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    seeds = _list(args.seeds, int)
    models = load_models(args.prior, args.tokenizer, resolve_device(args.device))
    tok = models.tokenizer
    f = tok.factor
    ch = crop_grid(models.prior, tok)[0]
    w_px, h_px = map(int, args.size.lower().split("x"))
    combos = settings(args)
    has_segment = "segment" in {fl.name for fl in dataclasses.fields(SampleRequest)}
    if any(s["segment"] is not None for s in combos) and not has_segment:
        sys.exit("--segment: this version of the sampler has no segment option")
    clf = classifier_for(args.classifier, f)
    measure = Measure(f, ch, h_px, clf, args.band, args.seam_period)
    save = Path(args.save_images) if args.save_images else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    band = f"{measure.band[0]}..{measure.band[-1]} px" if measure.band else "none (image too short)"
    print(f"{args.prior}: crop {ch} tokens, f{f}; {args.size}, seeds {seeds}, {args.precision}, "
          f"{torch.get_num_threads()} threads; band periods {band}, seams every {measure.seam_period} px")

    scenes = {s: render_landscape(s, h_px, w_px) for s in seeds}
    real_rows, rec_rows = [], []
    for s, scene in scenes.items():
        real_rows.append(measure(scene.image, scene.labels, scene.image))
        x = image_to_tensor(scene.image)[None]
        with torch.no_grad():
            idx = tok.encode(x.to(tok.last_layer.device)).indices.reshape(1, h_px // f, w_px // f)
            rec = to_uint8(decode_grid(tok, idx).image[0].cpu())
        rec_rows.append(measure(rec, scene.labels, scene.image))
        if save:
            save_png(save / f"real_seed{s}.png", scene.image)
            save_png(save / f"reconstruction_seed{s}.png", rec)

    out_rows = [{"name": "real render (ceiling)", **{c: _mean(real_rows, c) for c in COLUMNS[:-1]},
                 "per_seed": real_rows},
                {"name": "tokenizer reconstruction (bound)", **{c: _mean(rec_rows, c) for c in COLUMNS[:-1]},
                 "per_seed": rec_rows}]
    with tempfile.TemporaryDirectory() as tmp:
        for combo in combos:
            per_seed = []
            for s in seeds:
                extra = {"segment": combo["segment"]} if combo["segment"] is not None else {}
                req = SampleRequest(prior=args.prior, tokenizer=args.tokenizer, n=1, batch_size=1, seed=s,
                                    temperature=combo["temperature"], top_k=combo["top_k"],
                                    cond=f"builtin:landscapes:{s}", size=args.size, window=combo["window"],
                                    precision=args.precision, device=args.device, out=tmp, **extra)
                report = run_sample(req, models)
                with Image.open(report.files[0]) as im:
                    img = np.asarray(im.convert("RGB"))
                row = measure(img, scenes[s].labels, scenes[s].image)
                row["s/img"] = report.seconds
                per_seed.append(row)
                if save:
                    name = _label(combo).replace(" ", "_").replace("=", "")
                    save_png(save / f"{name}_seed{s}.png", img)
            out_rows.append({"name": _label(combo), **combo, **{c: _mean(per_seed, c) for c in COLUMNS},
                             "per_seed": per_seed})
            print(f"  {_label(combo)}: agreement {out_rows[-1]['agreement']:.4f}, "
                  f"{out_rows[-1]['s/img']:.1f} s/img", flush=True)
    lines = table(out_rows)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".md":
            out.write_text("\n".join(lines) + "\n")
        else:
            meta = {"prior": args.prior, "tokenizer": str(models.tokenizer_path), "size": args.size,
                    "seeds": seeds, "precision": args.precision, "threads": torch.get_num_threads(),
                    "band_periods": measure.band, "seam_period": measure.seam_period}
            doc = {"settings": meta, "rows": _json_safe(out_rows)}
            out.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return out_rows


if __name__ == "__main__":
    main()
