"""The ``vqgan`` command line: each command parses, delegates to one library function, reports.

Exit codes: 0 success; 1 a run that failed (bad data, non-finite losses, an altered shard, a
full or read-only disk and other operating-system errors); 2 usage and recipe errors (bad
options, recipe problems, missing files or weights); 128+N when signal N stopped a run after
saving what it had finished. ``--debug`` (or VQGAN_DEBUG=1) adds the traceback to a message.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from vqgan_cli.console import console
from vqgan_cli.sample.choices import DEFAULT_MEMORY_MIB, DEFAULT_WINDOW

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Taming Transformers: train VQGAN tokenizers and transformer priors, sample images.")

T = TypeVar("T")
_debug = False  # --debug: tracebacks of caught errors are shown

SetOption = Annotated[list[str], typer.Option(
    "--set", help="override a recipe value, e.g. --set train.max_steps=100 (repeatable)")]


def _version(value: bool) -> None:
    if value:
        from vqgan_cli import __version__

        console.print(f"vqgan {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (also "
                                                         "VQGAN_DEBUG=1)")] = False,
) -> None:
    """Taming Transformers: train VQGAN tokenizers and transformer priors, sample images."""
    global _debug
    _debug = debug


def _fail(message: str, code: int) -> typer.Exit:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # paths stay whole, copy-pasteable
    return typer.Exit(code)


def _stop(e: BaseException, message: str, code: int) -> typer.Exit:
    """_fail for a caught error; with --debug or VQGAN_DEBUG=1 its traceback comes first."""
    if _debug or os.environ.get("VQGAN_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e)
    return _fail(message, code)


def _without_worker_traceback(e: Exception) -> str:
    """A DataLoader worker's error arrives with the worker's traceback in its message: keep
    only the message (the traceback is for --debug)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    lines = text.splitlines()
    heads = [i for i, ln in enumerate(lines) if ln.startswith(f"{type(e).__module__}.{type(e).__name__}: ")
             or ln.startswith(f"{type(e).__name__}: ")]
    return "\n".join(lines[heads[-1]:]).split(": ", 1)[1] if heads else text


def run_guarded(fn: Callable[[], T], setting: str = "--out") -> T:
    """The one error boundary of every command: the library's expected errors and the operating
    system's (no space, read-only, permissions, I/O) become one message with an exit code, no
    traceback; ``setting`` names the option that chooses the output folder."""
    from vqgan_cli import faults
    from vqgan_cli.checkpoints.format import CheckpointError
    from vqgan_cli.config import ConfigError
    from vqgan_cli.data import DataError
    from vqgan_cli.encode import EncodeUsageError
    from vqgan_cli.models.lpips import PerceptualWeightsMissing
    from vqgan_cli.shards.format import ShardError
    from vqgan_cli.train.loop import TrainingError

    faults.reset_ledger()
    default = faults.Ledger()

    def kept() -> str:  # only once the command has recorded something
        if (faults.ledger.kept, faults.ledger.resume) == (default.kept, default.resume):
            return ""
        return f"\n  kept: {faults.ledger.kept}\n  to continue: {faults.ledger.resume}"

    try:
        return fn()
    except ConfigError as e:
        raise _stop(e, str(e), 2) from None
    except (PerceptualWeightsMissing, CheckpointError, FileNotFoundError, EncodeUsageError) as e:
        raise _stop(e, str(e), 2) from None
    except (DataError, TrainingError, ShardError) as e:
        raise _stop(e, _without_worker_traceback(e) + kept(), 1) from None
    except OSError as e:
        raise _stop(e, faults.explain(e, setting), 1) from None
    except KeyboardInterrupt as e:
        raise _stop(e, "interrupted (Ctrl-C)" + kept(), 130) from None
    except faults.Stopped as e:
        raise _stop(e, str(e) + kept(), e.exit_code) from None


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/quickstart.yaml")],
    overrides: SetOption = None,  # type: ignore[assignment]
    overwrite: Annotated[bool, typer.Option(help="start the run over instead of resuming it")] = False,
) -> None:
    """Train a VQGAN tokenizer (stage one). Re-running the same command resumes the run."""
    from vqgan_cli.config import load_recipe
    from vqgan_cli.train.tokenizer import TokenizerRecipe, train_tokenizer

    def go() -> None:
        r = load_recipe(TokenizerRecipe, recipe, overrides or [])
        _check_perceptual(r)
        result = train_tokenizer(r, recipe.stem, overwrite=overwrite)
        if result.stopped_by_signal:
            raise typer.Exit(result.stopped_by_signal)

    run_guarded(go, "train.out_dir")


@app.command("train-prior")
def train_prior_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/quickstart_prior.yaml")],
    overrides: SetOption = None,  # type: ignore[assignment]
    overwrite: Annotated[bool, typer.Option(help="start the run over instead of resuming it")] = False,
) -> None:
    """Train the transformer prior (stage two) on token shards. Re-running the same command resumes."""
    from vqgan_cli.config import load_recipe
    from vqgan_cli.train.prior import PriorRecipe, train_prior

    def go() -> None:
        r = load_recipe(PriorRecipe, recipe, overrides or [])
        result = train_prior(r, recipe.stem, overwrite=overwrite)
        if result.stopped_by_signal:
            raise typer.Exit(result.stopped_by_signal)

    run_guarded(go, "train.out_dir")


def _say_found(name: str | Path, config: str | Path | None) -> None:
    """Name what a run folder or a .ckpt's ../configs/ resolved to (checkpoint, YAML)."""
    from vqgan_cli.checkpoints.resolve import resolve_model

    note = resolve_model(name, str(config) if config else None).note
    if note:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)


@app.command("reconstruct")
def reconstruct_cmd(
    images: Annotated[list[Path], typer.Argument(help="image files of any size")],
    tokenizer: Annotated[str, typer.Option(help="our .safetensors checkpoint or an official .ckpt")],
    out: Annotated[Path, typer.Option(help="folder for the <stem>_rec.png files")] = Path("reconstructions"),
    config: Annotated[Path | None, typer.Option(help="the official model YAML, when there is one")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Reconstruct images through a tokenizer; print PSNR and SSIM per image and codebook usage."""
    from rich.table import Table

    from vqgan_cli.checkpoints.load import load_tokenizer
    from vqgan_cli.evaluate.reconstruct import reconstruct_files
    from vqgan_cli.runtime import resolve_device

    def go() -> None:
        dev = resolve_device(device)
        _say_found(tokenizer, config)
        model = load_tokenizer(tokenizer, config=str(config) if config else None).to(dev)
        report = reconstruct_files(model, images, out, dev)
        table = Table(title=f"reconstructions in {out}")
        for col in ("image", "PSNR dB", "SSIM", "written"):
            table.add_column(col)
        for item in report.items:
            table.add_row(item.source.name, f"{item.psnr:.2f}", f"{item.ssim:.4f}", item.output.name)
        table.add_row("[bold]mean", f"{report.mean_psnr:.2f}", f"{report.mean_ssim:.4f}", "")
        console.print(table)
        console.print(f"codebook usage: {report.codebook_usage:.1%} of "
                      f"{model.config.quantizer.n_embed} codes")
        for msg in report.skipped:
            console.print(f"[yellow]skipped[/] {msg}")

    run_guarded(go)


@app.command("encode-dataset")
def encode_dataset_cmd(
    tokenizer: Annotated[str | None, typer.Option(
        help="image tokenizer: our .safetensors, an official .ckpt or its run folder")] = None,
    config: Annotated[str | None, typer.Option(
        help="an official .ckpt's YAML (default: configs/*.yaml of its run folder)")] = None,
    data: Annotated[str | None, typer.Option(
        help="folder | file list .txt | tar shard(s) | builtin:landscapes")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for shard-NNNNNN.tar and manifest.json")] = None,
    size: Annotated[int | None, typer.Option(
        help="smaller side resized to this (default: the tokenizer's training resolution)")] = None,
    keep_aspect: Annotated[bool, typer.Option(
        help="keep the aspect ratio (sides cut to a multiple of f) instead of a centre square")] = False,
    batch_size: Annotated[int, typer.Option(help="images per encoder forward")] = 32,
    workers: Annotated[int, typer.Option(help="loader processes decoding and resizing")] = 2,
    shard_size: Annotated[int, typer.Option(help="input images per shard")] = 1000,
    flip_copies: Annotated[bool, typer.Option(help="also store the tokens of each mirrored image")] = False,
    limit: Annotated[int | None, typer.Option(help="first N images only (builtin: N scenes)")] = None,
    root: Annotated[str | None, typer.Option(help="base folder of relative paths in a file list")] = None,
    cond: Annotated[str | None, typer.Option(
        help="seg | depth (both with --cond-tokenizer) | labels (raw label maps on the token grid) "
             "| lowres:S")] = None,
    cond_tokenizer: Annotated[str | None, typer.Option(
        help="tokenizer of the conditioning maps (or of the low-res copy)")] = None,
    cond_data: Annotated[str | None, typer.Option(
        help="folder of maps paired with the images by file stem")] = None,
    n_labels: Annotated[int | None, typer.Option(
        help="label vocabulary of --cond labels on map files")] = None,
    label_shift: Annotated[int, typer.Option(help="added to map labels mod 256 (COCO: 1)")] = 0,
    labels: Annotated[str | None, typer.Option(
        help="class labels: 'folders' (parent folder names) or a CSV with id and label columns")] = None,
    missing: Annotated[str, typer.Option(help="an image without map or label: stop | skip")] = "stop",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int | None, typer.Option(
        help="torch threads of the encoder on the CPU (a busy machine: 1 avoids OpenMP stalls)")] = None,
    overwrite: Annotated[bool, typer.Option(help="delete the folder's shards and start over")] = False,
    verify: Annotated[Path | None, typer.Option(
        help="check every shard of this folder against its manifest, then exit")] = None,
) -> None:
    """Encode a data set into token shards for stage two. Re-running the same command resumes."""
    import shlex

    from vqgan_cli.console import summary_table
    from vqgan_cli.encode import EncodeOptions, EncodeUsageError, encode_dataset, verify_shards

    def go() -> None:
        if verify is not None:
            report = verify_shards(verify)
            for p in report.problems:
                console.print(f"[red]{p}[/]")
            verdict = "[green]all good[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
            console.print(f"{verify}: {report.shards} shards, {report.samples} samples, {verdict}")
            if not report.ok:
                raise typer.Exit(1)
            return
        if tokenizer is None or data is None or out is None:
            raise EncodeUsageError("--tokenizer, --data and --out are required (or --verify DIR)")
        _say_found(tokenizer, config)
        r = encode_dataset(EncodeOptions(
            tokenizer=tokenizer, data=data, out=str(out), config=config, size=size, keep_aspect=keep_aspect,
            batch_size=batch_size, workers=workers, shard_size=shard_size, flip_copies=flip_copies,
            limit=limit, root=root, cond=cond, cond_tokenizer=cond_tokenizer, cond_data=cond_data,
            n_labels=n_labels, label_shift=label_shift, labels=labels, missing=missing, device=device,
            threads=threads, overwrite=overwrite,
            command=shlex.join(["vqgan", *sys.argv[1:]]) if "encode-dataset" in sys.argv else None))
        console.print(summary_table("encode-dataset summary", {
            "folder": str(r.out), "shards": r.shards, "samples": r.samples, "skipped inputs": r.skipped,
            "grid": "x".join(map(str, r.grid)) if r.grid else "varies", "vocab size": r.vocab_size,
            "encoded now": r.encoded_now, "images/s": r.images_per_s, "time": f"{r.seconds:.1f} s"}))

    run_guarded(go)


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(
        help="an official .ckpt (VQModel, GumbelVQ, cond stage or transformer) or its run folder")],
    out: Annotated[Path, typer.Argument(help="where to write our .safetensors checkpoint (--to diffusers: a folder)")],
    config: Annotated[Path | None, typer.Option(help="the model's YAML shipped beside the .ckpt")] = None,
    keep_training_state: Annotated[bool, typer.Option(
        help="also keep loss.* weights and optimiser states (in <out>.training.safetensors)")] = False,
    n_head: Annotated[int | None, typer.Option(help="transformer heads (not readable from shapes)")] = None,
    cond_kind: Annotated[str | None, typer.Option(help="sos | class | spatial | coord, without a YAML")] = None,
    n_classes: Annotated[int | None, typer.Option(help="classes of a class-conditional transformer")] = None,
    resolution: Annotated[int | None, typer.Option(help="training resolution (places attention); default 256")] = None,
    to: Annotated[str, typer.Option(help="ours | diffusers (a tokenizer as a diffusers VQModel folder)")] = "ours",
) -> None:
    """Convert an official checkpoint to our format, without running any code from the pickle."""
    from vqgan_cli.checkpoints.load import convert_checkpoint, load_tokenizer

    def go() -> None:
        if to not in ("ours", "diffusers"):
            raise _fail(f"--to: ours or diffusers, got {to!r}", 2)
        if to == "diffusers":
            from vqgan_cli.checkpoints.diffusers import export_diffusers

            tok = load_tokenizer(src, str(config) if config else None, resolution)
            console.print(f"wrote {export_diffusers(tok, out)} (diffusers.VQModel.from_pretrained reads it)")
            return
        _say_found(src, config)
        path = convert_checkpoint(src, out, str(config) if config else None, keep_training_state,
                                  n_head=n_head, cond_kind=cond_kind, n_classes=n_classes, resolution=resolution)
        console.print(f"wrote {path}")
        for extra in sorted(path.parent.glob(path.name.removesuffix(".safetensors") + ".*.safetensors")):
            console.print(f"wrote {extra}")

    run_guarded(go, "OUT argument")


@app.command("info")
def info_cmd(
    path: Annotated[str, typer.Argument(help="a checkpoint (.safetensors or official .ckpt) or a run folder")],
    config: Annotated[str | None, typer.Option(
        help="an official .ckpt's YAML (default: configs/*-project.yaml of its run folder)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """What a checkpoint or run folder is (kind, architecture, codebook, conditioning) and the
    commands that take it."""
    import json

    from rich.table import Table

    from vqgan_cli.checkpoints.info import describe, render

    def go() -> None:
        info = describe(path, config)
        if as_json:
            print(json.dumps(info, indent=2))
            return
        table = Table(title=str(path), show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for k, v in render(info):
            table.add_row(k, v)
        console.print(table)

    run_guarded(go)


@app.command("plot")
def plot_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (one holding metrics.jsonl)")],
    out: Annotated[Path | None, typer.Option(help="where to write the PNG (default RUN_DIR/curves.png)")] = None,
) -> None:
    """Draw a run's metrics.jsonl as curves.png: losses, quality, codebook use, adaptive weight, lr."""
    from vqgan_cli.train.curves import write_curves

    def go() -> None:
        try:
            path = write_curves(run_dir, out)
        except ImportError as e:
            raise _fail(str(e), 2) from None
        if path is None:
            raise _fail(f"{run_dir}: no metrics.jsonl records to draw", 2)
        console.print(f"wrote {path}")

    run_guarded(go)


WINDOW_HELP = ("beyond the crop: exact (the reference's window for every token, batched) | fast "
               "(one cached window per tile of tokens: much faster, shifts each token's window; "
               "see the README)")
SEGMENT_HELP = "--window fast: tokens per row of a tile (1 .. crop width/2 + 1; default the widest)"
MEMORY_HELP = (f"MiB for window batches and fast's caches (default {DEFAULT_MEMORY_MIB:g}); "
               "an error before sampling says when it is too small")


def _sample_guarded(fn: Callable[[], T]) -> T:
    """run_guarded, plus sample/upscale's own usage errors (exit 2, before any sampling)."""
    from vqgan_cli.sample.inputs import SampleUsageError
    from vqgan_cli.sample.tokens import SamplingError

    def inner() -> T:
        try:
            return fn()
        except (SampleUsageError, SamplingError) as e:
            raise _fail(str(e), 2) from None

    return run_guarded(inner)


def _sample_summary(title: str, r) -> None:  # noqa: ANN001 - a generate.SampleReport
    from vqgan_cli.console import summary_table

    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(summary_table(title, {
        "images": len(r.files), "first": str(r.files[0]) if r.files else "-",
        "grid": str(r.grid) if r.grid else "-", "size": f"{r.size[0]}x{r.size[1]}",
        "tokens drawn": r.tokens, "sampling time": f"{r.seconds:.1f} s",
        "tokens/s": f"{r.tokens / max(r.seconds, 1e-9):.0f}"}))


@app.command("sample")
def sample_cmd(
    prior: Annotated[str, typer.Option(
        help="prior checkpoint (.safetensors), an official transformer .ckpt or its run folder")],
    tokenizer: Annotated[str | None, typer.Option(
        help="image tokenizer (default: the one the prior records)")] = None,
    config: Annotated[str | None, typer.Option(
        help="an official .ckpt's YAML (default: configs/*-project.yaml of its run folder)")] = None,
    n: Annotated[int, typer.Option("--n", help="images to draw (per class with several --class)")] = 4,
    batch_size: Annotated[int, typer.Option(help="images sampled together")] = 4,
    seed: Annotated[int, typer.Option(help="image i uses seed + i")] = 0,
    temperature: Annotated[float, typer.Option(help="logits are divided by it (> 0)")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option(
        help="keep the smallest set with this much probability")] = None,
    cfg_scale: Annotated[float, typer.Option(
        help="classifier-free guidance (priors trained with conditioning dropout)")] = 1.0,
    classes: Annotated[list[int] | None, typer.Option("--class", help="class index (repeatable)")] = None,
    cond: Annotated[str | None, typer.Option(
        help="conditioning map: segmentation/depth PNG, or builtin:landscapes:SEED")] = None,
    size: Annotated[str | None, typer.Option(
        help="WxH pixels; beyond the training crop a sliding window is used")] = None,
    init: Annotated[str | None, typer.Option(help="image to complete")] = None,
    keep: Annotated[float, typer.Option(help="with --init: the top fraction of rows kept")] = 0.5,
    window: Annotated[str, typer.Option(help=WINDOW_HELP)] = DEFAULT_WINDOW,
    segment: Annotated[int | None, typer.Option(help=SEGMENT_HELP)] = None,
    window_memory: Annotated[float | None, typer.Option(help=MEMORY_HELP)] = None,
    cache: Annotated[bool, typer.Option(
        help="key/value cache at the crop size (--no-cache: full forward per token)")] = True,
    precision: Annotated[str, typer.Option(
        help="fp32 (reproducible) | bf16 (faster windows on CPUs with bf16)")] = "fp32",
    decode: Annotated[str, typer.Option(help="auto | whole | tiles")] = "auto",
    out: Annotated[Path, typer.Option(help="folder for the PNGs and their JSON sidecars")] = Path("samples"),
    grid: Annotated[bool, typer.Option(help="also save all images side by side")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    skip_existing: Annotated[bool, typer.Option(
        help="draw only the images not yet in --out (after Ctrl-C: the same result as one run)")] = False,
) -> None:
    """Draw images from a prior: unconditional, class, map-conditioned, completion, any size."""
    import shlex

    from vqgan_cli.sample.run import SampleRequest, run_sample

    def go() -> None:
        r = run_sample(SampleRequest(
            prior=prior, tokenizer=tokenizer, config=config, n=n, batch_size=batch_size, seed=seed,
            temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
            classes=list(classes or []), cond=cond, size=size, init=init, keep=keep, window=window,
            segment=segment, window_memory=window_memory, cache=cache, precision=precision,
            decode=decode, out=str(out), grid=grid, device=device,
            skip_existing=skip_existing,  # not recorded: it changes which images are drawn, not how
            command=shlex.join(["vqgan", *(a for a in sys.argv[1:] if a != "--skip-existing")])
            if "sample" in sys.argv else None))
        _sample_summary(f"samples in {out}", r)

    _sample_guarded(go)


@app.command("upscale")
def upscale_cmd(
    image: Annotated[Path, typer.Argument(help="the low-resolution image")],
    prior: Annotated[str, typer.Option(help="a prior trained on encode-dataset --cond lowres:S shards")],
    scale: Annotated[int, typer.Option(help="output size = S x input size")] = 4,
    out: Annotated[Path, typer.Option(
        help="output PNG (with --n > 1: OUT_ii_seedS.png)")] = Path("upscaled.png"),
    n: Annotated[int, typer.Option("--n", help="variants to draw")] = 1,
    seed: Annotated[int, typer.Option(help="variant i uses seed + i")] = 0,
    temperature: Annotated[float, typer.Option(help="logits are divided by it (> 0)")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option(
        help="keep the smallest set with this much probability")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="image tokenizer (default: the one the prior records)")] = None,
    config: Annotated[str | None, typer.Option(
        help="the YAML of an official .ckpt kept outside its run folder")] = None,
    window: Annotated[str, typer.Option(help=WINDOW_HELP)] = DEFAULT_WINDOW,
    segment: Annotated[int | None, typer.Option(help=SEGMENT_HELP)] = None,
    window_memory: Annotated[float | None, typer.Option(help=MEMORY_HELP)] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16")] = "fp32",
    decode: Annotated[str, typer.Option(help="auto | whole | tiles")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Stochastic super-resolution: sample a detailed image S times larger than IMAGE."""
    import shlex

    from vqgan_cli.sample.run import UpscaleRequest, run_upscale

    def go() -> None:
        r = run_upscale(UpscaleRequest(
            prior=prior, image=str(image), scale=scale, out=str(out), n=n, seed=seed,
            temperature=temperature, top_k=top_k, top_p=top_p, tokenizer=tokenizer, config=config,
            window=window, segment=segment, window_memory=window_memory, precision=precision, decode=decode,
            device=device, command=shlex.join(["vqgan", *sys.argv[1:]]) if "upscale" in sys.argv else None))
        _sample_summary(f"upscaled {image}", r)

    _sample_guarded(go)


def _check_perceptual(r) -> None:  # noqa: ANN001 - a TokenizerRecipe
    """Fail before any heavy work when the LPIPS backbone weights are missing."""
    from vqgan_cli.models.lpips import check_lpips_available

    if r.model.modality == "image" and r.loss.perceptual_weight > 0:
        check_lpips_available(r.loss.lpips_backbone)


def _register_evaluate() -> None:
    from vqgan_cli.cli.evaluate import app as evaluate_app

    app.add_typer(evaluate_app, name="evaluate")


_register_evaluate()


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `vqgan ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
