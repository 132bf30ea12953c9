"""``encode-dataset`` and ``verify-shards``: write the token shards stage two reads, and check them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vqgan_cli.cli.app import app
from vqgan_cli.cli.guard import fail, invocation, run_guarded, say_found
from vqgan_cli.cli.options import Device, Precision, fields_of
from vqgan_cli.console import console, summary_table

if TYPE_CHECKING:
    from vqgan_cli.encode import EncodeResult


@app.command("encode-dataset", rich_help_panel="Data")
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
    workers: Annotated[str, typer.Option(
        help="loader processes decoding and resizing; auto: the usable cores less one, at most 8")] = "auto",
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
    device: Device = "auto",
    precision: Precision = "auto",
    threads: Annotated[int | None, typer.Option(
        help="torch threads of the encoder on the CPU (a busy machine: 1 avoids OpenMP stalls)")] = None,
    overwrite: Annotated[bool, typer.Option(help="delete the folder's shards and start over")] = False,
    verify: Annotated[Path | None, typer.Option(
        help="same as `vqgan verify-shards DIR` (kept for scripts written before it)")] = None,
) -> None:
    """Encode a data set into token shards for stage two. Re-running the same command resumes.
    Under torchrun (--nproc_per_node N) the ranks share the shards and write the same folder."""
    from vqgan_cli.encode import EncodeOptions, encode_dataset

    if verify is not None:
        return verify_shards_cmd(verify)
    if tokenizer is None or data is None or out is None:
        raise fail("--tokenizer, --data and --out are required (or: vqgan verify-shards DIR)", 2)
    opts = EncodeOptions(**fields_of(EncodeOptions, locals(), command=invocation("encode-dataset")))

    def go() -> EncodeResult:
        say_found(opts.tokenizer, opts.config)
        return encode_dataset(opts)

    result = run_guarded(go)
    if result.main:  # under torchrun: rank 0 speaks for the merged folder
        console.print(summary_table("encode-dataset summary", result.summary()))


@app.command("verify-shards", rich_help_panel="Data")
def verify_shards_cmd(
    folder: Annotated[Path, typer.Argument(help="a folder written by encode-dataset")],
) -> None:
    """Check every shard of FOLDER against its manifest (counts, checksums, readable samples)."""
    from vqgan_cli.shards.format import MANIFEST
    from vqgan_cli.shards.verify import verify_folder

    if not (folder / MANIFEST).is_file():
        raise fail(f"{folder}: no {MANIFEST}; not a token shard folder written by encode-dataset", 2)
    report = run_guarded(lambda: verify_folder(folder))
    for problem in report.problems:
        console.print(f"[red]{problem}[/]")
    verdict = "[green]all good[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
    console.print(f"{folder}: {report.shards} shards, {report.samples} samples, {verdict}")
    if not report.ok:
        raise typer.Exit(1)
