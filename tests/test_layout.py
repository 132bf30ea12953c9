"""The house rules of the package layout (README "Development"), checked on the source itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vqgan_cli"
# package -> packages it must not import (imports point down the flow)
AGAINST_THE_FLOW = {
    "models": {"demo", "train", "encode", "sample", "cli", "evaluate", "shards", "checkpoints"},
    "data": {"demo", "train", "encode", "sample", "cli", "evaluate", "models", "checkpoints"},
    "shards": {"demo", "train", "encode", "sample", "cli"},
    "checkpoints": {"demo", "train", "encode", "sample", "cli", "evaluate"},
    "encode": {"demo", "train", "sample", "cli"},
    "sample": {"demo", "train", "encode", "cli"},
    "evaluate": {"demo", "encode", "cli"},
    "demo": {"train", "encode", "cli"},
}


def _imports(path: Path) -> set[str]:
    """Top-level vqgan_cli packages a module imports (``from vqgan_cli.X`` / ``import vqgan_cli.X``)."""
    return set(re.findall(r"^\s*(?:from|import) vqgan_cli\.(\w+)", path.read_text(), re.M))


def test_at_most_eight_flat_modules_and_none_over_400_lines():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert len(flat) <= 8, flat
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_every_package_says_what_it_is_for():
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(PKG)} has no docstring"


@pytest.mark.parametrize("package", sorted(AGAINST_THE_FLOW))
def test_imports_point_down_the_flow(package: str):
    bad = {str(p.relative_to(PKG)): sorted(_imports(p) & AGAINST_THE_FLOW[package])
           for p in (PKG / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_command_bodies_are_at_most_15_lines():
    long = {}
    for path in (PKG / "cli").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef) or not any(
                    isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in node.decorator_list):
                continue
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body  # without the docstring
            lines = body[-1].end_lineno - body[0].lineno + 1
            if lines > 15:
                long[f"{path.name}:{node.name}"] = lines
    assert long == {}


def test_library_settings_are_worded_as_the_commands_options():
    from vqgan_cli.cli.guard import as_options

    assert as_options("`top_k` must be in [1, 16]; raise `window_memory` or lower `batch_size`") == \
        "--top-k must be in [1, 16]; raise --window-memory or lower --batch-size"
    assert as_options("`classes` 7 is out of range") == "--class 7 is out of range"
    assert as_options("``vqgan sample`` and `Not a field`") == "``vqgan sample`` and `Not a field`"
