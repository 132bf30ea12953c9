"""Tokenizer evaluation over a data source: L1, PSNR, SSIM, LPIPS, codebook usage/perplexity, rFID.

The per-image numbers come from :func:`vqgan_cli.metrics.batch_metrics`, the one implementation
that training validation (:func:`vqgan_cli.train.validation.validate`) uses too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vqgan_cli.evaluate.split import (
    FirstItems,
    collate_indexed,
    gather_arrays,
    gather_objects,
    on_every_rank,
    padded,
    share_dataset,
    single_process,
)
from vqgan_cli.metrics import (
    batch_metrics,
    code_counts,
    codebook_perplexity,
    codebook_usage,
    frechet_distance_features,
)
from vqgan_cli.runtime import Runtime, autocast, gather_rows

DEFINITIONS = {
    "l1": "mean |x - x_hat| over pixels and channels, model space [-1, 1] (decoder output unclamped)",
    "psnr": "10 log10(1 / MSE) dB per image, both clamped to [-1, 1] and mapped to [0, 1]; mean over images",
    "ssim": "SSIM per image (Gaussian 11x11, data range 1) in [0, 1] space; mean over images",
    "lpips": "LPIPS (VGG16, v0.1 heads) per image; mean over images; lower is closer",
    "accuracy": "segmentation: share of pixels whose argmax label is reconstructed",
    "bce": "segmentation: binary cross-entropy of the one-hot input and the decoded logits",
    "codebook_usage": "share of the codebook's codes that occur at least once over the whole set",
    "codebook_perplexity": "exp(entropy of code frequencies over the whole set): effective codes in use",
    "rfid": "FID (Inception pool3, 2048-d) of the inputs vs their reconstructions, as uint8 images "
            "resized to 299 by torch-fidelity's network",
}


@dataclass
class TokenizerResult:
    """What :func:`evaluate_tokenizer` measured: means, set-level numbers and per-image rows."""

    metrics: dict[str, float]
    per_image: list[dict[str, Any]]
    code_counts: np.ndarray
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics,
                "definitions": {k: DEFINITIONS[k] for k in self.metrics if k in DEFINITIONS},
                "settings": self.settings, "skipped": self.skipped, "notes": self.notes}


def evaluation_dataset(source: str, size: int, modality: str, n_labels: int | None,
                       limit: int | None, bad_files: str = "skip", root: str | None = None):  # noqa: ANN201
    """Centre crops of ``size`` (smaller side resized to ``size`` first) of every item of a stage-one
    source; ``builtin:landscapes`` gives the held-out validation scenes. ``limit``: the first N."""
    from vqgan_cli.data.config import DataConfig
    from vqgan_cli.data.dataset import build_dataset

    cfg = DataConfig(train=source, val=source, root=root, size=size, workers=0, bad_files=bad_files,
                     val_count=limit if limit is not None else 64)
    ds = build_dataset(cfg, "val", modality, n_labels)
    if limit is not None and isinstance(ds, torch.utils.data.IterableDataset):  # webdataset shards
        return FirstItems(ds, limit)
    if limit is not None and len(ds) > limit:
        ds = torch.utils.data.Subset(ds, range(limit))
    return ds


def evaluate_tokenizer(model, source: str, size: int = 256, limit: int | None = None,  # noqa: ANN001
                       batch_size: int = 8, device: torch.device | str = "cpu",
                       precision: str = "fp32", perceptual: torch.nn.Module | None = None,
                       inception=None, progress: bool = False, root: str | None = None,  # noqa: ANN001
                       rt: Runtime | None = None) -> TokenizerResult:
    """Reconstruct every image of ``source`` through ``model`` and measure it.

    ``inception``: an :class:`~vqgan_cli.evaluate.inception.Inception` for rFID (None: skipped).
    ``precision`` (resolved: fp32 or bf16): the tokenizer's autocast; metrics are fp32.
    ``rt``: under torchrun each rank reconstructs its share of the items; rows, code counts and
    Inception features are gathered in item order, so every rank returns the one-process numbers.
    """
    dev = torch.device(device)
    rt = rt or single_process(dev)
    model = model.to(dev).eval()
    modality = model.config.modality
    n_labels = getattr(model.config, "n_labels", None)
    ds = share_dataset(evaluation_dataset(source, size, modality, n_labels, limit, root=root), rt)
    part = on_every_rank(lambda: _measure(model, ds, batch_size, precision, perceptual, inception, progress), rt)
    rows = gather_objects(part.index, part.rows, rt)
    skipped = gather_objects(part.skipped_index, part.skipped, rt)
    counts = gather_rows(part.counts[None].to(rt.device), rt).sum(0).cpu() if rt.distributed else part.counts
    fx, fy = gather_arrays(part.index if part.feats_x is not None else [], _or_empty(part.feats_x, part.feats_y), rt)
    if not rows:
        from vqgan_cli.data import DataError

        raise DataError(f"{source}: no readable image to evaluate" + (f" ({len(skipped)} skipped)" if skipped else ""))
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("key", "codes_used")}
    metrics["codebook_usage"] = codebook_usage(counts)
    metrics["codebook_perplexity"] = codebook_perplexity(counts)
    notes = []
    if inception is not None and modality == "image":
        if len(fx) < 2:
            from vqgan_cli.evaluate.inception import EvaluationError

            raise EvaluationError(f"rFID needs at least 2 images (a covariance), got {len(fx)}; "
                                  "raise `limit` or pass `no_fid`")
        metrics["rfid"] = frechet_distance_features(fx, fy)
        if len(fx) < 2048:
            notes.append(f"rFID over {len(fx)} images: below 2048 (the feature dimension) the covariance is "
                         "rank-deficient and FID is biased upwards; compare only at equal image counts")
    elif modality == "image":
        notes.append("rFID skipped (no Inception network)")
    if perceptual is None and modality == "image":
        notes.append("LPIPS skipped (VGG16 weights not given or not found)")
    metrics["images"] = len(rows)
    settings = {"source": source, "root": root, "size": size, "limit": limit, "batch_size": batch_size,
                "device": str(dev), "precision": precision, "modality": modality,
                "n_embed": model.config.quantizer.n_embed, "crop": "smaller side resized to size, centre crop"}
    return TokenizerResult(metrics, rows, counts.numpy(), skipped, notes, settings)


@dataclass
class _Part:
    """What one rank measured of its share, in the order it read the items."""

    index: list[int]
    rows: list[dict[str, Any]]
    counts: torch.Tensor
    skipped_index: list[int]
    skipped: list[str]
    feats_x: np.ndarray | None  # Inception pool features of the inputs (None: no rFID)
    feats_y: np.ndarray | None  # ... and of the reconstructions


def _or_empty(fx: np.ndarray | None, fy: np.ndarray | None) -> list[np.ndarray]:
    empty = np.zeros((0, 2048))
    return [empty if fx is None else fx, empty if fy is None else fy]


def _measure(model, ds: torch.utils.data.Dataset, batch_size: int, precision: str,  # noqa: ANN001
             perceptual: torch.nn.Module | None, inception, progress: bool) -> _Part:  # noqa: ANN001
    """Reconstruct and measure the items of ``ds`` (this rank's share)."""
    from vqgan_cli.data.dataset import model_input

    dev = next(model.parameters()).device
    modality = model.config.modality
    n_labels = getattr(model.config, "n_labels", None)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_indexed, num_workers=0)
    counts = torch.zeros(model.n_tokens, dtype=torch.long)  # token ids: the remapped range if any
    part = _Part([], [], counts, [], [], None, None)
    feats_x: list[np.ndarray] = []
    feats_y: list[np.ndarray] = []
    amp = autocast(dev, precision)
    it: Iterable = loader
    if progress:
        from rich.progress import track

        total = math.ceil(len(ds) / batch_size) if hasattr(ds, "__len__") else None
        it = track(loader, description="evaluating", total=total)
    with torch.no_grad():
        for batch in it:
            part.skipped += batch["skipped"]
            part.skipped_index += batch["skipped_index"]
            if not batch["key"]:
                continue
            x = padded(model_input(batch, modality, n_labels).to(dev), batch_size)
            n = len(batch["key"])
            with amp:
                out = model(x)
            idx = out.indices[:n].cpu()
            part.counts += code_counts(idx, part.counts.numel())
            vals = {k: v[:n] for k, v in batch_metrics(x, out.x_hat, modality, perceptual).items()}
            for i, key in enumerate(batch["key"]):
                part.rows.append({"key": key, **{k: float(v[i]) for k, v in vals.items()},
                                  "codes_used": int(idx[i].unique().numel())})
            part.index += batch["index"]
            if inception is not None and modality == "image":
                from vqgan_cli.evaluate.inception import to_uint8_batch

                feats_x.append(inception.features(to_uint8_batch(x))[0][:n])
                feats_y.append(inception.features(to_uint8_batch(out.x_hat.float()))[0][:n])
    if inception is not None and modality == "image":
        part.feats_x, part.feats_y = (np.concatenate(f) if f else np.zeros((0, 2048)) for f in (feats_x, feats_y))
    return part
