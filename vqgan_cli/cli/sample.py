"""``sample`` and ``upscale``: draw tokens from a prior and write the images with their sidecars."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vqgan_cli.cli.app import app
from vqgan_cli.cli.guard import fail, invocation, note, run_guarded
from vqgan_cli.cli.options import (
    BandRows,
    Compile,
    Decode,
    Device,
    OfficialYaml,
    Precision,
    SaveTokens,
    Seed,
    Segment,
    Temperature,
    Tokenizer,
    TopK,
    TopP,
    Window,
    WindowMemory,
    fields_of,
)
from vqgan_cli.console import console, summary_table
from vqgan_cli.sample.choices import DEFAULT_WINDOW

if TYPE_CHECKING:
    from vqgan_cli.sample.run import SampleReport


def _report(title: str, r: SampleReport) -> None:
    if not r.shown:  # a torchrun rank other than 0: rank 0 speaks for the launch
        return
    for text in r.notes:
        note(text)
    console.print(summary_table(title, {
        "images": len(r.files), "first": str(r.files[0]) if r.files else "-",
        "grid": str(r.grid) if r.grid else "-", "size": f"{r.size[0]}x{r.size[1]}",
        "tokens drawn": r.tokens, "sampling time": f"{r.seconds:.1f} s",
        "tokens/s": f"{r.tokens / max(r.seconds, 1e-9):.0f}"}))


@app.command("sample", rich_help_panel="Sample")
def sample_cmd(
    prior: Annotated[str, typer.Option(
        help="prior checkpoint (.safetensors), an official transformer .ckpt or its run folder")],
    tokenizer: Tokenizer = None,
    config: OfficialYaml = None,
    n: Annotated[int, typer.Option("--n", "--num-images", help=(
        "images to draw (per class with several --class); under torchrun write --num-images, which "
        "torchrun does not mistake for its own options"))] = 4,
    batch_size: Annotated[int, typer.Option(help="images sampled together")] = 4,
    seed: Seed = 0,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    cfg_scale: Annotated[float, typer.Option(
        help="classifier-free guidance (priors trained with conditioning dropout)")] = 1.0,
    classes: Annotated[list[int] | None, typer.Option("--class", help="class index (repeatable)")] = None,
    cond: Annotated[str | None, typer.Option(
        help="conditioning map: segmentation/depth PNG, or builtin:landscapes:SEED")] = None,
    size: Annotated[str | None, typer.Option(
        help="WxH pixels; beyond the training crop a sliding window is used")] = None,
    init: Annotated[str | None, typer.Option(help="image to complete")] = None,
    keep: Annotated[float, typer.Option(help="with --init: the top fraction of rows kept")] = 0.5,
    window: Window = DEFAULT_WINDOW,
    segment: Segment = None,
    band_rows: BandRows = None,
    window_memory: WindowMemory = None,
    cache: Annotated[bool, typer.Option(
        help="key/value cache at the crop size (--no-cache: full forward per token)")] = True,
    compile: Compile = False,
    precision: Precision = "auto",
    decode: Decode = "auto",
    save_tokens: SaveTokens = False,
    out: Annotated[Path, typer.Option(help="folder for the PNGs and their JSON sidecars")] = Path("samples"),
    grid: Annotated[bool, typer.Option(help="also save all images side by side")] = False,
    device: Device = "auto",
    skip_existing: Annotated[bool, typer.Option(
        help="draw only the images not yet in --out (after Ctrl-C: the same result as one run); with "
             "--save-tokens, images without their tokens are drawn again")] = False,
) -> None:
    """Draw images from a prior: unconditional, class, map-conditioned, completion, any size."""
    from vqgan_cli.sample.request import SampleRequest
    from vqgan_cli.sample.run import run_sample

    # --skip-existing is not recorded: it changes which images are drawn, not how
    req = SampleRequest(**fields_of(SampleRequest, locals(), command=invocation("sample", ("--skip-existing",))))
    _report(f"samples in {out}", run_guarded(lambda: run_sample(req)))


@app.command("upscale", rich_help_panel="Sample")
def upscale_cmd(
    image: Annotated[Path, typer.Argument(help="the low-resolution image")],
    prior: Annotated[str, typer.Option(help="a prior trained on encode-dataset --cond lowres:S shards")],
    scale: Annotated[int, typer.Option(help="output size = S x input size")] = 4,
    out: Annotated[Path, typer.Option(
        help="output PNG (with --n > 1: OUT_ii_seedS.png)")] = Path("upscaled.png"),
    n: Annotated[int, typer.Option("--n", "--num-images", help=(
        "variants to draw (under torchrun write --num-images)"))] = 1,
    seed: Seed = 0,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    tokenizer: Tokenizer = None,
    config: Annotated[str | None, typer.Option(
        help="the YAML of an official .ckpt kept outside its run folder")] = None,
    window: Window = DEFAULT_WINDOW,
    segment: Segment = None,
    band_rows: BandRows = None,
    window_memory: WindowMemory = None,
    precision: Precision = "auto",
    decode: Decode = "auto",
    save_tokens: SaveTokens = False,
    device: Device = "auto",
) -> None:
    """Stochastic super-resolution: sample a detailed image S times larger than IMAGE."""
    from vqgan_cli.sample.request import UpscaleRequest
    from vqgan_cli.sample.run import run_upscale

    req = UpscaleRequest(**fields_of(UpscaleRequest, locals(), command=invocation("upscale")))
    _report(f"upscaled {image}", run_guarded(lambda: run_upscale(req)))


@app.command("demo", rich_help_panel="Sample")
def demo_cmd(
    prior: Annotated[str, typer.Option(help="prior checkpoint (.safetensors), an official .ckpt or its run folder")],
    tokenizer: Tokenizer = None,
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the page")] = 7860,
    device: Device = "auto",
) -> None:
    """A local web page: pick, upload or paint a map, press Sample, watch the image appear."""
    from vqgan_cli.demo import INSTALL_HINT, gradio_available, serve

    if not gradio_available():
        raise fail(INSTALL_HINT, 2)
    run_guarded(lambda: serve(prior, tokenizer, host, port, device))
