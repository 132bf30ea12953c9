"""Developer tasks. Sessions run in the current environment (venv_backend none): torch is a
5 GB install, so we reuse the one `pip install -e .[dev]` put there rather than copy it."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]  # `bench` and `quickstart` only when asked for


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite (the README's second command runs the same)."""
    session.run("python", "-m", "pip", "install", "-q", "-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "2", "-q", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "vqgan_cli", "tests", "benchmarks", "noxfile.py")


@nox.session(venv_backend="none")
def quickstart(session: nox.Session) -> None:
    """Train the quickstart tokenizer on the built-in landscapes (~10 minutes on 2 cores)."""
    session.run("vqgan", "train-tokenizer", "recipes/quickstart.yaml", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Throughput benchmarks; each prints ratios measured within one run.

    `nox -s bench` runs all four; `nox -s bench -- tokenizer_step --steps 5` runs one with arguments.
    """
    names = ["tokenizer_step", "prior_step", "encode", "sampling"]
    if session.posargs and session.posargs[0] in names:
        names, args = [session.posargs[0]], session.posargs[1:]
    else:
        args = list(session.posargs)
    for name in names:
        session.run("python", f"benchmarks/{name}.py", *args)
