"""The tokenizers encode-dataset runs: loading (with the weight hash that pins shards to them),
the conditioning stage chosen by ``--cond``, and token computation with optional flip copies.

``--cond labels`` is our addition for a conditioning stage without a trained segmentation
tokenizer: the label map itself, nearest-downsampled to the token grid (the label at the centre
pixel of every f x f cell), is the conditioning token grid, with vocabulary n_labels. The
reference always tokenizes maps with a VQGAN; raw labels lose detail finer than a cell but need
no second stage-one run and are exact where a small segmentation tokenizer would blur.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqgan_cli.checkpoints.format import weights_sha256
from vqgan_cli.config import to_dict
from vqgan_cli.data.maps import cell_labels, one_hot
from vqgan_cli.encode.inputs import EncodeUsageError, builtin_classes, to_model_range
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.shards.format import token_dtype

COND_KINDS = ("seg", "depth", "labels")  # plus lowres:S


def load_for_encoding(path: str, config: str | None = None) -> tuple[VQGAN, dict]:
    """(model, manifest description with the weights hash) of a tokenizer checkpoint or run
    folder; ``config``: an official file's YAML kept elsewhere (``--config``)."""
    from vqgan_cli.checkpoints.load import load_tokenizer

    model = load_tokenizer(path, config)
    info = {"path": str(path), "weights_sha256": weights_sha256(model.state_dict()),
            "n_embed": model.n_tokens, "factor": model.factor, "modality": model.config.modality,
            "config": to_dict(model.config)}
    return model, info


@dataclass
class Cond:
    """The conditioning stage: how its tokens are made and their vocabulary."""

    kind: str
    model: VQGAN | None
    vocab: int
    n_labels: int | None
    lowres: int | None


def parse_cond(kind: str | None, cond_tokenizer: str | None) -> tuple[str | None, int | None]:
    """(kind, lowres factor) of ``--cond``; usage errors for impossible combinations."""
    if kind is None and cond_tokenizer is not None:
        raise EncodeUsageError("`cond_tokenizer` needs `cond` seg, depth or lowres:S")
    if kind is None:
        return None, None
    if kind.startswith("lowres:"):
        try:
            s = int(kind.split(":", 1)[1])
        except ValueError:
            s = 0
        if s < 2:
            raise EncodeUsageError(f"`cond` {kind}: expected lowres:S with an integer S >= 2")
        return "lowres", s
    if kind not in COND_KINDS:
        raise EncodeUsageError(f"`cond` {kind}: expected one of seg, depth, labels, lowres:S")
    if kind in ("seg", "depth") and cond_tokenizer is None:
        hint = " (or `cond` labels for raw label maps on the token grid)" if kind == "seg" else ""
        raise EncodeUsageError(f"`cond` {kind} needs `cond_tokenizer` (a {kind} tokenizer){hint}")
    if kind == "labels" and cond_tokenizer is not None:
        raise EncodeUsageError("`cond` labels uses raw label maps; drop `cond_tokenizer` or use `cond` seg")
    return kind, None


def setup_cond(cond: str | None, cond_tokenizer: str | None, n_labels_opt: int | None, tok: VQGAN,
               builtin: bool) -> tuple[Cond | None, dict | None]:
    """Load and check the conditioning stage; returns it and its manifest description."""
    kind, lowres = parse_cond(cond, cond_tokenizer)
    if kind is None:
        return None, None
    model, info = (None, None)
    if cond_tokenizer is not None:
        model, info = load_for_encoding(cond_tokenizer)
        want = {"seg": "segmentation", "depth": "depth", "lowres": "image"}[kind]
        if model.config.modality != want:
            raise EncodeUsageError(f"`cond_tokenizer` {cond_tokenizer} is a {model.config.modality} "
                                   f"tokenizer; `cond` {cond} needs a {want} tokenizer")
        if model.factor != tok.factor:
            raise EncodeUsageError(f"`cond_tokenizer` has factor {model.factor} but the image tokenizer "
                                   f"{tok.factor}: conditioning tokens must share the image's grid")
    if kind == "lowres" and model is None:
        model = tok  # the image tokenizer encodes the low-resolution copy
    n_labels = None
    if kind in ("seg", "labels"):
        if model is not None:
            n_labels = model.config.n_labels
            if n_labels_opt is not None and n_labels_opt != n_labels:
                raise EncodeUsageError(f"`n_labels` {n_labels_opt} differs from the cond tokenizer's "
                                       f"{n_labels}")
        else:
            n_labels = n_labels_opt or (len(builtin_classes()) if builtin else None)
            if n_labels is None:
                raise EncodeUsageError("`cond` labels on map files needs `n_labels` (the label vocabulary)")
        if builtin and n_labels < len(builtin_classes()):
            raise EncodeUsageError(f"builtin:landscapes has {len(builtin_classes())} classes but n_labels "
                                   f"is {n_labels}")
    if kind == "depth" and builtin:
        raise EncodeUsageError("builtin:landscapes has no depth maps")
    vocab = model.n_tokens if model is not None and kind != "labels" else int(n_labels or 0)
    desc = {"kind": cond, "tokenizer": info if cond_tokenizer else None, "vocab_size": vocab,
            "dtype": token_dtype(vocab).name, "n_labels": n_labels,
            "classes": builtin_classes() if builtin and kind in ("seg", "labels") else None,
            "note": {"labels": "raw label maps, nearest-downsampled to the token grid (the label at "
                               "the centre pixel of each f x f cell); vocabulary = n_labels",
                     "lowres": f"{lowres}x bicubic downsample then upsample, encoded by "
                               f"{'the cond tokenizer' if cond_tokenizer else 'the image tokenizer'}"
                     }.get(kind)}
    return Cond(kind, model, vocab, n_labels, lowres), desc


@torch.inference_mode()
def tokens_of(model: VQGAN, x: torch.Tensor, flip: bool, seed: int) -> torch.Tensor:
    """Token grids of ``x`` (and of its mirror image, appended), one forward for both."""
    if flip:
        x = torch.cat([x, x.flip(-1)])
    q = model.config.quantizer
    if q.n_used is None or q.unknown_index != "random":
        return model.encode(x).indices.cpu()
    # an official tokenizer remapping unused codes at random: seed by position, so resumed runs agree
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model.encode(x).indices.cpu()


def cond_tokens_of(cond: Cond, maps: torch.Tensor, device: torch.device, flip: bool, f: int,
                   seed: int) -> torch.Tensor:
    """Conditioning token grids (flip copies appended) of a batch of maps or low-res images."""
    m = maps.to(device, non_blocking=True)
    if cond.kind == "labels":
        grids = [cell_labels(m, f)]
        if flip:
            grids.append(cell_labels(m.flip(-1), f))
        return torch.cat(grids).long().cpu()
    if cond.kind == "seg":
        m = one_hot(m.long(), cond.n_labels)  # type: ignore[arg-type]
    elif cond.kind == "lowres":
        m = to_model_range(m)
    return tokens_of(cond.model, m, flip, seed)  # type: ignore[arg-type]
