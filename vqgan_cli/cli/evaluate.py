"""The ``vqgan evaluate`` sub-commands (registered in :mod:`vqgan_cli.cli`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from vqgan_cli.console import console

app = typer.Typer(no_args_is_help=True, help="Measure tokenizers (rFID, PSNR, SSIM, LPIPS, usage), "
                                             "sample folders (FID, KID, IS) and priors (bits per token).")

Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
Out = Annotated[Path, typer.Option(help="folder for metrics.json (and per-image CSV)")]
InceptionOpt = Annotated[Path | None, typer.Option(
    "--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                                "(default: $TORCH_HOME/hub/checkpoints/)")]


def _guard(fn, setting: str = "--out") -> None:  # noqa: ANN001
    from vqgan_cli.cli import _stop, run_guarded
    from vqgan_cli.evaluate.inception import EvaluationError

    def go() -> None:
        try:
            fn()
        except (EvaluationError, ValueError) as e:
            raise _stop(e, str(e), 2) from None

    run_guarded(go, setting)


def _write(out: Path, payload: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    if rows:
        with open(out / "per_image.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _report(out: Path, title: str, res: Any, rows: list[dict[str, Any]] | None = None) -> None:
    """metrics.json (and per_image.csv), the summary table, and where the files went."""
    _write(out, res.to_json(), rows)
    _table(title, res.metrics, res.notes, getattr(res, "skipped", []))
    wrote = f"{out / 'metrics.json'}" + (f" and {out / 'per_image.csv'}" if rows else "")
    console.print(f"wrote {wrote}", soft_wrap=True)


def _table(title: str, metrics: dict[str, float], notes: list[str], skipped: list[str]) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    for n in notes:
        console.print(f"[dim]note:[/] {n}", soft_wrap=True)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable file(s):[/]")
        for s in skipped:
            console.print(f"  {s}", soft_wrap=True)


def _precision(precision: str, dev) -> str:  # noqa: ANN001
    import torch

    if precision == "auto":
        return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


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
    precision: Annotated[str, typer.Option(help="auto (bf16 tokenizer on CUDA, metrics fp32) | fp32 | bf16")] = "auto",
    device: Device = "auto",
    out: Out = Path("eval/tokenizer"),
) -> None:
    """Reconstruction quality of a tokenizer over a data set: L1, PSNR, SSIM, LPIPS, codebook usage
    and perplexity, rFID. Writes metrics.json and per_image.csv."""

    def go() -> None:
        from vqgan_cli.checkpoints.load import load_tokenizer
        from vqgan_cli.evaluate.inception import Inception, check_inception_weights
        from vqgan_cli.evaluate.tokenizer import evaluate_tokenizer
        from vqgan_cli.models.lpips import PerceptualWeightsMissing, build_lpips, check_lpips_available
        from vqgan_cli.runtime import resolve_device

        if fid:  # before any work
            check_inception_weights(inception_weights)
        dev = resolve_device(device)
        model = load_tokenizer(tokenizer, config=str(config) if config else None)
        perceptual = None
        if lpips != "none" and model.config.modality == "image":
            try:
                check_lpips_available(lpips)
                perceptual = build_lpips(lpips).to(dev).eval()
            except PerceptualWeightsMissing as e:
                console.print(f"[yellow]LPIPS skipped:[/] {str(e).splitlines()[0]} {str(e).splitlines()[2]}",
                              soft_wrap=True)
        inc = Inception(inception_weights, dev) if fid else None
        res = evaluate_tokenizer(model, data, size, limit, batch_size, dev, _precision(precision, dev),
                                 perceptual, inc, progress=True, root=root)
        res.settings.update(tokenizer=tokenizer, lpips=lpips if perceptual is not None else None)
        _report(out, f"tokenizer {Path(tokenizer).name} on {data}", res, res.per_image)

    _guard(go)


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

    def go() -> None:
        from vqgan_cli.evaluate.inception import Inception, check_inception_weights
        from vqgan_cli.evaluate.samples import evaluate_samples
        from vqgan_cli.runtime import resolve_device

        check_inception_weights(inception_weights)
        if save_stats is not None and reference.endswith(".npz"):
            raise ValueError("--save-stats: the reference is already a statistics file")
        inc = Inception(inception_weights, resolve_device(device))
        res = evaluate_samples(samples, reference, inc, size=size, limit=limit, batch_size=batch_size,
                               kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                               is_splits=is_splits, save_stats_to=save_stats, progress=True)
        _report(out, f"samples {samples} vs {reference}", res)

    _guard(go)


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

    def go() -> None:
        from vqgan_cli.checkpoints.load import load_prior
        from vqgan_cli.evaluate.prior import evaluate_prior
        from vqgan_cli.runtime import resolve_device

        c = None
        if crop is not None:
            try:
                c = tuple(int(v) for v in crop.lower().split("x"))
                assert len(c) == 2 and min(c) > 0
            except (ValueError, AssertionError):
                raise ValueError(f"--crop: expected HxW in tokens, e.g. 16x16, got {crop!r}") from None
        model = load_prior(prior, config=str(config) if config else None)
        res = evaluate_prior(model, shards, limit=limit, batch_size=batch_size,
                             device=resolve_device(device), crop=c,
                             val_fraction=val_fraction, progress=True)
        res.settings.update(prior=prior)
        _report(out, f"prior {Path(prior).name} on {shards}", res)

    _guard(go)
