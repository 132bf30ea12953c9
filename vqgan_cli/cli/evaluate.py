"""The ``vqgan evaluate`` sub-commands (registered in :mod:`vqgan_cli.cli`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vqgan_cli.cli.guard import run_guarded, stop
from vqgan_cli.cli.options import Device, Precision
from vqgan_cli.console import console

app = typer.Typer(no_args_is_help=True, help="Measure tokenizers (rFID, PSNR, SSIM, LPIPS, usage), "
                                             "sample folders (FID, KID, IS) and priors (bits per token).")

Out = Annotated[Path, typer.Option(help="folder for metrics.json (and per-image CSV)")]
InceptionOpt = Annotated[Path | None, typer.Option(
    "--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                                "(default: $TORCH_HOME/hub/checkpoints/)")]


def _run(job: Callable[[], Any], title: str) -> None:
    """Run one evaluation job under the CLI's error boundary (a bad value: exit 2), then print
    its table, notes, warnings and the files it wrote (under torchrun: rank 0 only)."""
    from rich.table import Table

    from vqgan_cli.faults import stop_on_sigterm

    def go() -> Any:
        try:
            with stop_on_sigterm():  # SIGTERM: "stopped by SIGTERM", exit 143 (Ctrl-C: 130), not a silent kill
                return job()
        except ValueError as e:
            raise stop(e, str(e), 2) from None

    done = run_guarded(go)
    if not done.main:
        return
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in done.result.metrics.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    for n in done.result.notes:
        console.print(f"[dim]note:[/] {n}", soft_wrap=True)
    for w in done.warnings:
        console.print(f"[yellow]{w}[/]", soft_wrap=True)
    skipped = getattr(done.result, "skipped", [])
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable file(s):[/]")
        for s in skipped:
            console.print(f"  {s}", soft_wrap=True)
    console.print(f"wrote {' and '.join(str(p) for p in done.written)}", soft_wrap=True)


@app.command("tokenizer")
def tokenizer_cmd(
    tokenizer: Annotated[str, typer.Option(help="our .safetensors, an official .ckpt or release folder")],
    data: Annotated[str, typer.Option(help="folder | file list .txt | tar shard(s) | builtin:landscapes")],
    size: Annotated[int, typer.Option(help="smaller side resized to this, then centre crop")] = 256,
    root: Annotated[str | None, typer.Option(help="base folder of relative paths in a file list")] = None,
    limit: Annotated[int | None, typer.Option(help="first N images (builtin: N held-out scenes, default 64)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 8,
    config: Annotated[Path | None, typer.Option(help="the official model YAML, when there is one")] = None,
    lpips: Annotated[str, typer.Option(help="VGG16 weights for LPIPS: torchvision (hub cache) | a path | "
                                            "none")] = "torchvision",
    fid: Annotated[bool, typer.Option(help="compute rFID (needs the Inception weights)")] = True,
    inception_weights: InceptionOpt = None,
    precision: Precision = "auto",
    device: Device = "auto",
    out: Out = Path("eval/tokenizer"),
) -> None:
    """Reconstruction quality of a tokenizer over a data set: L1, PSNR, SSIM, LPIPS, codebook usage
    and perplexity, rFID. Writes metrics.json and per_image.csv."""

    from vqgan_cli.evaluate.commands import tokenizer_job

    _run(lambda: tokenizer_job(tokenizer, data, out, size=size, root=root, limit=limit, batch_size=batch_size,
                               config=config, lpips=lpips, fid=fid, inception_weights=inception_weights,
                               precision=precision, device=device), f"tokenizer {Path(tokenizer).name} on {data}")


@app.command("samples")
def samples_cmd(
    samples: Annotated[Path, typer.Argument(help="folder of generated images (PNG/JPEG, any sizes)")],
    reference: Annotated[str, typer.Option(help="a data source (folder, list, shards, builtin:landscapes) "
                                                "or a .npz written by --save-stats")],
    size: Annotated[int | None, typer.Option(help="reference crops of this size (default: a folder "
                                                  "as stored, other sources 256)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N reference images")] = None,
    save_stats: Annotated[Path | None, typer.Option(help="save the reference statistics (.npz) to reuse")] = None,
    kid_subsets: Annotated[int, typer.Option(help="KID subsets")] = 100,
    kid_subset_size: Annotated[int | None, typer.Option(help="KID subset size (default min(1000, N))")] = None,
    is_splits: Annotated[int, typer.Option(help="Inception Score splits")] = 10,
    batch_size: Annotated[int, typer.Option(help="images per Inception pass")] = 32,
    inception_weights: InceptionOpt = None,
    device: Device = "auto",
    out: Out = Path("eval/samples"),
) -> None:
    """FID, KID and IS of generated images against a reference set; label agreement of samples drawn
    from built-in maps (read from their JSON sidecars)."""

    from vqgan_cli.evaluate.commands import samples_job

    _run(lambda: samples_job(samples, reference, out, size=size, limit=limit, save_stats=save_stats,
                             kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, is_splits=is_splits,
                             batch_size=batch_size, inception_weights=inception_weights, device=device),
         f"samples {samples} vs {reference}")


@app.command("prior")
def prior_cmd(
    prior: Annotated[str, typer.Option(help="our prior .safetensors or an official .ckpt")],
    shards: Annotated[Path, typer.Option(help="token shard folder (held out from training)")],
    limit: Annotated[int | None, typer.Option(help="first N samples")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per forward pass")] = 16,
    crop: Annotated[str | None, typer.Option(help="HxW token crop grid for sliding-window priors "
                                                  "(default: the prior's training grid)")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="score only the samples a run with "
                                                            "data.val_fraction F held out")] = None,
    config: Annotated[Path | None, typer.Option(help="the official model YAML, when there is one")] = None,
    device: Device = "auto",
    out: Out = Path("eval/prior"),
) -> None:
    """Held-out NLL (nats, bits per token) of a prior on token shards, next to the unigram entropy."""

    from vqgan_cli.evaluate.commands import prior_job

    _run(lambda: prior_job(prior, shards, out, limit=limit, batch_size=batch_size, crop=crop,
                           val_fraction=val_fraction, config=config, device=device),
         f"prior {Path(prior).name} on {shards}")
