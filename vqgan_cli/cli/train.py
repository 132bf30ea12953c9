"""``train-tokenizer``, ``train-prior`` and ``plot``: the two training stages and their curves."""

# No `from __future__ import annotations`: the two train commands are made by one function, and
# Typer reads their annotations, which name that function's arguments, at definition time.

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vqgan_cli.cli.app import app
from vqgan_cli.cli.guard import fail, run_guarded
from vqgan_cli.cli.options import Overrides, Overwrite
from vqgan_cli.console import console


def _stage_command(name: str, summary: str, example: str, train: Callable[[Path, list[str], bool], Any]) -> None:
    """Register ``vqgan NAME RECIPE [--set k=v] [--overwrite]``; re-running it resumes the run."""

    def command(recipe: Annotated[Path, typer.Argument(help=f"recipe YAML, e.g. {example}")],
                overrides: Overrides = None, overwrite: Overwrite = False) -> None:
        result = run_guarded(lambda: train(recipe, overrides or [], overwrite), "train.out_dir")
        if result.stopped_by_signal:
            raise typer.Exit(result.stopped_by_signal)

    command.__doc__ = f"{summary} Re-running the same command resumes the run."
    app.command(name, rich_help_panel="Train")(command)


def _tokenizer(recipe: Path, overrides: list[str], overwrite: bool) -> Any:
    from vqgan_cli.config import load_recipe
    from vqgan_cli.models.lpips import check_lpips_available
    from vqgan_cli.train.tokenizer import TokenizerRecipe, train_tokenizer

    r = load_recipe(TokenizerRecipe, recipe, overrides)
    if r.model.modality == "image" and r.loss.perceptual_weight > 0:  # before any heavy work
        check_lpips_available(r.loss.lpips_backbone)
    return train_tokenizer(r, recipe.stem, overwrite=overwrite)


def _prior(recipe: Path, overrides: list[str], overwrite: bool) -> Any:
    from vqgan_cli.config import load_recipe
    from vqgan_cli.train.prior import PriorRecipe, train_prior

    return train_prior(load_recipe(PriorRecipe, recipe, overrides), recipe.stem, overwrite=overwrite)


_stage_command("train-tokenizer", "Train a VQGAN tokenizer (stage one).", "recipes/quickstart.yaml", _tokenizer)
_stage_command("train-prior", "Train the transformer prior (stage two) on token shards.",
               "recipes/quickstart_prior.yaml", _prior)


@app.command("plot", rich_help_panel="Train")
def plot_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (one holding metrics.jsonl)")],
    out: Annotated[Path | None, typer.Option(help="where to write the PNG (default RUN_DIR/curves.png)")] = None,
) -> None:
    """Draw a run's metrics.jsonl as curves.png: losses, quality, codebook use, adaptive weight, lr."""
    from vqgan_cli.train.curves import write_curves

    path = run_guarded(lambda: write_curves(run_dir, out))
    if path is None:
        raise fail(f"{run_dir}: no metrics.jsonl records to draw", 2)
    console.print(f"wrote {path}")
