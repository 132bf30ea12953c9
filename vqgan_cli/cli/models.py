"""``reconstruct``, ``convert`` and ``info``: look at, convert and try a model file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vqgan_cli.cli.app import app
from vqgan_cli.cli.guard import fail, run_guarded, say_found
from vqgan_cli.cli.options import Device, OfficialYaml
from vqgan_cli.console import console, print_rows


@app.command("reconstruct", rich_help_panel="Models")
def reconstruct_cmd(
    images: Annotated[list[Path], typer.Argument(help="image files of any size")],
    tokenizer: Annotated[str, typer.Option(help="our .safetensors checkpoint or an official .ckpt")],
    out: Annotated[Path, typer.Option(help="folder for the <stem>_rec.png files")] = Path("reconstructions"),
    config: Annotated[Path | None, typer.Option(help="the official model YAML, when there is one")] = None,
    device: Device = "auto",
) -> None:
    """Reconstruct images through a tokenizer; print PSNR and SSIM per image and codebook usage."""
    from vqgan_cli.evaluate.reconstruct import ReconstructReport, reconstruct_paths

    def go() -> ReconstructReport:
        say_found(tokenizer, config)
        return reconstruct_paths(tokenizer, images, out, device, config)

    report = run_guarded(go)
    print_rows(f"reconstructions in {out}", report.table())
    console.print(report.usage_line())
    for msg in report.skipped:
        console.print(f"[yellow]skipped[/] {msg}")


@app.command("convert", rich_help_panel="Models")
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
    from vqgan_cli.checkpoints.convert import convert

    if to not in ("ours", "diffusers"):
        raise fail(f"--to: ours or diffusers, got {to!r}", 2)
    def go() -> list[Path]:
        if to == "ours":
            say_found(src, config)
        return convert(src, out, str(config) if config else None, keep_training_state, to=to, n_head=n_head,
                       cond_kind=cond_kind, n_classes=n_classes, resolution=resolution)

    written = run_guarded(go, "OUT argument")
    for path in written:
        console.print(f"wrote {path}")


@app.command("info", rich_help_panel="Models")
def info_cmd(
    path: Annotated[str, typer.Argument(help="a checkpoint (.safetensors or official .ckpt) or a run folder")],
    config: OfficialYaml = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """What a checkpoint or run folder is (kind, architecture, codebook, conditioning) and the
    commands that take it."""
    from vqgan_cli.checkpoints.info import describe, render

    info = run_guarded(lambda: describe(path, config))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print_rows(str(path), [("field", "value"), *render(info)], header=False)
