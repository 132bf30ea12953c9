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

from vqgan_cli.metrics import (
    batch_metrics,
    code_counts,
    codebook_perplexity,
    codebook_usage,
    frechet_distance_features,
)
from vqgan_cli.runtime import autocast

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
        return _First(ds, limit)
    if limit is not None and len(ds) > limit:
        ds = torch.utils.data.Subset(ds, range(limit))
    return ds


class _First(torch.utils.data.IterableDataset):
    """The first ``n`` items of a streamed dataset."""

    def __init__(self, inner: torch.utils.data.IterableDataset, n: int):
        super().__init__()
        self.inner, self.n = inner, n

    def __iter__(self):  # noqa: ANN204
        for i, item in enumerate(self.inner):
            if i >= self.n:
                return
            yield item


def evaluate_tokenizer(model, source: str, size: int = 256, limit: int | None = None,  # noqa: ANN001, C901
                       batch_size: int = 8, device: torch.device | str = "cpu",
                       precision: str = "fp32", perceptual: torch.nn.Module | None = None,
                       inception=None, progress: bool = False, root: str | None = None) -> TokenizerResult:  # noqa: ANN001
    """Reconstruct every image of ``source`` through ``model`` and measure it.

    ``inception``: an :class:`~vqgan_cli.evaluate.inception.Inception` for rFID (None: skipped).
    ``precision`` (resolved: fp32 or bf16): the tokenizer's autocast; metrics are fp32.
    """
    from vqgan_cli.data.dataset import collate, model_input

    dev = torch.device(device)
    model = model.to(dev).eval()
    modality = model.config.modality
    n_labels = getattr(model.config, "n_labels", None)
    ds = evaluation_dataset(source, size, modality, n_labels, limit, root=root)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=0)
    n_embed = model.config.quantizer.n_embed
    counts = torch.zeros(model.n_tokens, dtype=torch.long)  # token ids: the remapped range if any
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
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
            skipped += batch["skipped"]
            if not batch["key"]:
                continue
            x = model_input(batch, modality, n_labels).to(dev)
            with amp:
                out = model(x)
            idx = out.indices.cpu()
            counts += code_counts(idx, counts.numel())
            vals = batch_metrics(x, out.x_hat, modality, perceptual)
            for i, key in enumerate(batch["key"]):
                row = {"key": key, **{k: float(v[i]) for k, v in vals.items()},
                       "codes_used": int(idx[i].unique().numel())}
                rows.append(row)
            if inception is not None and modality == "image":
                from vqgan_cli.evaluate.inception import to_uint8_batch

                feats_x.append(inception.features(to_uint8_batch(x))[0])
                feats_y.append(inception.features(to_uint8_batch(out.x_hat.float()))[0])
    if not rows:
        from vqgan_cli.data import DataError

        raise DataError(f"{source}: no readable image to evaluate" + (f" ({len(skipped)} skipped)" if skipped else ""))
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("key", "codes_used")}
    metrics["codebook_usage"] = codebook_usage(counts)
    metrics["codebook_perplexity"] = codebook_perplexity(counts)
    notes = []
    if feats_x:
        fx, fy = np.concatenate(feats_x), np.concatenate(feats_y)
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
                "device": str(dev), "precision": precision, "modality": modality, "n_embed": n_embed,
                "crop": "smaller side resized to size, centre crop"}
    return TokenizerResult(metrics, rows, counts.numpy(), skipped, notes, settings)
