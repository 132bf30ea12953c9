"""What ``vqgan sample`` and ``vqgan upscale`` run: checks, sampling, decoding, files.

Each image ``i`` is drawn with its own generator seeded ``seed + i`` and saved as
``{i:04d}_seed{seed+i}.png`` (``_class{c}`` added for class priors) with a JSON sidecar of the
same stem holding every setting and the checkpoints' hashes, so one image can be re-made
alone (``--seed S --n 1``). On the CPU in float32 the same command and seed write
byte-identical PNGs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgan_cli.checkpoints.format import atomic_write
from vqgan_cli.data.transforms import image_to_tensor
from vqgan_cli.faults import ledger, stop_on_sigterm
from vqgan_cli.images import save_grid, to_uint8
from vqgan_cli.sample.decode import decode_grid
from vqgan_cli.sample.inputs import (
    Models,
    SampleUsageError,
    check_conditioning,
    checkpoint_hashes,
    cond_grid,
    coord_map,
    crop_grid,
    init_tokens,
    load_models,
    parse_size,
    read_cond_map,
    vocab_of,
)
from vqgan_cli.sample.tokens import SamplingError, SamplingOptions, make_generators, sample_sequence
from vqgan_cli.sample.window import (
    DEFAULT_SEGMENT,
    DEFAULT_WINDOW,
    PRECISIONS,
    WINDOW_MODES,
    Conditioning,
    check_window,
    precision_context,
    sample_window,
)


@dataclass
class SampleRequest:
    """Every option of ``vqgan sample`` (also written to each image's sidecar)."""

    prior: str
    tokenizer: str | None = None
    config: str | None = None  # the official model's YAML (--config); else found in its run folder
    n: int = 1
    batch_size: int = 4
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    classes: list[int] = field(default_factory=list)
    cond: str | None = None
    size: str | None = None
    init: str | None = None
    keep: float = 0.5
    window: str = DEFAULT_WINDOW
    segment: int | None = DEFAULT_SEGMENT
    window_memory: float | None = None
    cache: bool = True
    precision: str = "fp32"
    decode: str = "auto"
    out: str = "samples"
    grid: bool = False
    device: str = "auto"
    command: str | None = None
    skip_existing: bool = False  # draw only images whose PNG and sidecar are not in ``out`` yet


class SampleReport(NamedTuple):
    """What a run wrote and how long sampling took."""

    files: list[Path]
    grid: Path | None
    size: tuple[int, int]  # (width, height) pixels
    tokens: int  # tokens drawn (all images)
    seconds: float  # sampling only (no loading, no decoding)
    notes: list[str]


def _options(req: SampleRequest, models: Models) -> SamplingOptions:
    n_img = vocab_of(models.tokenizer)
    opts = SamplingOptions(req.temperature, req.top_k, req.top_p, req.cfg_scale, n_tokens=n_img)
    try:
        opts.check(n_img)
    except SamplingError as e:
        raise SampleUsageError(str(e)) from None
    if opts.guided and models.prior.cond.null_token is None:
        raise SampleUsageError("--cfg-scale needs a prior trained with conditioning dropout "
                               "(it has no null token); leave it at 1")
    if opts.guided and models.prior.cond.kind == "sos":
        raise SampleUsageError("--cfg-scale needs a conditional prior")
    return opts


def _basic_checks(req: SampleRequest) -> None:
    problems = []
    if req.n < 1:
        problems.append(f"--n must be >= 1, got {req.n}")
    if req.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {req.batch_size}")
    if req.window not in WINDOW_MODES:
        problems.append(f"--window must be one of {', '.join(WINDOW_MODES)}, got {req.window!r}")
    if not 0 <= req.keep <= 1:
        problems.append(f"--keep must be in [0, 1], got {req.keep}")
    if req.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {req.precision!r}")
    if req.decode not in ("auto", "whole", "tiles"):
        problems.append(f"--decode must be auto, whole or tiles, got {req.decode!r}")
    if problems:
        raise SampleUsageError("; ".join(problems))


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
    _check_raster(prior, (h, w), crop, "--size")
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


def _raster(prior: Any) -> bool:
    return prior.config.permuter == "identity"


def _check_raster(prior: Any, grid: tuple[int, int], crop: tuple[int, int], option: str) -> None:
    """The sliding windows read tokens in raster order: another reading order only at the crop."""
    if grid != crop and not _raster(prior):
        raise SampleUsageError(
            f"{option}: this prior reads tokens in '{prior.config.permuter}' order; the sliding "
            f"window (--window) needs row-major (raster) order, so only the crop size "
            f"{crop[1]}x{crop[0]} tokens can be sampled")


def check_window_options(models: Models, plan: Plan, batch: int, guided: bool, window: str,
                         segment: int | None, window_memory: float | None) -> None:
    """The window scheme's checks (grid, segment, memory budget), before any sampling."""
    if plan.grid == plan.crop:
        return
    prior = models.prior
    fixed = 1 if prior.cond.kind in ("sos", "class") else None
    lc = fixed if fixed is not None else plan.crop[0] * plan.crop[1]
    try:
        check_window(prior.gpt, lc, plan.grid, plan.crop, window, batch, guided, window_memory,
                     segment, known=plan.known)
    except SamplingError as e:
        raise SampleUsageError(str(e)) from None


def _fixed_cond(models: Models, classes: list[int | None]) -> torch.Tensor | None:
    prior = models.prior
    dev = prior.gpt.head.weight.device
    if prior.cond.kind == "class":
        return prior.cond_tokens(torch.tensor(classes, device=dev))
    if prior.cond.kind == "sos":
        return prior.cond_tokens(batch_size=len(classes))
    return None


@torch.no_grad()
def sample_batch(models: Models, plan: Plan, opts: SamplingOptions, idx: list[int],
                 window: str = DEFAULT_WINDOW, cache: bool = True, precision: str = "fp32",
                 segment: int | None = DEFAULT_SEGMENT,
                 window_memory: float | None = None) -> torch.Tensor:
    """Tokens (b, h, w) of the images ``idx`` of the plan."""
    prior = models.prior
    B, (h, w) = len(idx), plan.grid
    gens = make_generators([plan.seeds[i] for i in idx])
    dev = prior.gpt.head.weight.device
    fixed = _fixed_cond(models, [plan.classes[i] for i in idx])
    spatial = plan.cond.expand(B, h, w) if plan.cond is not None else None
    guided = opts.guided
    if (h, w) == plan.crop:
        c = fixed if fixed is not None else spatial.reshape(B, -1)  # type: ignore[union-attr]
        null = prior.null_cond(B, c.shape[1]) if guided else None
        prefix = None
        if plan.init is not None and plan.known is not None:
            prefix = prior.permute(plan.init.expand(B, h, w))[:, :int(plan.known.sum())]
        with precision_context(prior.gpt, precision):
            seq = sample_sequence(prior.gpt, c, h * w, opts, gens, prefix, null, cached=cache)
        return prior.unpermute(seq).reshape(B, h, w)
    cond = Conditioning(grid=spatial, fixed=fixed)
    if guided:
        if spatial is not None:
            cond.null_grid = prior.null_cond(B, h * w).reshape(B, h, w)
        else:
            cond.null_fixed = prior.null_cond(B, 1)
    init = plan.init.expand(B, h, w) if plan.init is not None else torch.zeros(B, h, w, dtype=torch.long)
    return sample_window(prior.gpt, cond, init.to(dev), plan.crop, opts, gens, plan.known, window,
                         segment, precision=precision, memory_mib=window_memory)


def _save_png(path: Path, image: torch.Tensor) -> None:
    """(3, H, W) in [-1, 1] -> PNG without timestamps, so equal pixels give equal bytes; atomic,
    so an interrupted run never leaves half an image."""
    def write(tmp: Path) -> None:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the image from other users

    atomic_write(path, write)


def _sidecar(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o644)

    atomic_write(path, write)


_SET_SIZE_ONLY = ("n", "batch_size", "grid", "command")  # settings that do not change image i


def _finished(out: Path, name: str, settings: dict[str, Any], hashes: dict) -> bool:
    """--skip-existing: whether image ``name`` is complete (its sidecar is written first, the
    PNG last) and was drawn with these settings and checkpoints; other settings are refused."""
    png, side = out / f"{name}.png", out / f"{name}.json"
    if not (png.is_file() and side.is_file()):
        return False
    try:
        old = json.loads(side.read_text())
    except json.JSONDecodeError:
        return False  # torn by something else: drawn again
    mine = {k: v for k, v in settings.items() if k not in _SET_SIZE_ONLY}
    theirs = {k: v for k, v in old.get("settings", {}).items() if k not in _SET_SIZE_ONLY}
    diffs = [f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in sorted(set(mine) | set(theirs))
             if mine.get(k) != theirs.get(k)]
    if old.get("checkpoints") != hashes:
        diffs.append("other checkpoints")
    if diffs:
        raise SampleUsageError(f"{side}: drawn with other settings ({'; '.join(diffs)}); --skip-existing keeps "
                               "only images of the same settings: choose another --out, or leave it out")
    return True


def run_sample(req: SampleRequest, models: Models | None = None) -> SampleReport:
    """The whole ``vqgan sample``: check, sample in batches, decode, write images and sidecars."""
    from vqgan_cli.runtime import resolve_device

    _basic_checks(req)
    notes: list[str] = []
    models = models or load_models(req.prior, req.tokenizer, resolve_device(req.device), req.config, notes)
    opts = _options(req, models)
    plan = plan_sample(req, models, notes)
    check_window_options(models, plan, min(req.batch_size, len(plan.seeds)), opts.guided, req.window,
                         req.segment, req.window_memory)
    hashes = checkpoint_hashes(models)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    f = models.tokenizer.factor
    h, w = plan.grid
    settings = {k: v for k, v in asdict(req).items() if k != "skip_existing"}
    names = [f"{i:04d}{'' if c is None else f'_class{c}'}_seed{s}" for i, (s, c) in
             enumerate(zip(plan.seeds, plan.classes, strict=True))]
    done = {i for i, name in enumerate(names) if req.skip_existing and _finished(out, name, settings, hashes)}
    todo = [i for i in range(len(names)) if i not in done]
    written = len(done)

    def record() -> None:  # what Ctrl-C or SIGTERM would leave (cli.run_guarded reports it)
        ledger.record(f"{written} of {len(names)} image(s) in {out}, each with its JSON sidecar",
                      f"re-run the same command with --skip-existing to draw the other {len(names) - written}")

    record()
    pictures: dict[int, torch.Tensor] = {}
    seconds = 0.0
    with stop_on_sigterm():
        for start in range(0, len(todo), req.batch_size):
            idx = todo[start:start + req.batch_size]
            t0 = time.perf_counter()
            tokens = sample_batch(models, plan, opts, idx, req.window, req.cache, req.precision,
                                  req.segment, req.window_memory)
            seconds += time.perf_counter() - t0
            for k, i in enumerate(idx):
                pixels = decode_grid(models.tokenizer, tokens[k:k + 1], mode=req.decode).image[0].cpu()
                _sidecar(out / f"{names[i]}.json", {  # sidecar first, PNG last: a PNG means both are there
                    "image": f"{names[i]}.png", "index": i, "seed": plan.seeds[i], "class": plan.classes[i],
                    "size": [w * f, h * f], "grid": [h, w], "crop": list(plan.crop),
                    "settings": settings, "checkpoints": hashes, "notes": notes})
                _save_png(out / f"{names[i]}.png", pixels)
                written += 1
                record()
                if req.grid:
                    pictures[i] = pixels
    if done:
        notes.append(f"--skip-existing: {len(done)} of {len(names)} image(s) were already in {out}; "
                     f"drew the other {len(todo)}")
    files = [out / f"{name}.png" for name in names]
    grid_path = None
    if req.grid:
        for i in done:
            with Image.open(files[i]) as im:
                pictures[i] = image_to_tensor(np.asarray(im.convert("RGB")))
        grid_path = save_grid(out / f"grid_seed{req.seed}.png", [torch.stack([pictures[i] for i in sorted(pictures)])])
    kept = int(plan.known.sum()) if plan.known is not None else 0
    n_drawn = len(plan.seeds) * (h * w - kept)
    return SampleReport(files, grid_path, (w * f, h * f), n_drawn, seconds, notes)


@dataclass
class UpscaleRequest:
    """Every option of ``vqgan upscale``."""

    prior: str
    image: str
    scale: int = 4
    out: str = "upscaled.png"
    n: int = 1
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    tokenizer: str | None = None
    config: str | None = None  # the official model's YAML (--config); else found in its run folder
    window: str = DEFAULT_WINDOW
    segment: int | None = DEFAULT_SEGMENT
    window_memory: float | None = None
    precision: str = "fp32"
    decode: str = "auto"
    device: str = "auto"
    command: str | None = None


def plan_upscale(req: UpscaleRequest, models: Models, notes: list[str]) -> Plan:
    """The low-resolution image, upsampled S times (bicubic, as training degraded its inputs),
    becomes the conditioning grid of an output S times larger (cut to a multiple of f)."""
    from vqgan_cli.data import DataError
    from vqgan_cli.data.transforms import image_to_tensor, read_image

    prior, tok = models.prior, models.tokenizer
    ctok = prior.cond_tokenizer
    if prior.cond.kind != "spatial" or ctok is None or ctok.config.modality != "image":
        raise SampleUsageError(f"{req.prior} is not a super-resolution prior (it needs spatial "
                               "conditioning on images: encode-dataset --cond lowres:S)")
    if req.scale < 1:
        raise SampleUsageError(f"--scale must be >= 1, got {req.scale}")
    trained = prior.cond.lowres_factor
    if trained is not None and trained != req.scale:
        notes.append(f"the prior was trained on {trained}x degraded inputs; --scale {req.scale} differs")
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
    _check_raster(prior, (H, W), crop, "--scale")
    seeds = [req.seed + i for i in range(req.n)]
    return Plan(seeds, [None] * req.n, (H, W), crop, cond, None, None)


def run_upscale(req: UpscaleRequest, models: Models | None = None) -> SampleReport:
    """The whole ``vqgan upscale``: one image in, ``n`` stochastic super-resolutions out."""
    from vqgan_cli.runtime import resolve_device

    if req.n < 1:
        raise SampleUsageError(f"--n must be >= 1, got {req.n}")
    if req.window not in WINDOW_MODES:
        raise SampleUsageError(f"--window must be one of {', '.join(WINDOW_MODES)}, got {req.window!r}")
    if req.precision not in PRECISIONS:
        raise SampleUsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {req.precision!r}")
    notes: list[str] = []
    models = models or load_models(req.prior, req.tokenizer, resolve_device(req.device), req.config, notes)
    n_img = vocab_of(models.tokenizer)
    opts = SamplingOptions(req.temperature, req.top_k, req.top_p, n_tokens=n_img)
    try:
        opts.check(n_img)
    except SamplingError as e:
        raise SampleUsageError(str(e)) from None
    plan = plan_upscale(req, models, notes)
    check_window_options(models, plan, 1, False, req.window, req.segment, req.window_memory)
    hashes = checkpoint_hashes(models)
    out = Path(req.out)
    f = models.tokenizer.factor
    h, w = plan.grid
    files, seconds = [], 0.0
    for i in range(req.n):
        t0 = time.perf_counter()
        tokens = sample_batch(models, plan, opts, [i], req.window, True, req.precision, req.segment,
                              req.window_memory)
        seconds += time.perf_counter() - t0
        pixels = decode_grid(models.tokenizer, tokens, mode=req.decode).image[0].cpu()
        suffix = out.suffix or ".png"
        path = out if req.n == 1 else out.with_name(f"{out.stem}_{i:02d}_seed{plan.seeds[i]}{suffix}")
        _save_png(path, pixels)
        _sidecar(path.with_suffix(".json"), {
            "image": path.name, "index": i, "seed": plan.seeds[i], "size": [w * f, h * f],
            "grid": [h, w], "crop": list(plan.crop), "settings": asdict(req),
            "checkpoints": hashes, "notes": notes})
        files.append(path)
    return SampleReport(files, None, (w * f, h * f), req.n * h * w, seconds, notes)
