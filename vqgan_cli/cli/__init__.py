"""The ``vqgan`` command line: each command parses, calls one library function, prints its report.

One module per command family (``train``, ``shards``, ``models``, ``sample``, ``evaluate``), all
registered on :data:`vqgan_cli.cli.app.app`; :mod:`vqgan_cli.cli.guard` turns library errors into
messages and exit codes. Library imports happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys

# isort: off
# registers the commands, in the order of the pipeline (and of --help)
from vqgan_cli.cli import train, shards, sample, models  # noqa: F401
# isort: on
from vqgan_cli.cli.app import app
from vqgan_cli.cli.evaluate import app as evaluate_app
from vqgan_cli.cli.guard import run_guarded

app.add_typer(evaluate_app, name="evaluate", rich_help_panel="Models")
__all__ = ["app", "main", "run_guarded"]


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `vqgan ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
