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
    # train draws sample grids with sample.tokens; evaluate reads what train made, never the reverse
    "train": {"demo", "encode", "cli", "evaluate"},
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


# ---- import circles ----------------------------------------------------------------------------
# A lazy import inside a function is still a circle (it only moves the failure to call time), so
# every import counts except those under ``if TYPE_CHECKING:``, which never run.


def _module_name(path: Path, root: Path) -> str:
    """Dotted name of a source file under ``root`` (the folder that holds the top package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement below ``node``, function bodies included, TYPE_CHECKING blocks not."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            found += [n for stmt in child.orelse for n in [stmt, *_import_nodes(stmt)]
                      if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            found += _import_nodes(child)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str],
             top: str) -> set[str]:
    """The modules of package ``top`` that one import statement runs: a name imported ``from`` a
    package is its submodule when one exists, else the package's ``__init__``."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == top} & known
    base = node.module or ""
    if node.level:  # relative: climb from this module's package
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != top:
        return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names} & known


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same top package it imports, read from the source with ``ast``."""
    root, top = package_dir.parent, package_dir.name
    files = {_module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {t for n in _import_nodes(tree) for t in _targets(n, name, is_package, set(files), top)}
        graph[name].discard(name)
    return graph


def _strong_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative: import chains can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.add(top)
                        if top == node:
                            break
                    comps.append(comp)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return comps


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ()) & within):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    nxt.append(child)
        frontier = nxt
    return []


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle as a readable chain ``a -> b -> a``: the shortest one through each module
    of each strongly connected component, each circle once."""
    chains = set()
    for comp in _strong_components(graph):
        if len(comp) < 2:
            continue
        for node in comp:
            cycle = _shortest_cycle(graph, node, comp)[:-1]
            turn = cycle.index(min(cycle))
            cycle = cycle[turn:] + cycle[:turn]
            chains.add(" -> ".join([*cycle, cycle[0]]))
    return sorted(chains)


def test_cycle_finder_reports_each_circle_as_a_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert find_cycles(graph) == ["a -> b -> c -> a", "d -> e -> d"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    # two circles through one module are both named
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}) == ["a -> b -> a", "a -> c -> a"]


def test_import_graph_counts_lazy_imports_and_skips_type_checking(tmp_path: Path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Toy."""\n')
    (pkg / "sub" / "__init__.py").write_text("from toy.sub import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from toy.sub import leaf\n\ndef f():\n    from toy import b\n    return b\n")
    (pkg / "b.py").write_text("import toy.a\nfrom . import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.a import f\n"
                              "else:\n    import toy.sub\n")
    graph = import_graph(pkg)
    assert graph["toy.a"] == {"toy.sub.leaf", "toy.b"}
    assert graph["toy.b"] == {"toy.a", "toy.c"}
    assert graph["toy.c"] == {"toy.sub"}
    assert graph["toy.sub"] == {"toy.sub.leaf"}
    assert find_cycles(graph) == ["toy.a -> toy.b -> toy.a"]


def test_no_import_circles():
    cycles = find_cycles(import_graph(PKG))
    assert not cycles, "import circles (function-local imports count):\n" + "\n".join(cycles)
