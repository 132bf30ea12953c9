"""The Typer application every command module registers on, and its global options."""

from __future__ import annotations

from typing import Annotated

import typer

from vqgan_cli.cli.guard import debug
from vqgan_cli.console import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Taming Transformers: train VQGAN tokenizers and transformer priors, sample images.")


def _version(value: bool) -> None:
    if value:
        from vqgan_cli import __version__

        console.print(f"vqgan {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug_flag: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (also "
                                                              "VQGAN_DEBUG=1)")] = False,
) -> None:
    """Taming Transformers: train VQGAN tokenizers and transformer priors, sample images."""
    debug["on"] = debug_flag
