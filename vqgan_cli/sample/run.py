"""What ``vqgan sample`` and ``vqgan upscale`` run: checks, sampling, decoding, files.

Each image ``i`` is drawn with its own generator seeded ``seed + i`` and saved as
``{i:04d}_seed{seed+i}.png`` (``_class{c}`` added for class priors) with a JSON sidecar of the
same stem holding every setting and the checkpoints' hashes, so one image can be re-made
alone (``--seed S --n 1``). On the CPU in float32 the same command and seed write
byte-identical PNGs. With ``save_tokens`` its token grid is kept too, as ``NAME.tokens.npy``
(int64, rows x cols, named in the sidecar's ``tokens``), to be decoded again without sampling.

Under torchrun (``torchrun --nproc_per_node N vqgan sample ...``) image ``i`` is drawn by rank
``i % N`` on that rank's device (its local GPU on CUDA), batched within the rank's share: seeds
belong to images, not to batches or ranks, so the files are those of one process. The ranks first
check that they were started alike; rank 0 alone reports, shows progress and writes the grid.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from vqgan_cli.checkpoints.format import atomic_write
from vqgan_cli.console import TrainProgress
from vqgan_cli.data.transforms import image_to_tensor
from vqgan_cli.faults import ledger, stop_on_sigterm
from vqgan_cli.images import save_grid, save_png
from vqgan_cli.runtime import (
    Precision,
    Runtime,
    announce_precision,
    barrier,
    check_same_arguments,
    gather_rows,
    my_share,
    setup_runtime,
    shutdown,
)
from vqgan_cli.sample.decode import decode_grid
from vqgan_cli.sample.inputs import Models, SampleUsageError, checkpoint_hashes, load_models
from vqgan_cli.sample.plan import (
    Plan,
    check_window_options,
    plan_sample,
    plan_upscale,
    reads_raster,
    sampling_options,
)
from vqgan_cli.sample.request import SampleRequest, Scheme, UpscaleRequest
from vqgan_cli.sample.tokens import SamplingOptions, make_generators, sample_sequence
from vqgan_cli.sample.window import Conditioning, StepHook, precision_context, sample_window


class SampleReport(NamedTuple):
    """What a run wrote and how long sampling took."""

    files: list[Path]
    grid: Path | None
    size: tuple[int, int]  # (width, height) pixels
    tokens: int  # tokens drawn (all images)
    seconds: float  # sampling only (no loading, no decoding)
    notes: list[str]
    shown: bool = True  # False on torchrun ranks other than 0: the command line prints nothing there


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
                 scheme: Scheme = Scheme(), on_step: StepHook | None = None) -> torch.Tensor:
    """Tokens (b, h, w) of the images ``idx`` of the plan, computed as ``scheme`` says. ``on_step``: progress hook
    (:data:`vqgan_cli.sample.window.StepHook`; at the crop size rows count only for raster order)."""
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
        on_token = None
        if on_step is not None:
            buf = torch.zeros(B, h * w, dtype=torch.long, device=dev)
            n_known = 0 if prefix is None else prefix.shape[1]
            if prefix is not None:
                buf[:, :n_known] = prefix
            raster = reads_raster(prior)

            def on_token(tok: torch.Tensor, pos: int) -> None:
                buf[:, pos] = tok
                on_step(buf.view(B, h, w), (pos + 1) // w if raster else 0, pos + 1 - n_known)
        with precision_context(prior.gpt, scheme.precision):
            seq = sample_sequence(prior.gpt, c, h * w, opts, gens, prefix, null, cached=scheme.cache,
                                  compiled=scheme.compile, on_token=on_token)
        return prior.unpermute(seq).reshape(B, h, w)
    cond = Conditioning(grid=spatial, fixed=fixed)
    if guided:
        if spatial is not None:
            cond.null_grid = prior.null_cond(B, h * w).reshape(B, h, w)
        else:
            cond.null_fixed = prior.null_cond(B, 1)
    init = plan.init.expand(B, h, w) if plan.init is not None else torch.zeros(B, h, w, dtype=torch.long)
    return sample_window(prior.gpt, cond, init.to(dev), plan.crop, opts, gens, plan.known, scheme.window,
                         scheme.segment, scheme.band_rows, scheme.precision, scheme.window_memory, on_step)


def _sidecar(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o644)

    atomic_write(path, write)


def tokens_name(png: Path) -> str:
    """The token file beside an image: ``NAME.png`` -> ``NAME.tokens.npy``."""
    return f"{png.stem}.tokens.npy"


def _save_tokens(path: Path, grid: torch.Tensor) -> None:
    """One image's (rows, cols) token grid as an int64 ``.npy``, atomically like the PNG."""
    array = grid.detach().cpu().numpy().astype(np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would add .npy to the temp name
            np.save(fh, array)
        tmp.chmod(0o644)

    atomic_write(path, write)


def _keep_tokens(png: Path, grid: torch.Tensor, save: bool) -> dict[str, str]:
    """Write (or, when not asked for, remove a stale) token file beside ``png``; the sidecar entry
    naming it, so a sidecar never names tokens of another drawing nor misses the ones beside it."""
    path = png.with_name(tokens_name(png))
    if not save:
        path.unlink(missing_ok=True)
        return {}
    _save_tokens(path, grid)
    return {"tokens": path.name}


# settings that do not change image i (compiled decoding draws the eager tokens: tested)
_SAME_IMAGE = ("n", "batch_size", "grid", "command", "save_tokens", "compile")


def _finished(out: Path, name: str, settings: dict[str, Any], hashes: dict) -> bool:
    """--skip-existing: whether image ``name`` is complete (its tokens and sidecar are written first,
    the PNG last) and was drawn with these settings and checkpoints; other settings are refused.
    An image asked for with ``save_tokens`` but saved without them is drawn again: the same seed
    gives the same tokens, which cannot be read back from the PNG."""
    png, side = out / f"{name}.png", out / f"{name}.json"
    if not (png.is_file() and side.is_file()):
        return False
    try:
        old = json.loads(side.read_text())
    except json.JSONDecodeError:
        return False  # torn by something else: drawn again
    mine = {k: v for k, v in settings.items() if k not in _SAME_IMAGE}
    theirs = {k: v for k, v in old.get("settings", {}).items() if k not in _SAME_IMAGE}
    diffs = [f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in sorted(set(mine) | set(theirs))
             if mine.get(k) != theirs.get(k)]
    if old.get("checkpoints") != hashes:
        diffs.append("other checkpoints")
    if diffs:
        raise SampleUsageError(f"{side}: drawn with other settings ({'; '.join(diffs)}); `skip_existing` keeps "
                               "only images of the same settings: choose another `out`, or leave it out")
    tokens = old.get("tokens")
    return not settings.get("save_tokens") or (tokens == tokens_name(png) and (out / tokens).is_file())


class Prepared(NamedTuple):
    """What sampling needs, every part checked against the others."""

    models: Models
    opts: SamplingOptions
    plan: Plan
    notes: list[str]  # what was decided for the user
    precision: Precision  # what ``req.precision`` resolved to on the models' device


def prepare(req: SampleRequest | UpscaleRequest, models: Models | None = None,
            device: torch.device | None = None, show: bool = True) -> Prepared:
    """Everything before the first token: the request's own checks, the models, the precision,
    the sampling options and the plan, each checked against the others. ``device``: where to load
    the models (default: ``req.device`` resolved); ``show``: print the precision (one rank does)."""
    from vqgan_cli.runtime import resolve_device

    req.check()
    notes: list[str] = []
    models = models or load_models(req.prior, req.tokenizer, device or resolve_device(req.device), req.config, notes)
    precision = announce_precision(req.precision, models.prior.gpt.head.weight.device, training=False,
                                   key="--precision", show=show)
    opts = sampling_options(req, models)
    if isinstance(req, SampleRequest):
        plan, batch = plan_sample(req, models, notes), req.batch_size
    else:
        plan, batch = plan_upscale(req, models, notes), 1
    check_window_options(models, plan, min(batch, len(plan.seeds)), opts.guided, req.scheme("fp32"))
    return Prepared(models, opts, plan, notes, precision)


@contextlib.contextmanager
def _ranks(req: SampleRequest | UpscaleRequest, models: Models | None, what: str) -> Iterator[Runtime]:
    """This process's place in a torchrun launch (one process without one): every rank must have
    been started alike before any model work, and the process group is left on every way out (a
    process that exits inside one aborts). Models handed in (the demo) mean one process."""
    rt = setup_runtime(req.device) if models is None else Runtime(models.prior.gpt.head.weight.device)
    try:
        check_same_arguments(rt, asdict(req), what)
        yield rt
    finally:
        shutdown(rt)


def _slowest(seconds: float, rt: Runtime) -> float:
    """The longest sampling time of any rank, i.e. the launch's; being a collective, it also returns
    only once every rank has written all of its files."""
    return float(gather_rows(torch.tensor([seconds], dtype=torch.float64, device=rt.device), rt).max())


def _progress(rt: Runtime, show: bool, total: int, start: int) -> TrainProgress:
    """One bar, on rank 0, over every image of the launch (the other ranks' are counted on disk)."""
    return TrainProgress(total, start, "sample (all ranks)" if rt.distributed else "sample", show and rt.is_main)


class _OnDisk:
    """Images of this launch on disk, whichever rank wrote them: those kept (``done``) and the PNGs
    written since it started (a PNG is written last, after its sidecar and tokens). An image once
    seen is not looked at again, and the folder is looked at most every 2 s, so a 50,000-image
    launch does not stat every file after every batch."""

    def __init__(self, out: Path, names: list[str], done: set[int]):
        self.since = time.time()
        self.unseen = {i: out / f"{name}.png" for i, name in enumerate(names) if i not in done}
        self.count, self.checked = len(done), 0.0

    def __call__(self, force: bool = False) -> int:
        if force or time.monotonic() - self.checked >= 2.0:
            self.checked = time.monotonic()
            for i, png in list(self.unseen.items()):
                with contextlib.suppress(FileNotFoundError):
                    if png.stat().st_mtime >= self.since:
                        self.count += 1
                        del self.unseen[i]
        return self.count


def _grid(path: Path, files: list[Path], pictures: dict[int, torch.Tensor]) -> Path:
    """All images side by side; those not decoded here (skipped, or another rank's) are read back
    from their PNGs, which hold the same 8-bit pixels."""
    for i, file in enumerate(files):
        if i not in pictures:
            with Image.open(file) as im:
                pictures[i] = image_to_tensor(np.asarray(im.convert("RGB")))
    return save_grid(path, [torch.stack([pictures[i] for i in sorted(pictures)])])


def run_sample(req: SampleRequest, models: Models | None = None,
               on_step: StepHook | None = None) -> SampleReport:
    """The whole ``vqgan sample``: check, sample in batches, decode, write images and sidecars;
    under torchrun this rank's share of them. ``on_step``: progress hook passed to every batch
    (the demo's partial images and Stop)."""
    with _ranks(req, models, "vqgan sample") as rt:
        return _sample_share(req, models, on_step, rt)


def _sample_share(req: SampleRequest, models: Models | None, on_step: StepHook | None,
                  rt: Runtime) -> SampleReport:
    """:func:`run_sample` on this rank: its images, and on rank 0 the launch's report and grid."""
    bar_shown = models is None and on_step is None  # callers with their own models show their own progress
    models, opts, plan, notes, precision = prepare(req, models, rt.device, rt.is_main)
    hashes = checkpoint_hashes(models)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    f = models.tokenizer.factor
    h, w = plan.grid
    # the precision used, not only the one asked for: auto's images differ between CPUs
    settings = {**{k: v for k, v in asdict(req).items() if k != "skip_existing"}, "precision_used": precision.name}
    names = [f"{i:04d}{'' if c is None else f'_class{c}'}_seed{s}" for i, (s, c) in
             enumerate(zip(plan.seeds, plan.classes, strict=True))]
    # every rank looks at every image (the same refusal everywhere), and before any rank writes
    done = {i for i, name in enumerate(names) if req.skip_existing and _finished(out, name, settings, hashes)}
    barrier(rt)
    mine = my_share(len(names), rt)
    todo = [i for i in mine if i not in done]
    written = len(mine) - len(todo)
    share = f" (rank {rt.rank}'s share of {len(names)})" if rt.distributed else ""

    def record() -> None:  # what Ctrl-C or SIGTERM would leave (cli.run_guarded reports it)
        ledger.record(f"{written} of {len(mine)} image(s){share} in {out}, each with its JSON sidecar",
                      f"re-run the same command with `skip_existing` to draw the other {len(mine) - written}")

    record()
    pictures: dict[int, torch.Tensor] = {}
    seconds = 0.0
    on_disk = _OnDisk(out, names, done) if rt.distributed else None

    def launch_written(final: bool = False) -> int:  # the bar's count: every rank's images under torchrun
        return on_disk(final) if on_disk is not None else len(done) + written - len(mine) + len(todo)
    with stop_on_sigterm(), _progress(rt, bar_shown, len(names), len(done)) as bar:
        for start in range(0, len(todo), req.batch_size):
            idx = todo[start:start + req.batch_size]
            t0 = time.perf_counter()
            tokens = sample_batch(models, plan, opts, idx, req.scheme(precision.name, req.cache), on_step)
            seconds += time.perf_counter() - t0
            for k, i in enumerate(idx):
                pixels = decode_grid(models.tokenizer, tokens[k:k + 1], mode=req.decode).image[0].cpu()
                saved = _keep_tokens(out / f"{names[i]}.png", tokens[k], req.save_tokens)
                _sidecar(out / f"{names[i]}.json", {  # tokens and sidecar first, PNG last: a PNG means all are there
                    "image": f"{names[i]}.png", "index": i, "seed": plan.seeds[i], "class": plan.classes[i],
                    "size": [w * f, h * f], "grid": [h, w], "crop": list(plan.crop),
                    "settings": settings, "checkpoints": hashes, "notes": notes, **saved})
                save_png(out / f"{names[i]}.png", pixels)
                written += 1
                record()
                if req.grid and rt.is_main:
                    pictures[i] = pixels
            new = written - len(mine) + len(todo)
            bar.update(launch_written(), rt.world_size * new / max(seconds, 1e-9), "images", "")
        seconds = _slowest(seconds, rt)  # after it every rank's images are on disk
        rate = 0.0 if seconds == 0 else (len(names) - len(done)) / seconds
        bar.update(launch_written(final=True), rate, "images", "")
    if done:
        notes.append(f"`skip_existing`: {len(done)} of {len(names)} image(s) were already in {out}; "
                     f"drew the other {len(names) - len(done)}")
    if rt.distributed:
        notes.append(f"{rt.world_size} torchrun ranks drew image i on rank i % {rt.world_size}; the sampling "
                     "time is the slowest rank's")
    files = [out / f"{name}.png" for name in names]
    grid_path = None
    if req.grid and rt.is_main:
        grid_path = _grid(out / f"grid_seed{req.seed}.png", files, pictures)
    kept = int(plan.known.sum()) if plan.known is not None else 0
    n_drawn = len(plan.seeds) * (h * w - kept)
    return SampleReport(files, grid_path, (w * f, h * f), n_drawn, seconds, notes, rt.is_main)


def run_upscale(req: UpscaleRequest, models: Models | None = None,
                on_step: StepHook | None = None) -> SampleReport:
    """The whole ``vqgan upscale``: one image in, ``n`` stochastic super-resolutions out; under
    torchrun variant ``i`` on rank ``i % world``. ``on_step``: progress hook (as for :func:`run_sample`)."""
    with _ranks(req, models, "vqgan upscale") as rt:
        return _upscale_share(req, models, on_step, rt)


def _upscale_share(req: UpscaleRequest, models: Models | None, on_step: StepHook | None,
                   rt: Runtime) -> SampleReport:
    """:func:`run_upscale` on this rank: its variants; rank 0's report names all of them."""
    models, opts, plan, notes, precision = prepare(req, models, rt.device, rt.is_main)
    hashes = checkpoint_hashes(models)
    out = Path(req.out)
    f = models.tokenizer.factor
    h, w = plan.grid
    suffix = out.suffix or ".png"
    files = [out if req.n == 1 else out.with_name(f"{out.stem}_{i:02d}_seed{plan.seeds[i]}{suffix}")
             for i in range(req.n)]
    seconds = 0.0
    for i in my_share(req.n, rt):
        t0 = time.perf_counter()
        tokens = sample_batch(models, plan, opts, [i], req.scheme(precision.name), on_step)
        seconds += time.perf_counter() - t0
        pixels = decode_grid(models.tokenizer, tokens, mode=req.decode).image[0].cpu()
        path = files[i]
        saved = _keep_tokens(path, tokens[0], req.save_tokens)
        save_png(path, pixels)
        _sidecar(path.with_suffix(".json"), {
            "image": path.name, "index": i, "seed": plan.seeds[i], "size": [w * f, h * f],
            "grid": [h, w], "crop": list(plan.crop), "settings": {**asdict(req), "precision_used": precision.name},
            "checkpoints": hashes, "notes": notes, **saved})
    seconds = _slowest(seconds, rt)
    if rt.distributed:
        notes.append(f"{rt.world_size} torchrun ranks drew variant i on rank i % {rt.world_size}")
    return SampleReport(files, None, (w * f, h * f), req.n * h * w, seconds, notes, rt.is_main)
