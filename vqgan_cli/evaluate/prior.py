"""Held-out likelihood of a prior on token shards: NLL in nats and bits per token, next to the
unigram entropy of the same tokens (the loss of the best model that ignores context)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqgan_cli.models.prior import token_nll

DEFINITIONS = {
    "nll_nats": "mean over image tokens of -log p(token | conditioning, previous tokens), teacher forced",
    "bits_per_token": "nll_nats / ln 2",
    "unigram_entropy_nats": "entropy of the empirical distribution of the same target tokens: "
                            "the floor a context-free model reaches",
    "unigram_bits": "unigram_entropy_nats / ln 2",
    "perplexity": "exp(nll_nats)",
}


@dataclass
class PriorResult:
    metrics: dict[str, float]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "definitions": DEFINITIONS, "settings": self.settings,
                "notes": self.notes}


def _tiles(h: int, w: int, crop: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    if crop is None or (crop[0] >= h and crop[1] >= w):
        return [(0, 0, h, w)]
    ch, cw = min(crop[0], h), min(crop[1], w)
    return [(t, l, ch, cw) for t in range(0, h - ch + 1, ch) for l in range(0, w - cw + 1, cw)]


@torch.no_grad()
def evaluate_prior(prior, shards: str | Path, *, limit: int | None = None, batch_size: int = 16,  # noqa: ANN001
                   device: torch.device | str = "cpu", crop: tuple[int, int] | None = None,
                   val_fraction: float | None = None, progress: bool = False) -> PriorResult:
    """Teacher-forced NLL of every sample (original orientation) of the shards in ``shards``.

    Grids larger than the prior's training crop (``prior.config.grid``, or ``crop``) are scored on
    the grid of non-overlapping crops of that size covering them from the top left, each crop read
    as the prior was trained (its own conditioning crop); the rest of the grid is not scored.
    """
    from vqgan_cli.shards.format import TokenShardDataset
    from vqgan_cli.train.prior_data import collate_tokens, cond_input

    dev = torch.device(device)
    prior = prior.to(dev).eval()
    ds = TokenShardDataset(shards, crop=None, shuffle=False, variants="original",
                           with_cond=prior.cond.spatial, split=(0, 1))
    if val_fraction is not None:  # only the samples a run with data.val_fraction held out
        from vqgan_cli.train.prior_data import HeldOutSplit

        ds_all, ds = ds, HeldOutSplit(ds, val_fraction, validation=True)
        ds.vocab_size = ds_all.vocab_size
    vocab = prior.config.gpt.vocab_size
    if ds.vocab_size > vocab:
        from vqgan_cli.shards.format import ShardError

        raise ShardError(f"{shards}: tokens of a codebook of {ds.vocab_size} but the prior reads {vocab}")
    crop = tuple(crop) if crop is not None else (tuple(prior.config.grid) if prior.config.grid else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_tokens, num_workers=0)
    total_nll, n_tok, samples, n_tiles = 0.0, 0, 0, 0
    counts = torch.zeros(vocab, dtype=torch.float64)
    grid = None
    it = loader
    if progress:
        from rich.progress import track

        it = track(loader, description="scoring tokens")
    for batch in it:
        if limit is not None and samples >= limit:
            break
        if limit is not None and samples + len(batch["keys"]) > limit:
            keep = limit - samples
            batch = {k: (v[:keep] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        z_all = batch["tokens"]
        grid = tuple(z_all.shape[1:])
        for top, left, ch, cw in _tiles(*grid, crop):
            sub = dict(batch)
            sub["tokens"] = z_all[:, top:top + ch, left:left + cw]
            if batch.get("cond") is not None:
                sub["cond"] = batch["cond"][:, top:top + ch, left:left + cw]
            c = cond_input(sub, prior.cond).to(dev)
            z = sub["tokens"].to(dev)
            targets = prior.permute(z)
            logits = prior(c, targets)
            total_nll += float(token_nll(logits, targets, reduction="sum"))
            n_tok += targets.numel()
            counts += torch.bincount(targets.reshape(-1).cpu(), minlength=vocab)[:vocab].double()
            n_tiles += z.shape[0]
        samples += z_all.shape[0]
    if n_tok == 0:
        from vqgan_cli.shards.format import ShardError

        raise ShardError(f"{shards}: no token samples to score")
    nll = total_nll / n_tok
    p = counts[counts > 0] / counts.sum()
    uni = float(-(p * p.log()).sum())
    metrics = {"nll_nats": nll, "bits_per_token": nll / math.log(2), "perplexity": math.exp(nll),
               "unigram_entropy_nats": uni, "unigram_bits": uni / math.log(2),
               "samples": samples, "scored_crops": n_tiles, "tokens": n_tok}
    notes = []
    tiles = _tiles(*grid, crop) if grid else []
    if len(tiles) > 1:
        notes.append(f"grids of {grid[0]}x{grid[1]} tokens scored as {len(tiles)} non-overlapping "
                     f"{tiles[0][2]}x{tiles[0][3]} crops (the prior's training crop)")
    settings = {"shards": str(shards), "limit": limit, "val_fraction": val_fraction,
                "batch_size": batch_size, "device": str(dev),
                "crop": list(crop) if crop else None, "grid": list(grid) if grid else None,
                "variants": "original (no flips)", "cond_kind": prior.cond.kind}
    return PriorResult(metrics, settings, notes)
