"""FID, KID and IS of a folder of generated images against a reference set, and the label agreement
of samples drawn from built-in maps (their sidecars record ``--cond builtin:landscapes:SEED``).

Reference statistics (mean, covariance and the pool features KID needs) can be saved once with
``--save-stats`` and reused: a statistics file made with other settings is refused, naming the
difference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from vqgan_cli.evaluate.inception import INCEPTION_FILE, EvaluationError, Inception
from vqgan_cli.evaluate.split import (
    collate_indexed,
    from_main,
    gather_arrays,
    gather_objects,
    gather_set,
    on_every_rank,
    padded,
    share_dataset,
    single_process,
)
from vqgan_cli.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    inception_score,
    kernel_inception_distance,
)
from vqgan_cli.runtime import Runtime, my_share

T = TypeVar("T")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
STATS_FORMAT = "vqgan-inception-stats-v1"
DEFINITIONS = {
    "fid": "Fréchet distance of Gaussians fitted to Inception pool3 (2048-d) features of samples and reference",
    "kid_mean": "KID: unbiased MMD^2, cubic polynomial kernel on pool3 features, mean over subsets",
    "kid_std": "standard deviation of KID over the subsets",
    "is_mean": "Inception Score exp(E KL(p(y|x) || p(y))) of the samples (1008 logits), mean over splits",
    "is_std": "standard deviation of IS over the splits",
    "label_agreement": "share of 8x8-pixel cells whose class (cell classifier fitted on rendered scenes) "
                       "equals the built-in map's label, mean over samples drawn from builtin maps",
}


@dataclass
class SampleSetFeatures:
    pool: np.ndarray  # (N, 2048)
    logits: np.ndarray  # (N, 1008)
    names: list[str]
    skipped: list[str] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class SamplesResult:
    metrics: dict[str, float]
    settings: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics,
                "definitions": {k: DEFINITIONS[k] for k in self.metrics if k in DEFINITIONS},
                "settings": self.settings, "skipped": self.skipped, "notes": self.notes}


def list_images(folder: str | Path) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such folder of images")
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _batches(items: Iterator[tuple[T, np.ndarray]], batch_size: int) -> Iterator[tuple[list[T], torch.Tensor]]:
    """Batches of same-sized images with their tags (a size change starts a new batch)."""
    tags: list[T] = []
    arrs: list[np.ndarray] = []
    for tag, arr in items:
        if arrs and (arr.shape != arrs[0].shape or len(arrs) == batch_size):
            yield tags, torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
            tags, arrs = [], []
        tags.append(tag)
        arrs.append(arr)
    if arrs:
        yield tags, torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def folder_features(inception: Inception, paths: list[Path], batch_size: int = 32,
                    progress: bool = False, rt: Runtime | None = None) -> SampleSetFeatures:
    """Inception features of image files; unreadable files are skipped and named. Under torchrun
    each rank reads its share of ``paths``; every rank returns the whole set, in ``paths`` order."""
    rt = rt or single_process(inception.device)
    mine = my_share(len(paths), rt)
    skipped: list[tuple[int, str]] = []
    sizes: set[tuple[int, int]] = set()

    def items() -> Iterator[tuple[int, str, np.ndarray]]:
        seq = mine
        if progress:
            from rich.progress import track

            seq = track(mine, description="inception features")
        for i in seq:
            p = paths[i]
            try:
                arr = _read_rgb(p)
            except Exception as e:  # noqa: BLE001 - any unreadable image is skipped and named
                skipped.append((i, f"{p}: {type(e).__name__}: {e}"))
                continue
            sizes.add((arr.shape[1], arr.shape[0]))
            yield i, str(p), arr

    got = on_every_rank(lambda: _collect(inception, items(), batch_size), rt)
    return _gathered(got, skipped, sizes, rt)


def _collect(inception: Inception, items: Iterator[tuple[int, str, np.ndarray]],
             batch_size: int) -> tuple[list[int], SampleSetFeatures]:
    """(item indices, features) of this rank's items, in the order read."""
    pools, logits, tags = [], [], []
    for t, x in _batches((((i, name), a) for i, name, a in items), batch_size):
        p, lg = inception.features(padded(x, batch_size))  # the same batch size for every image
        pools.append(p[:len(t)])
        logits.append(lg[:len(t)])
        tags += t
    if not tags:
        return [], SampleSetFeatures(np.zeros((0, 2048)), np.zeros((0, 1008)), [])
    return [i for i, _ in tags], SampleSetFeatures(np.concatenate(pools), np.concatenate(logits),
                                                   [n for _, n in tags])


def _gathered(got: tuple[list[int], SampleSetFeatures], skipped: list[tuple[int, str]],
              sizes: set[tuple[int, int]], rt: Runtime) -> SampleSetFeatures:
    """Every rank's features, names and skip messages, in item order (one process: as they are)."""
    index, f = got
    pool, logits = gather_arrays(index, [f.pool, f.logits], rt)
    names = gather_objects(index, f.names, rt)
    skip = gather_objects([i for i, _ in skipped], [m for _, m in skipped], rt)
    return SampleSetFeatures(pool, logits, names, skip, gather_set(sizes, rt))


def source_features(inception: Inception, source: str, size: int | None, limit: int | None,
                    batch_size: int = 32, progress: bool = False, rt: Runtime | None = None) -> SampleSetFeatures:
    """Features of a stage-one data source: a plain folder as stored (any size), other sources
    (file lists, shards, builtin:landscapes) as centre crops of ``size`` (default 256). Under
    torchrun each rank reads its share; every rank returns the whole set, in the source's order."""
    if Path(source).is_dir() and size is None:
        paths = list_images(source)
        return folder_features(inception, paths[:limit] if limit else paths, batch_size, progress, rt)
    from vqgan_cli.evaluate.inception import to_uint8_batch
    from vqgan_cli.evaluate.tokenizer import evaluation_dataset

    rt = rt or single_process(inception.device)
    ds = share_dataset(evaluation_dataset(source, size or 256, "image", None, limit), rt)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_indexed, num_workers=0)
    skipped: list[tuple[int, str]] = []

    def items() -> Iterator[tuple[int, str, np.ndarray]]:
        for b in loader:
            skipped.extend(zip(b["skipped_index"], b["skipped"], strict=True))
            if not b["key"]:
                continue
            u = to_uint8_batch(b["image"]).permute(0, 2, 3, 1).numpy()
            yield from zip(b["index"], b["key"], u, strict=True)

    s = size or 256
    got = on_every_rank(lambda: _collect(inception, items(), batch_size), rt)
    return _gathered(got, skipped, {(s, s)}, rt)


def stats_settings(inception: Inception, reference: str, size: int | None, limit: int | None) -> dict[str, Any]:
    from vqgan_cli import __version__

    return {"format": STATS_FORMAT, "network": "torch-fidelity inception-v3-compat",
            "weights": INCEPTION_FILE, "features": "2048", "reference": reference,
            "size": size, "limit": limit, "vqgan_version": __version__}


_MUST_MATCH = ("format", "network", "weights", "features")


def save_stats(path: str | Path, feats: SampleSetFeatures, settings: dict[str, Any]) -> Path:
    mu, sigma = feature_stats(feats.pool)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as fh:
        np.savez(fh, mu=mu, sigma=sigma, pool=feats.pool.astype(np.float32),
                 settings=np.array(json.dumps({**settings, "images": len(feats.pool)})))
    return p


def load_stats(path: str | Path, expect: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(mu, sigma, pool features, settings) of a statistics file, refused when made otherwise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma, pool = z["mu"], z["sigma"], z["pool"].astype(np.float64)
            settings = json.loads(str(z["settings"]))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"{path}: not a statistics file written by `save_stats` ({e})") from None
    for k in _MUST_MATCH:
        if settings.get(k) != expect.get(k):
            raise EvaluationError(f"{path}: made with {k} = {settings.get(k)!r}, this run uses "
                                  f"{expect.get(k)!r}; recompute it with `save_stats`")
    return mu, sigma, pool, settings


def _builtin_seed(name: str) -> int | None:
    """The built-in map seed of a sample whose sidecar records ``builtin:landscapes[:SEED]`` and
    whose sides are multiples of 8 (cells of 8x8 pixels); None for any other sample."""
    from PIL import Image

    side = Path(name).with_suffix(".json")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
        cond = (meta.get("settings") or {}).get("cond", meta.get("cond"))  # vqgan sample: settings.cond
    except (OSError, ValueError):
        return None
    if not isinstance(cond, str) or not cond.startswith("builtin:landscapes"):
        return None
    with Image.open(name) as im:  # the header only
        if im.size[0] % 8 or im.size[1] % 8:
            return None
    return int(cond.rsplit(":", 1)[1]) if cond.count(":") == 2 else 0


def builtin_agreement(folder: str | Path, names: list[str], classifier=None,  # noqa: ANN001
                      rt: Runtime | None = None) -> tuple[float | None, int]:
    """Mean label agreement of the samples whose sidecar's ``cond`` is ``builtin:landscapes[:SEED]``
    with that map (rendered at the sample's size), and how many samples it covers. Under torchrun
    the classifier is fitted once (rank 0) and each rank scores its share of those samples."""
    from vqgan_cli.data.landscapes import render_landscape
    from vqgan_cli.evaluate.map_agreement import fit_cell_classifier, label_agreement

    rt = rt or single_process()
    found = [(name, seed) for name in names if (seed := _builtin_seed(name)) is not None]
    if not found:
        return None, 0
    classifier = classifier or from_main(fit_cell_classifier, rt)
    mine = my_share(len(found), rt)

    def score() -> list[float]:
        vals = []
        for k in mine:
            img = _read_rgb(Path(found[k][0]))
            labels = render_landscape(found[k][1], img.shape[0], img.shape[1]).labels
            vals.append(label_agreement(img, labels, 8, classifier))
        return vals

    vals = gather_objects(mine, on_every_rank(score, rt), rt)
    return float(np.mean(vals)), len(vals)


def evaluate_samples(samples: str | Path, reference: str, inception: Inception, *,
                     size: int | None = None, limit: int | None = None, batch_size: int = 32,
                     kid_subsets: int = 100, kid_subset_size: int | None = None, is_splits: int = 10,
                     save_stats_to: str | Path | None = None, progress: bool = False,
                     agreement: bool = True, classifier=None,  # noqa: ANN001
                     rt: Runtime | None = None) -> SamplesResult:
    """FID, KID and IS of the images in ``samples`` against ``reference`` (a data source or a
    ``.npz`` statistics file), plus label agreement where sidecars name built-in maps.

    ``rt``: under torchrun each rank reads its share of the images; the features are gathered
    in file order, so every rank computes the one-process numbers (KID's subsets are seeded).
    Only rank 0 writes ``save_stats_to``."""
    paths = list_images(samples)
    if not paths:
        raise EvaluationError(f"{samples}: no images ({', '.join(IMAGE_SUFFIXES)})")
    expect = stats_settings(inception, reference, size, limit)
    ref_is_stats = reference.endswith(".npz") and Path(reference).is_file()
    if ref_is_stats:
        mu_r, sig_r, pool_r, ref_settings = load_stats(reference, expect)
        n_ref = len(pool_r)
    if kid_subset_size is not None and (kid_subset_size > len(paths) or (ref_is_stats and kid_subset_size > n_ref)):
        have = f"{len(paths)} sample file(s)" + (f" and {n_ref} reference images" if ref_is_stats else "")
        raise EvaluationError(f"KID with subsets of {kid_subset_size} needs at least {kid_subset_size} images on "
                              f"each side; {samples} has {have} (lower `kid_subset_size`)")
    gen = folder_features(inception, paths, batch_size, progress, rt)
    n = len(gen.pool)
    if n < 2:
        raise EvaluationError(f"{samples}: FID needs at least 2 readable images (a covariance), got {n}")
    notes: list[str] = []
    if len(gen.sizes) > 1:
        notes.append(f"samples have {len(gen.sizes)} different sizes: each is resized to 299x299 by the "
                     "Inception network (torch-fidelity's TF-bilinear convention)")
    if not ref_is_stats:
        ref = source_features(inception, reference, size, limit, batch_size, progress, rt)
        if len(ref.pool) < 2:
            raise EvaluationError(f"{reference}: FID needs at least 2 reference images, got {len(ref.pool)}")
        mu_r, sig_r = feature_stats(ref.pool)
        pool_r, n_ref = ref.pool, len(ref.pool)
        gen.skipped += [f"reference: {s}" for s in ref.skipped]
        if save_stats_to is not None:
            if rt is None or rt.is_main:
                save_stats(save_stats_to, ref, expect)
            notes.append(f"reference statistics saved to {save_stats_to}")
    m = kid_subset_size if kid_subset_size is not None else min(1000, n, n_ref)
    if m > min(n, n_ref) or m < 2:
        raise EvaluationError(f"KID with subsets of {m} needs at least {max(m, 2)} images on each side; got "
                              f"{n} samples and {n_ref} reference images (lower `kid_subset_size`)")
    splits = min(is_splits, n)
    if splits < is_splits:
        notes.append(f"IS over {splits} splits (only {n} samples)")
    if n < 2048 or n_ref < 2048:
        notes.append(f"FID over {n} samples / {n_ref} reference images: below 2048 the covariance is "
                     "rank-deficient and FID is biased upwards; compare only at equal counts (50k is usual)")
    fid = (frechet_distance_features(gen.pool, pool_r) if n < 2048 and n_ref < 2048
           else frechet_distance(*feature_stats(gen.pool), mu_r, sig_r))
    metrics: dict[str, float] = {"fid": fid}
    metrics["kid_mean"], metrics["kid_std"] = kernel_inception_distance(gen.pool, pool_r, kid_subsets, m)
    metrics["is_mean"], metrics["is_std"] = inception_score(gen.logits, splits)
    metrics["samples"], metrics["reference_images"] = n, n_ref
    if agreement:
        agree, covered = builtin_agreement(samples, gen.names, classifier, rt)
        if agree is not None:
            metrics["label_agreement"] = agree
            metrics["label_agreement_samples"] = covered
    settings = {**expect, "samples": str(samples), "kid_subsets": kid_subsets, "kid_subset_size": m,
                "is_splits": splits, "batch_size": batch_size}
    return SamplesResult(metrics, settings, gen.skipped, notes)
