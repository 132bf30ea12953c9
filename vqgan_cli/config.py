"""Recipes: YAML mapped onto typed dataclasses, with every problem reported at once.

Precedence, documented once: dataclass defaults < recipe YAML < ``--set key.path=value``.
Each module owns the dataclass of its concern; this module only knows how to fill and check
any dataclass. Field constraints live in ``field(metadata=...)`` built by :func:`spec`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """One or more recipe problems; ``problems`` holds one line per problem with its dotted path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{head}{len(problems)} problem(s) in the recipe:\n{lines}")


def spec(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    existing_path: bool = False,
    help: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with range/choice constraints checked by :func:`from_dict`.

    ``existing_path`` checks that a string value names an existing file or folder, unless it
    starts with ``builtin:`` or is empty/None (meaning "not used").
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
            "existing_path": existing_path, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append a problem and return None on mismatch."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(value, arg, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
        problems.append(f"{path}: expected one of {list(get_args(tp))}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return _fill(tp, value, path + ".", problems)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return None
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "4.5e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return None


def _check_constraints(value: Any, meta: Any, path: str, problems: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(value, bound):
                problems.append(f"{path}: must be {word} {bound}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        problems.append(f"{path}: must be one of {list(choices)}, got {value!r}")
    if meta.get("existing_path") and isinstance(value, str) and value:
        if not value.startswith("builtin:") and "{" not in value and not Path(value).exists():
            problems.append(f"{path}: path does not exist: {value}")


def _fill(cls: type[T], data: dict, prefix: str, problems: list[str]) -> T | None:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key in data:
        if key not in fields:
            near = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            problems.append(f"{prefix}{key}: unknown key{hint}")
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name in data:
            before = len(problems)
            value = _convert(data[name], hints[name], path, problems)
            if len(problems) == before:
                _check_constraints(value, f.metadata, path, problems)
                kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{path}: required key is missing")
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None
    check = getattr(obj, "check", None)
    if callable(check):
        problems.extend(f"{prefix}{p}" for p in check())
    return obj


def from_dict(cls: type[T], data: dict, source: str | None = None) -> T:
    """Build ``cls`` from a nested mapping, raising one ConfigError listing every problem."""
    problems: list[str] = []
    obj = _fill(cls, data or {}, "", problems)
    if problems or obj is None:
        raise ConfigError(problems or ["could not build the recipe"], source)
    return obj


def to_dict(obj: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` strings (values parsed as YAML) onto a nested dict."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {key}: {part} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a recipe file into a dict, turning I/O and syntax errors into ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"recipe file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"YAML syntax error: {e}"], str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["the recipe must be a mapping of sections"], str(p))
    return data


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load a recipe YAML as ``cls``, applying ``--set`` overrides, all problems reported together."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return from_dict(cls, data, str(path))
