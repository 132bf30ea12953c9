"""From a request and its models to a checked plan: seeds, grid, crop and conditioning tokens.

Every check that needs the models runs here, before a single token is drawn, and raises
:class:`SampleUsageError` naming the setting at fault."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgan_cli.data import DataError
from vqgan_cli.data.transforms import image_to_tensor, read_image
from vqgan_cli.models.prior import Prior
from vqgan_cli.sample.inputs import (
    Models,
    SampleUsageError,
    check_conditioning,
    cond_grid,
    coord_map,
    crop_grid,
    init_tokens,
    parse_size,
    read_cond_map,
)
from vqgan_cli.sample.request import SampleRequest, Scheme, UpscaleRequest
from vqgan_cli.sample.tokens import SamplingError, SamplingOptions
from vqgan_cli.sample.window import check_window


def sampling_options(req: SampleRequest | UpscaleRequest, models: Models) -> SamplingOptions:
    """How tokens are drawn, checked against the tokenizer's vocabulary and the prior's conditioning."""
    cfg_scale = req.cfg_scale if isinstance(req, SampleRequest) else 1.0
    opts = req.sampling_options(models.tokenizer.n_tokens, cfg_scale)
    if opts.guided and models.prior.cond.null_token is None:
        raise SampleUsageError("`cfg_scale` needs a prior trained with conditioning dropout "
                               "(it has no null token); leave it at 1")
    if opts.guided and models.prior.cond.kind == "sos":
        raise SampleUsageError("`cfg_scale` needs a conditional prior")
    return opts


class Plan(NamedTuple):
    """A checked run: per image, its seed and conditioning; the grid; known tokens."""

    seeds: list[int]
    classes: list[int | None]
    grid: tuple[int, int]  # (h, w) tokens
    crop: tuple[int, int]
    cond: torch.Tensor | None  # (1, h, w) spatial conditioning tokens
    init: torch.Tensor | None  # (1, h, w) tokens of --init
    known: torch.Tensor | None  # (h, w) bool: kept tokens


def _cond_size_default(req: SampleRequest, f: int, crop: tuple[int, int]) -> str | None:
    """Without --size, a map file decides the size (cut to a multiple of f, at least the crop)."""
    if req.size is not None or req.cond is None or req.cond.startswith("builtin:"):
        return req.size
    try:
        with Image.open(req.cond) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - read_cond_map reports the problem properly
        return None
    return f"{max(w - w % f, crop[1] * f)}x{max(h - h % f, crop[0] * f)}"


def plan_sample(req: SampleRequest, models: Models, notes: list[str]) -> Plan:
    """All input checks and preparation; raises SampleUsageError before any sampling."""
    prior, tok = models.prior, models.tokenizer
    check_conditioning(prior, req.cond, req.classes)
    crop = crop_grid(prior, tok)
    h, w = parse_size(_cond_size_default(req, tok.factor, crop), tok.factor, crop)
    _check_raster(prior, (h, w), crop, "`size`")
    cond = None
    if req.cond is not None:
        cond = cond_grid(prior, read_cond_map(req.cond, prior, h * tok.factor, w * tok.factor, notes), h, w)
    elif prior.cond.kind == "coord":
        cond = cond_grid(prior, coord_map(h * tok.factor, w * tok.factor), h, w)
    init = known = None
    if req.init is not None:
        init = init_tokens(req.init, tok, h, w, notes)
        known = torch.zeros(h, w, dtype=torch.bool)
        known[:round(req.keep * h)] = True
    classes: list[int | None] = [c for c in req.classes for _ in range(req.n)] or [None] * req.n
    seeds = [req.seed + i for i in range(len(classes))]
    return Plan(seeds, classes, (h, w), crop, cond, init, known)


def reads_raster(prior: Prior) -> bool:
    return prior.config.permuter == "identity"


def _check_raster(prior: Prior, grid: tuple[int, int], crop: tuple[int, int], option: str) -> None:
    """The sliding windows read tokens in raster order: another reading order only at the crop."""
    if grid != crop and not reads_raster(prior):
        raise SampleUsageError(
            f"{option}: this prior reads tokens in '{prior.config.permuter}' order; the sliding "
            f"window (`window`) needs row-major (raster) order, so only the crop size "
            f"{crop[1]}x{crop[0]} tokens can be sampled")


def check_window_options(models: Models, plan: Plan, batch: int, guided: bool, scheme: Scheme) -> None:
    """The window scheme's checks (grid, tile, memory budget), before any sampling."""
    if plan.grid == plan.crop:
        return
    prior = models.prior
    fixed = 1 if prior.cond.kind in ("sos", "class") else None
    lc = fixed if fixed is not None else plan.crop[0] * plan.crop[1]
    try:
        check_window(prior.gpt, lc, plan.grid, plan.crop, scheme.window, batch, guided, scheme.window_memory,
                     scheme.segment, scheme.band_rows, plan.known)
    except SamplingError as e:
        raise SampleUsageError(str(e)) from None


def plan_upscale(req: UpscaleRequest, models: Models, notes: list[str]) -> Plan:
    """The low-resolution image, upsampled S times (bicubic, as training degraded its inputs),
    becomes the conditioning grid of an output S times larger (cut to a multiple of f)."""

    prior, tok = models.prior, models.tokenizer
    ctok = prior.cond_tokenizer
    if prior.cond.kind != "spatial" or ctok is None or ctok.config.modality != "image":
        raise SampleUsageError(f"{req.prior} is not a super-resolution prior (it needs spatial "
                               "conditioning on images: encode-dataset `cond` lowres:S)")
    if req.scale < 1:
        raise SampleUsageError(f"`scale` must be >= 1, got {req.scale}")
    trained = prior.cond.lowres_factor
    if trained is not None and trained != req.scale:
        notes.append(f"the prior was trained on {trained}x degraded inputs; `scale` {req.scale} differs")
    try:
        rgb = read_image(req.image)
    except DataError as e:
        raise SampleUsageError(str(e)) from None
    f = tok.factor
    crop = crop_grid(prior, tok)
    H = max(crop[0], round(rgb.shape[0] * req.scale / f))
    W = max(crop[1], round(rgb.shape[1] * req.scale / f))
    if (H * f, W * f) != (rgb.shape[0] * req.scale, rgb.shape[1] * req.scale):
        notes.append(f"output size {W * f}x{H * f} (a multiple of {f}, at least the crop) instead of "
                     f"{rgb.shape[1] * req.scale}x{rgb.shape[0] * req.scale}")
    big = np.asarray(Image.fromarray(rgb).resize((W * f, H * f), Image.Resampling.BICUBIC))
    cond = cond_grid(prior, image_to_tensor(np.array(big))[None], H, W, degrade=False)
    _check_raster(prior, (H, W), crop, "`scale`")
    seeds = [req.seed + i for i in range(req.n)]
    return Plan(seeds, [None] * req.n, (H, W), crop, cond, None, None)


