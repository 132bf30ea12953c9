"""Everything ``sample`` / ``upscale`` check and prepare before a single token is drawn.

Loading the prior and its tokenizer (found through the prior's recorded path and hash), checking
that they belong together, parsing ``--size``, and turning ``--cond`` / ``--class`` / ``--init``
into token grids. Every problem is a :class:`SampleUsageError` (exit code 2), raised before any
sampling starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgan_cli.checkpoints.format import file_sha256, read_weights, weights_sha256
from vqgan_cli.data import DataError
from vqgan_cli.data.maps import resize_nearest
from vqgan_cli.models.prior import Prior
from vqgan_cli.models.vqgan import VQGAN


class SampleUsageError(Exception):
    """Bad options or inputs for sample/upscale, found before sampling (exit code 2)."""


class Models(NamedTuple):
    """A prior, the tokenizer that decodes its samples, and what identifies both."""

    prior: Prior
    tokenizer: VQGAN
    prior_path: Path
    tokenizer_path: Path
    info: dict[str, Any]  # the prior's stored info (empty for official files)
    config_path: Path | None = None  # the official YAML the prior was read with


def _recorded_tokenizer(info: dict[str, Any]) -> tuple[str | None, str | None]:
    """(path, weights hash) of the tokenizer a prior says it was trained with."""
    tok = info.get("tokenizer")
    sha = info.get("tokenizer_sha256")
    if isinstance(tok, dict):
        sha = sha or tok.get("weights_sha256") or tok.get("sha256")
        tok = tok.get("path")
    return (str(tok) if tok else None), (str(sha) if sha else None)


def _find(recorded: str, prior_path: Path) -> Path | None:
    p = Path(recorded)
    for cand in ([p] if p.is_absolute() else [prior_path.parent / p, p, prior_path.parent / p.name]):
        if cand.is_file():
            return cand
    return None


def load_models(prior_path: str | Path, tokenizer_path: str | Path | None,
                device: torch.device, config: str | Path | None = None,
                notes: list[str] | None = None) -> Models:
    """Load the prior and its tokenizer; errors when they do not belong together.

    ``prior_path``: a file or an official run folder; ``config``: the official YAML
    (``--config``); what was found for the user (checkpoint, YAML) is added to ``notes``."""
    from vqgan_cli.checkpoints.load import is_safetensors, load_prior, load_tokenizer
    from vqgan_cli.checkpoints.resolve import resolve_model

    resolved = resolve_model(prior_path, config)
    if resolved.note and notes is not None:
        notes.append(resolved.note)
    prior_path, config = resolved.path, resolved.config
    prior = load_prior(prior_path, config)
    info = read_weights(prior_path).info if is_safetensors(prior_path) else {}
    rec_path, rec_sha = _recorded_tokenizer(info)
    if tokenizer_path is not None:
        tok_path = Path(tokenizer_path)
    elif not is_safetensors(prior_path):
        tok_path = prior_path  # an official transformer .ckpt carries its first stage
    elif rec_path is None:
        raise SampleUsageError(f"{prior_path} does not record its tokenizer; pass `tokenizer`")
    else:
        found = _find(rec_path, prior_path)
        if found is None:
            raise SampleUsageError(f"{prior_path} was trained with the tokenizer {rec_path}, which "
                                   "was not found (next to the prior or from here); pass `tokenizer`")
        tok_path = found
    tok = load_tokenizer(tok_path, config if tok_path == prior_path else None)
    if tok.config.modality != "image":
        raise SampleUsageError(f"{tok_path} is a {tok.config.modality} tokenizer; samples need the "
                               "image tokenizer the prior was trained with")
    if rec_sha is not None and weights_sha256(tok.state_dict()) != rec_sha:
        raise SampleUsageError(f"{tok_path} is not the tokenizer {prior_path} was trained with "
                               f"(weights hash differs from the recorded {rec_sha[:12]}...)")
    n_img, vocab = tok.n_tokens, prior.config.gpt.vocab_size
    want = prior.config.image_vocab
    if n_img > vocab or (want is not None and want != n_img):
        raise SampleUsageError(f"prior and tokenizer do not match: the tokenizer has {n_img} codes, "
                               f"the prior models {want if want is not None else vocab} image tokens")
    cond_tok = prior.cond_tokenizer
    if cond_tok is not None and cond_tok.factor != tok.factor:
        raise SampleUsageError(f"the conditioning tokenizer has factor {cond_tok.factor}, the image "
                               f"tokenizer {tok.factor}: their grids do not line up")
    if prior.cond.kind == "labels" and prior.cond.label_factor != tok.factor:
        raise SampleUsageError(f"the prior's label cells are {prior.cond.label_factor} px but the "
                               f"tokenizer's factor is {tok.factor}")
    return Models(prior.to(device), tok.to(device), prior_path, Path(tok_path), info, config)


def checkpoint_hashes(models: Models) -> dict[str, str]:
    """File hashes for the sidecar: which exact files produced an image."""
    out = {"prior": str(models.prior_path), "prior_sha256": file_sha256(models.prior_path)}
    if models.tokenizer_path != models.prior_path:
        out.update(tokenizer=str(models.tokenizer_path),
                   tokenizer_sha256=file_sha256(models.tokenizer_path))
    if models.config_path is not None:
        out.update(config=str(models.config_path), config_sha256=file_sha256(models.config_path))
    return out


def crop_grid(prior: Prior, tok: VQGAN) -> tuple[int, int]:
    """(h, w) tokens of one training crop: recorded, else the tokenizer's resolution."""
    if prior.config.grid is not None:
        h, w = prior.config.grid
        return int(h), int(w)
    side = tok.config.autoencoder.resolution // tok.factor
    return side, side


def parse_size(text: str | None, factor: int, crop: tuple[int, int]) -> tuple[int, int]:
    """``WxH`` pixels -> (h, w) tokens; a clear error with the nearest valid sizes."""
    if text is None:
        return crop
    try:
        w_s, h_s = text.lower().split("x")
        W, H = int(w_s), int(h_s)
    except ValueError:
        raise SampleUsageError(f"`size` {text}: expected WIDTHxHEIGHT in pixels, e.g. 1280x832") from None
    if W % factor or H % factor:
        def near(v: int) -> list[int]:
            lo = v - v % factor
            return [v] if lo == v else sorted({max(factor, lo), lo + factor})
        sizes = [f"{w}x{h}" for w in near(W) for h in near(H)]
        raise SampleUsageError(f"`size` {text}: width and height must be multiples of the "
                               f"tokenizer's factor {factor}; nearest valid sizes: {', '.join(sizes)}")
    if H // factor < crop[0] or W // factor < crop[1]:
        raise SampleUsageError(f"`size` {text} is smaller than the prior's crop "
                               f"{crop[1] * factor}x{crop[0] * factor}; use at least that")
    return H // factor, W // factor


def read_cond_map(spec: str, prior: Prior, h_px: int, w_px: int, notes: list[str]) -> torch.Tensor:
    """A conditioning map file (or ``builtin:landscapes:SEED``) as the prior's input (1, C, H, W),
    resized nearest-neighbour to the sample size (and said so); label range checked."""
    from vqgan_cli.data.maps import check_labels, one_hot, read_map
    from vqgan_cli.data.transforms import image_to_tensor, read_image

    kind = prior.cond.kind
    ctok = prior.cond_tokenizer
    modality = ctok.config.modality if ctok is not None else ("segmentation" if kind == "labels" else None)
    if modality is None:
        raise SampleUsageError(f"`cond`: maps are not supported for {kind} conditioning")
    if spec.startswith("builtin:landscapes"):
        from vqgan_cli.data.landscapes import render_landscape

        seed = int(spec.rsplit(":", 1)[1]) if spec.count(":") == 2 else 0
        if modality != "segmentation":
            raise SampleUsageError(f"`cond` {spec} is a segmentation map; this prior needs {modality}")
        arr, what = render_landscape(seed, h_px, w_px).labels.astype(np.int32), "seg"
    else:
        try:
            if modality == "image":
                arr, what = read_image(spec), "image"
            else:
                m = read_map(spec, label_shift=prior.cond.label_shift if kind == "spatial" else 0)
                arr, what = m.array, m.kind
        except DataError as e:
            raise SampleUsageError(str(e)) from None
        want = {"segmentation": "seg", "depth": "depth"}.get(modality, "image")
        if what != want:
            raise SampleUsageError(f"`cond` {spec} is a {what} map; this prior needs a {modality} map")
    if arr.shape[:2] != (h_px, w_px):
        notes.append(f"conditioning map {spec} is {arr.shape[1]}x{arr.shape[0]}: resized "
                     f"(nearest neighbour) to the sample size {w_px}x{h_px}")
        if what == "image":
            arr = np.asarray(Image.fromarray(arr).resize((w_px, h_px), Image.Resampling.NEAREST))
        else:
            arr = resize_nearest(arr, h_px, w_px)
    if what == "seg":
        n_labels = prior.cond.n_labels if kind == "labels" else ctok.config.n_labels  # type: ignore[union-attr]
        try:
            check_labels(arr, n_labels, spec)
        except DataError as e:
            raise SampleUsageError(f"{e} (the prior knows {n_labels} labels)") from None
        labels = torch.from_numpy(np.array(arr, dtype=np.int64))[None]  # (1, H, W)
        return labels[:, None] if kind == "labels" else one_hot(labels, n_labels)
    if what == "depth":
        return torch.from_numpy(np.array(arr, dtype=np.float32))[None, None]
    return image_to_tensor(np.array(arr))[None]


@torch.no_grad()
def cond_grid(prior: Prior, x: torch.Tensor, h: int, w: int, degrade: bool = True) -> torch.Tensor:
    """Conditioning tokens of a whole map as a (1, h, w) grid aligned with the image grid.
    ``degrade=False`` skips a super-resolution prior's own degradation (upscale's input is
    already low resolution)."""
    dev = prior.gpt.head.weight.device
    x = x.to(dev)
    if not degrade and prior.cond_tokenizer is not None:
        tokens = prior.cond_tokenizer.encode(x).indices
    else:
        tokens = prior.cond_tokens(x)
    if tokens.numel() != h * w:
        raise SampleUsageError(f"conditioning gives {tokens.numel()} tokens for a {w}x{h} grid")
    return tokens.reshape(1, h, w).long()


def check_conditioning(prior: Prior, cond: str | None, classes: list[int]) -> None:
    """--cond / --class against the prior's kind of conditioning."""
    kind = prior.cond.kind
    if kind == "sos" and (cond is not None or classes):
        raise SampleUsageError(f"this prior is unconditional: drop {'`cond`' if cond else '`classes`'}")
    if kind == "class":
        if cond is not None:
            raise SampleUsageError("this prior is class-conditional: use `classes`, not `cond`")
        if not classes:
            raise SampleUsageError(f"this prior is class-conditional: pass `classes` "
                                   f"(0..{prior.cond.n_classes - 1})")
        bad = [c for c in classes if not 0 <= c < prior.cond.n_classes]
        if bad:
            raise SampleUsageError(f"`classes` {bad[0]} is out of range: the prior knows "
                                   f"{prior.cond.n_classes} classes (0..{prior.cond.n_classes - 1})")
    if prior.cond.spatial:
        if classes:
            raise SampleUsageError(f"this prior is conditioned on {kind} maps: use `cond`, not `classes`")
        if cond is None and kind != "coord":  # coordinates are made from the sample size
            raise SampleUsageError(f"this prior is conditioned on {kind} maps: pass `cond` MAP.png")


def coord_map(h_px: int, w_px: int) -> torch.Tensor:
    """The reference's coordinate input (taming.data.faceshq, ``coord=True``): pixel ``i`` in
    raster order holds ``i / (h*w)``; (1, 1, H, W)."""
    n = h_px * w_px
    return (torch.arange(n, dtype=torch.float64) / n).float().reshape(1, 1, h_px, w_px)


def init_tokens(path: str, tok: VQGAN, h: int, w: int, notes: list[str]) -> torch.Tensor:
    """The tokens (1, h, w) of ``--init`` resized (bicubic) to the sample size."""
    from vqgan_cli.data.transforms import image_to_tensor, read_image

    try:
        rgb = read_image(path)
    except DataError as e:
        raise SampleUsageError(str(e)) from None
    f = tok.factor
    if rgb.shape[:2] != (h * f, w * f):
        notes.append(f"`init` {path} is {rgb.shape[1]}x{rgb.shape[0]}: resized to {w * f}x{h * f}")
        rgb = np.asarray(Image.fromarray(rgb).resize((w * f, h * f), Image.Resampling.BICUBIC))
    x = image_to_tensor(np.array(rgb))[None].to(tok.last_layer.device)
    with torch.no_grad():
        return tok.encode(x).indices.reshape(1, h, w).long()
