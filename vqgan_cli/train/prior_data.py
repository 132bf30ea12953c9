"""Stage-two data: token shards checked against the recipe, split into train/val, batched.

Everything the prior's shape depends on (vocabulary, grid, conditioning vocabulary, classes)
comes from the shard folder's manifest, never from the recipe; the recipe only names the
folder, optionally the tokenizer the shards must have been made with, and a crop.
:func:`resolve_data` checks it all before training and reports every problem at once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch.utils.data import IterableDataset

from vqgan_cli.config import ConfigError, spec
from vqgan_cli.models.config import TokenizerConfig
from vqgan_cli.models.prior import CondConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.shards.format import VARIANTS, ShardError, TokenManifest, TokenShardDataset, read_manifest

RECIPE_CONDS = ("unconditional", "class", "spatial")


@dataclass
class ShardDataConfig:
    """Where the token shards are and how the prior reads them."""

    shards: str = spec("", help="token shard folder written by `vqgan encode-dataset` (manifest.json)")
    val: str | None = spec(None, help="shard folder for validation; None: hold out val_fraction of shards")
    val_fraction: float = spec(0.05, ge=0.0, lt=1.0,
                               help="share of samples held out for validation (by a hash of the key)")
    tokenizer: str | None = spec(None, help="the image tokenizer the shards must come from (its "
                                            "weights hash must match the manifest's)")
    tokenizer_sha256: str | None = spec(None, help="expected tokenizer weights hash, instead of a path")
    crop: tuple[int, ...] | None = spec(None, help="(h, w) token window for sliding-window training; "
                                                    "None: whole grids")
    variants: str = spec("random", choices=VARIANTS, help="flip copies: random (one per sample "
                                                          "and epoch) | all | original")
    shuffle_buffer: int = spec(1024, ge=1, help="samples shuffled in memory while streaming")
    workers: int | Literal["auto"] = spec("auto", ge=0, help="DataLoader worker processes; auto: the "
                                          "usable cores less one, at most 8 (runtime.resolve_workers)")
    verify: str = spec("first", choices=("first", "never"),
                       help="first: check each shard against the manifest's sha256 when a reader first "
                            "opens it in a run (an altered shard stops the run) | never")

    def check(self) -> list[str]:
        problems = []
        if not self.shards:
            problems.append("shards: required (a folder written by `vqgan encode-dataset`)")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            problems.append(f"crop: expected [h, w] with positive sides, got {list(self.crop)}")
        if self.val is None and self.val_fraction == 0:
            problems.append("val_fraction: must be > 0 when no val folder is given")
        return problems


class PriorData(NamedTuple):
    """What the shards say the prior must look like, and where the data lies."""

    manifest: TokenManifest
    val_manifest: TokenManifest | None  # None: validation is held out of ``manifest``
    grid: tuple[int, int]  # the training window: crop or whole grid
    crop: tuple[int, int] | None  # None: whole grids
    cond: CondConfig
    vocab_size: int
    image_vocab: int
    cond_tokenizer: VQGAN | None  # spatial conditioning through a VQGAN: its loaded weights
    info: dict  # recorded in the checkpoint: which tokenizer(s) and shards


def _manifest(path: str, field: str, problems: list[str]) -> TokenManifest | None:
    try:
        m = read_manifest(path)
    except ShardError as e:
        problems.append(f"{field}: {e}")
        return None
    if m.num_samples == 0:
        problems.append(f"{field}: {path} holds no samples (every input was skipped?)")
    for p in m.shard_paths():
        if not p.is_file():
            problems.append(f"{field}: shard {p} listed in the manifest is missing")
    return m


def _tokenizer_hash(path: str) -> str:
    from vqgan_cli.checkpoints.format import weights_sha256
    from vqgan_cli.checkpoints.load import load_tokenizer

    return weights_sha256(load_tokenizer(path).state_dict())


def _check_tokenizer(cfg: ShardDataConfig, m: TokenManifest, problems: list[str]) -> dict:
    """The tokenizer record for the checkpoint; problems when the shards are someone else's."""
    tok = m.raw.get("tokenizer", {})
    have = tok.get("weights_sha256")
    if cfg.tokenizer_sha256 is not None and cfg.tokenizer_sha256 != have:
        problems.append(f"data.tokenizer_sha256: the shards in {cfg.shards} were encoded by a tokenizer "
                        f"with weights sha256 {have}, not {cfg.tokenizer_sha256}")
    path = tok.get("path")
    if cfg.tokenizer is not None:
        path = cfg.tokenizer
        if not Path(path).is_file():
            problems.append(f"data.tokenizer: file not found: {path}")
        else:
            mine = _tokenizer_hash(path)
            if mine != have:
                problems.append(f"data.tokenizer: {path} (weights sha256 {mine[:12]}...) did not make the "
                                f"shards in {cfg.shards} (encoded by {tok.get('path')}, "
                                f"{str(have)[:12]}...); "
                                "re-encode them with this tokenizer or name the right one")
    if path is not None and Path(path).is_file():
        path = str(Path(path).resolve())
    return {"tokenizer": path, "tokenizer_sha256": have, "tokenizer_factor": tok.get("factor")}


def _cond_config(kind: str, m: TokenManifest, sos_token: int, problems: list[str],
                 image_tokenizer: str | None) -> tuple[CondConfig, int, VQGAN | None, dict]:
    """(cond config, its vocabulary, conditioning VQGAN, record) for the recipe's kind."""
    if kind == "unconditional":
        return CondConfig(kind="sos", sos_token=sos_token), sos_token + 1, None, {}
    if kind == "class":
        if m.n_classes is None:
            problems.append(f"model.cond: class conditioning asked for, but {m.root} has no class labels "
                            "(encode with `labels`)")
            return CondConfig(), 0, None, {}
        return CondConfig(kind="class", n_classes=m.n_classes), m.n_classes, None, {}
    desc = m.raw.get("cond")
    if not desc:
        problems.append(f"model.cond: spatial conditioning asked for, but {m.root} has no conditioning "
                        "tokens (encode with `cond`)")
        return CondConfig(), 0, None, {}
    vocab, stored = int(desc["vocab_size"]), str(desc.get("kind"))
    if stored == "labels":
        factor = m.raw.get("tokenizer", {}).get("factor")
        if factor is None:
            problems.append(f"data.shards: {m.root}/manifest.json does not give the tokenizer's factor")
            return CondConfig(), vocab, None, {}
        return CondConfig(kind="labels", n_labels=vocab, label_factor=factor, key="seg"), vocab, None, {}
    tok_desc = desc.get("tokenizer") or {}
    path = tok_desc.get("path") or image_tokenizer  # lowres without --cond-tokenizer: the image one
    lowres = int(stored.split(":", 1)[1]) if stored.startswith("lowres:") else None
    want = tok_desc.get("weights_sha256") or m.raw.get("tokenizer", {}).get("weights_sha256")
    if path is None or not Path(path).is_file():
        problems.append(f"data.shards: the conditioning tokenizer {path} recorded in {m.root} is missing; "
                        "the prior embeds it to encode new maps at sampling time")
        return CondConfig(), vocab, None, {}
    from vqgan_cli.checkpoints.format import weights_sha256
    from vqgan_cli.checkpoints.load import load_tokenizer

    model = load_tokenizer(path)
    if weights_sha256(model.state_dict()) != want:
        problems.append(f"data.shards: conditioning tokenizer {path} has changed since the shards "
                        "were encoded")
    cfg: TokenizerConfig = model.config
    key = {"segmentation": "seg", "depth": "depth"}.get(cfg.modality, "image")
    cond = CondConfig(kind="spatial", tokenizer=cfg, lowres_factor=lowres, key=key)
    return cond, vocab, model, {"cond_tokenizer": str(Path(path).resolve()), "cond_tokenizer_sha256": want}


def _same_shards(a: TokenManifest, b: TokenManifest, problems: list[str]) -> None:
    for what, x, y in (("tokenizer", a.raw.get("tokenizer", {}).get("weights_sha256"),
                        b.raw.get("tokenizer", {}).get("weights_sha256")),
                       ("vocabulary", a.n_embed, b.n_embed), ("grid", a.grid, b.grid),
                       ("conditioning", (a.raw.get("cond") or {}).get("kind"),
                        (b.raw.get("cond") or {}).get("kind")),
                       ("conditioning vocabulary", a.cond_vocab, b.cond_vocab),
                       ("classes", a.labels, b.labels)):
        if x != y:
            problems.append(f"data.val: {what} differs from the training shards ({y!r} vs {x!r})")


def resolve_data(cfg: ShardDataConfig, cond_kind: str, sos_token: int = 0, cond_dropout: float = 0.0,
                 batch_size: int = 1) -> PriorData:
    """Check the shard folder(s) against the recipe; ConfigError listing every problem."""
    problems: list[str] = []
    m = _manifest(cfg.shards, "data.shards", problems)
    if m is None:
        raise ConfigError(problems)
    vm = _manifest(cfg.val, "data.val", problems) if cfg.val else None
    if vm is not None:
        _same_shards(m, vm, problems)
    info = _check_tokenizer(cfg, m, problems)
    info["shards"] = str(Path(cfg.shards).resolve())
    # what validation saw, so a reader of the prior can score the same held-out samples
    info["held_out"] = ({"val": str(Path(cfg.val).resolve())} if cfg.val else
                        {"val_fraction": cfg.val_fraction,
                         "rule": "int.from_bytes(sha256(key)[:8], 'little') / 2**64 < val_fraction"})
    crop = tuple(cfg.crop) if cfg.crop is not None else None
    grid: tuple[int, int] = (1, 1)
    if m.grid is None and crop is None:
        problems.append(f"data.crop: the grids in {cfg.shards} vary in size (`keep_aspect`); set a crop")
    elif crop is not None and m.grid is not None and (crop[0] > m.grid[0] or crop[1] > m.grid[1]):
        problems.append(f"data.crop: {list(crop)} is larger than the token grid {list(m.grid)} "
                        f"of {cfg.shards}")
    else:
        grid = crop if crop is not None else m.grid  # type: ignore[assignment]
        if crop is not None and m.grid is not None and tuple(crop) == tuple(m.grid):
            crop = None  # whole grids fit: no cropping
    cond, cond_vocab, cond_tok, cond_info = _cond_config(cond_kind, m, sos_token, problems, info["tokenizer"])
    info.update(cond_info)
    vocab = max(m.n_embed, cond_vocab)
    if cond_dropout > 0:
        if cond_kind == "unconditional":
            problems.append("model.cond_dropout: needs conditioning (model.cond class or spatial)")
        cond.null_token = vocab  # one extra embedding row, used by nothing else
        vocab += 1
    n_train = m.num_samples * (1 - (cfg.val_fraction if vm is None else 0.0))
    if m.num_samples and n_train < batch_size:
        problems.append(f"train.batch_size: {batch_size} per process exceeds the ~{math.floor(n_train)} "
                        f"training samples in {cfg.shards}")
    if problems:
        raise ConfigError(problems)
    return PriorData(m, vm, tuple(grid), crop, cond, vocab, m.n_embed, cond_tok, info)  # type: ignore[arg-type]


def is_held_out(key: str, fraction: float) -> bool:
    """Whether a sample belongs to validation: a hash of its key, so flip copies, shard layout
    and process count never move a sample between the splits."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2.0 ** 64 < fraction


class HeldOutSplit(IterableDataset):
    """The train or the validation part of a shard stream, split by :func:`is_held_out`."""

    def __init__(self, inner: TokenShardDataset, fraction: float, validation: bool):
        super().__init__()
        self.inner, self.fraction, self.validation = inner, fraction, validation

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):  # noqa: ANN204
        for item in self.inner:
            if is_held_out(item["key"], self.fraction) == self.validation:
                yield item


def build_split(data: PriorData, cfg: ShardDataConfig, validation: bool, seed: int,
                with_cond: bool) -> IterableDataset:
    """The training stream (shuffled, random crops, split across ranks and workers) or the
    validation stream (fixed order and crops, read whole by the process that validates)."""
    if validation and data.val_manifest is not None:
        return TokenShardDataset(cfg.val, crop=data.crop, shuffle=False, seed=seed, variants="original",  # type: ignore[arg-type]
                                 with_cond=with_cond, split=(0, 1), verify=cfg.verify == "first")
    ds = TokenShardDataset(cfg.shards, crop=data.crop, shuffle=not validation, seed=seed,
                           buffer_size=cfg.shuffle_buffer,
                           variants="original" if validation else cfg.variants, with_cond=with_cond,
                           split=(0, 1) if validation else None, verify=cfg.verify == "first")
    if data.val_manifest is None:
        return HeldOutSplit(ds, cfg.val_fraction, validation)
    return ds


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples; a ShardError names the sample whose grid or fields differ from the rest."""
    first = items[0]
    for it in items[1:]:
        if it["tokens"].shape != first["tokens"].shape:
            raise ShardError(f"sample {it['key']}: token grid {tuple(it['tokens'].shape)} differs from "
                             f"{tuple(first['tokens'].shape)}; set data.crop for shards of varying grids")
    out: dict[str, Any] = {"keys": [it["key"] for it in items],
                           "tokens": torch.stack([it["tokens"] for it in items])}
    if any("cond" in it for it in items):
        missing = [it["key"] for it in items if "cond" not in it]
        if missing:
            raise ShardError(f"sample {missing[0]}: no conditioning tokens")
        out["cond"] = torch.stack([it["cond"] for it in items])
    if any("label" in it for it in items):
        out["label"] = torch.tensor([it.get("label", -1) for it in items], dtype=torch.long)
    return out


def check_batch(batch: dict[str, Any], grid: tuple[int, int], image_vocab: int, vocab: int) -> None:
    """Refuse samples that contradict the manifest (grid, codebook) before they reach the GPT,
    where they would fail with an index error or, worse, train on a wrong shape."""
    tokens = batch["tokens"]
    if tuple(tokens.shape[1:]) != tuple(grid):
        raise ShardError(f"samples {batch['keys'][:4]}: token grid {tuple(tokens.shape[1:])}, but the "
                         f"manifest says {tuple(grid)}")
    if int(tokens.max()) >= image_vocab or int(tokens.min()) < 0:
        raise ShardError(f"samples {batch['keys'][:4]}: token {int(tokens.max())} outside the manifest's "
                         f"codebook of {image_vocab}")
    cond = batch.get("cond")
    if cond is not None and (int(cond.max()) >= vocab or int(cond.min()) < 0):
        raise ShardError(f"samples {batch['keys'][:4]}: conditioning token {int(cond.max())} outside the "
                         f"vocabulary of {vocab}")


def cond_input(batch: dict[str, Any], cond: CondConfig) -> torch.Tensor:
    """Conditioning tokens (B, Lc) of a collated batch: start token, label or raster cond grid."""
    b = batch["tokens"].shape[0]
    if cond.kind == "sos":
        return torch.full((b, 1), cond.sos_token, dtype=torch.long)
    if cond.kind == "class":
        labels = batch.get("label")
        if labels is None or (labels < 0).any():
            raise ShardError(f"a sample in {batch['keys'][:4]} has no class label")
        return labels.view(b, 1)
    if batch.get("cond") is None:
        raise ShardError(f"samples {batch['keys'][:4]} have no conditioning tokens")
    return batch["cond"].reshape(b, -1)


def unigram_entropy(tokens: list[torch.Tensor], vocab: int) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of the best model that
    ignores context, which a prior must beat to have learnt anything."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for t in tokens:
        counts += torch.bincount(t.reshape(-1).cpu(), minlength=vocab)[:vocab].double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())

