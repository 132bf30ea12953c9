"""The one place tests build tiny models, checkpoints, token shards and training recipes.

In the spirit of diffusers' ``get_init_dict``: each builder has small defaults that any keyword
overrides, and all randomness comes from an explicit seed. Weights are drawn under a forked
global RNG seeded with ``seed`` (the modules draw their init from it), so a builder neither
consumes nor depends on the state a test left behind: the same arguments give the same weights.
A test whose numbers depend on a size passes that size here rather than relying on a default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vqgan_cli.checkpoints.format import weights_sha256
from vqgan_cli.checkpoints.load import save_prior, save_tokenizer
from vqgan_cli.models.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqgan_cli.models.gpt import GPT, GPTConfig
from vqgan_cli.models.prior import CondConfig, Prior, PriorConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.shards.format import MANIFEST, MANIFEST_FORMAT, ShardWriter, TokenSample, shard_name, token_dtype

SHA = "ab" * 32  # the tokenizer hash written into manifests of shards no real tokenizer made


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw module inits from ``seed`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---- tokenizers ----------------------------------------------------------------------------------

def tokenizer_config(*, resolution: int = 16, ch_mult: tuple[int, ...] = (1, 2),
                     attn_resolutions: tuple[int, ...] = (8,), z_channels: int = 8, ch: int = 32,
                     n_embed: int = 16, embed_dim: int = 8, kind: str = "vq", modality: str = "image",
                     n_labels: int | None = None, norm: str = "group", **quantizer) -> TokenizerConfig:
    """A 32-channel, one-block-per-level tokenizer: f = 2 ** (len(ch_mult) - 1); 3 channels for
    images, 1 for depth, ``n_labels`` one-hot channels for segmentation."""
    channels = n_labels if modality == "segmentation" else (1 if modality == "depth" else 3)
    ae = AutoencoderConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=1, attn_resolutions=tuple(attn_resolutions),
                           in_channels=channels, out_channels=channels, resolution=resolution,
                           z_channels=z_channels, norm=norm)
    qc = QuantizerConfig(kind=kind, n_embed=n_embed, embed_dim=embed_dim, **quantizer)
    return TokenizerConfig(modality=modality, n_labels=n_labels if modality == "segmentation" else None,
                           autoencoder=ae, quantizer=qc)


def tokenizer(config: TokenizerConfig | None = None, *, seed: int = 0, spread: bool = False,
              **config_kw) -> VQGAN:
    """A tiny VQGAN in eval mode. ``spread``: a codebook drawn from N(0, 1), spread like a trained
    one so that many codes get used (the default init maps nearly every position to one code)."""
    config = config if config is not None else tokenizer_config(**config_kw)
    with seeded(seed):
        model = VQGAN(config)
        if spread:
            q = model.quantize
            book = q.embedding if config.quantizer.kind == "vq" else q.embed
            with torch.no_grad():
                book.weight.normal_()
    return model.eval()


def saved_tokenizer(path: Path, model: VQGAN | None = None, **kw) -> Path:
    """``model`` (or ``tokenizer(**kw)``) saved in our format at ``path``."""
    return save_tokenizer(path, model if model is not None else tokenizer(**kw))


# ---- GPTs and priors -----------------------------------------------------------------------------

def gpt_config(*, vocab_size: int = 16, block_size: int = 16, n_layer: int = 1, n_head: int = 2,
               n_embd: int = 32, **kw) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, **kw)


def gpt(*, seed: int = 0, spread: float | None = None, **kw) -> GPT:
    """A tiny GPT in eval mode (``gpt_config``'s keywords). ``spread``: every weight drawn from
    N(0, spread), larger than the 0.02 init, so that next-token distributions are far from uniform."""
    with seeded(seed):
        model = GPT(gpt_config(**kw))
        if spread is not None:
            _spread(model, spread)
    return model.eval()


def _spread(model: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)


def cond_config(kind: str = "sos", **kw) -> CondConfig:
    """Conditioning with small defaults per kind: sos token 0, 5 classes, 8 labels at f = 2, and
    super-resolution (``lowres``: spatial, the image's own tokenizer, degraded 2x)."""
    defaults = {"sos": {"kind": "sos"}, "class": {"kind": "class", "n_classes": 5},
                "labels": {"kind": "labels", "n_labels": 8, "label_factor": 2},
                "lowres": {"kind": "spatial", "lowres_factor": 2}}[kind]
    if kind == "lowres" and "tokenizer" not in kw:
        kw["tokenizer"] = tokenizer_config()
    return CondConfig(**{**defaults, **kw})


def n_cond_tokens(cond: CondConfig, grid: tuple[int, int]) -> int:
    """Conditioning tokens before the image: one for sos/class, one per grid cell for a map."""
    return grid[0] * grid[1] if cond.spatial else 1


def prior_config(cond: str | CondConfig = "sos", *, grid: tuple[int, int] = (4, 4), vocab_size: int = 16,
                 block_size: int | None = None, n_layer: int = 1, n_head: int = 2, n_embd: int = 32,
                 **kw) -> PriorConfig:
    """A prior over a ``grid`` of tokens; the block fits the conditioning plus the grid unless given."""
    cond = cond_config(cond) if isinstance(cond, str) else cond
    block = block_size if block_size is not None else n_cond_tokens(cond, grid) + grid[0] * grid[1] - 1
    g = gpt_config(vocab_size=vocab_size, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return PriorConfig(gpt=g, cond=cond, grid=tuple(grid), **kw)


def prior(cond: str | CondConfig = "sos", *, seed: int = 0, spread: float | None = None, **kw) -> Prior:
    """A tiny prior in eval mode (``prior_config``'s keywords); ``spread`` as for ``gpt``."""
    config = prior_config(cond, **kw)
    with seeded(seed):
        model = Prior(config)
        if spread is not None:
            _spread(model.gpt, spread)
    return model.eval()


def saved_prior(path: Path, model: Prior, tokenizer_model: VQGAN | None = None,
                tokenizer_path: str = "tok.safetensors") -> Path:
    """``model`` saved at ``path``; with ``tokenizer_model``, its info names that tokenizer
    (``tokenizer_path``, relative to the prior's folder unless absolute) and its weights' hash."""
    info = None
    if tokenizer_model is not None:
        info = {"tokenizer": tokenizer_path, "tokenizer_sha256": weights_sha256(tokenizer_model.state_dict())}
    return save_prior(path, model, info)


def demo_checkpoints(d: Path) -> dict[str, Path]:
    """What the demo page is tried with: a pixel-norm f4 tokenizer (16 codes, 16 px crops, as the
    quickstart's norm) ``tok``, and priors over its 4x4 grids that name it: ``labels`` (8 landscape
    labels), ``class`` (5 classes), ``sos`` and ``sr`` (lowres:2)."""
    d.mkdir(parents=True, exist_ok=True)
    tok_cfg = demo_tokenizer_config()
    tok = tokenizer(tok_cfg)
    paths = {"tok": saved_tokenizer(d / "tok.safetensors", tok)}
    conds = {"labels": cond_config("labels", label_factor=4), "class": cond_config("class"),
             "sos": cond_config("sos"), "sr": cond_config("lowres", tokenizer=tok_cfg)}
    for i, (name, cond) in enumerate(conds.items()):
        model = prior(cond, seed=2 + i, spread=0.3, image_vocab=16)
        paths[name] = saved_prior(d / f"{name}.safetensors", model, tok)
    return paths


def demo_tokenizer_config() -> TokenizerConfig:
    return tokenizer_config(ch_mult=(1, 2, 2), attn_resolutions=(), norm="pixel")


# ---- token shards --------------------------------------------------------------------------------

def token_shards(root: Path, n: int = 48, grid: tuple[int, int] = (4, 4), n_embed: int = 32,
                 cond_vocab: int | None = 6, classes: int | None = None, per_shard: int = 16,
                 sha: str = SHA, seed: int = 0) -> Path:
    """A complete shard folder as encode-dataset leaves it. Image tokens depend on the
    conditioning grid (token = 5 * cond + noise) so there is something to learn; cond grids
    carry their position in their top row so crops can be checked for alignment."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        cond = rng.integers(0, cond_vocab or 6, grid)
        tokens = (5 * cond + rng.integers(0, 2, grid)) % n_embed
        samples.append(TokenSample(f"img-{i:04d}", tokens.astype(token_dtype(n_embed)),
                                   cond.astype(token_dtype(cond_vocab)) if cond_vocab else None,
                                   i % classes if classes else None))
    entries = write_shards(root, samples, per_shard)
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "complete": True,
                "tokenizer": {"path": "tok.safetensors", "weights_sha256": sha, "n_embed": n_embed,
                              "factor": 8},
                "cond": ({"kind": "labels", "vocab_size": cond_vocab, "dtype": token_dtype(cond_vocab).name,
                          "n_labels": cond_vocab, "tokenizer": None} if cond_vocab else None),
                "grid": list(grid),
                "labels": ({"names": [f"c{i}" for i in range(classes)]} if classes else None),
                "identity": {"flip_copies": False}, "shards": entries, "n_shards": len(entries)}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def shard_hashes(root: Path) -> dict[str, str]:
    """Each shard's sha256 as the manifest records it."""
    return {e["name"]: e["sha256"] for e in json.loads((root / MANIFEST).read_text())["shards"]}


# ---- training recipes ----------------------------------------------------------------------------

TOKENIZER_RECIPE = {  # 16 px landscapes, f = 2, 4 steps of batch 4: checkpoints and validation at 2 and 4
    "model": {"autoencoder": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                              "z_channels": 8, "resolution": 16},
              "quantizer": {"n_embed": 16, "embed_dim": 8, "restart_dead": True, "dead_after": 2}},
    "loss": {"perceptual_weight": 0.0, "disc_start": 2, "disc_ndf": 8, "disc_num_layers": 2},
    "data": {"train": "builtin:landscapes", "size": 16, "workers": 0, "val_count": 8, "flip": True},
    "train": {"batch_size": 4, "max_steps": 4, "base_lr": 1e-4, "ckpt_every": 2, "keep_last": 2,
              "log_every": 1, "image_every": 2, "val_every": 2, "val_batches": 1,
              "precision": "fp32"},  # the same numbers on every CPU (auto would pick bf16 on some)
}

PRIOR_RECIPE = {  # spatial conditioning over ``token_shards``, 4 steps of batch 4
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "cond": "spatial", "pkeep": 0.9},
    "data": {"val_fraction": 0.2, "shuffle_buffer": 8, "workers": 0},  # in-process: fast and deterministic
    "optim": {"warmup_steps": 2, "schedule": "cosine"},
    "train": {"batch_size": 4, "max_steps": 4, "base_lr": 1e-4, "ckpt_every": 2, "keep_last": 2,
              "log_every": 1, "val_every": 2, "val_batches": 2, "grad_clip": 1.0, "precision": "fp32"},
}


def _recipe(cls, base: dict, overrides: tuple[str, ...], **sections: dict):
    from vqgan_cli.config import apply_overrides, from_dict

    data = json.loads(json.dumps(base))
    for name, values in sections.items():
        data[name].update(values)
    return from_dict(cls, apply_overrides(data, list(overrides)))


def tokenizer_recipe(out: Path, *overrides: str):
    """A ``TokenizerRecipe`` writing to ``out``; ``overrides`` as on the command line."""
    from vqgan_cli.train.tokenizer import TokenizerRecipe

    return _recipe(TokenizerRecipe, TOKENIZER_RECIPE, overrides, train={"out_dir": str(out)})


def prior_recipe(shards: Path, out: Path, *overrides: str):
    """A ``PriorRecipe`` over ``shards`` writing to ``out``; ``overrides`` as on the command line."""
    from vqgan_cli.train.prior import PriorRecipe

    return _recipe(PriorRecipe, PRIOR_RECIPE, overrides, data={"shards": str(shards)}, train={"out_dir": str(out)})


def write_shards(root: Path, samples: list, per_shard: int) -> list[dict]:
    """Write ``samples`` (TokenSample) as shards of ``per_shard`` into ``root``; their manifest entries."""
    entries = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        w = ShardWriter(root / shard_name(s))
        for smp in samples[start:start + per_shard]:
            w.write(smp)
        digest = w.close()
        entries.append({"index": s, "name": shard_name(s), "count": w.count, "sha256": digest,
                        "bytes": (root / shard_name(s)).stat().st_size, "items": [start, start + w.count],
                        "skipped": []})
    return entries
