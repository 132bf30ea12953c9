"""Recipe loading: types, ranges, unknown keys and paths are all reported together."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vqgan_cli.config import ConfigError, apply_overrides, from_dict, load_recipe, spec, to_dict


@dataclass
class Inner:
    rate: float = spec(0.5, ge=0.0, le=1.0)
    kind: str = spec("a", choices=("a", "b"))
    sizes: tuple[int, ...] = spec(default_factory=lambda: (1, 2))


@dataclass
class Outer:
    steps: int = spec(10, ge=1)
    name: str | None = None
    path: str | None = spec(None, existing_path=True)
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_values_fill_in():
    o = from_dict(Outer, {"steps": 3, "inner": {"rate": 1, "sizes": [4, 5, 6]}})
    assert o.steps == 3 and o.inner.rate == 1.0 and isinstance(o.inner.rate, float)
    assert o.inner.sizes == (4, 5, 6) and o.inner.kind == "a"


def test_every_problem_reported_together_with_dotted_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"steps": "soon", "stepz": 1, "path": str(tmp_path / "nope"),
                          "inner": {"rate": 2.0, "kind": "c", "sizes": [1, "x"]}})
    problems = e.value.problems
    joined = "\n".join(problems)
    assert "steps: expected int, got 'soon'" in joined
    assert "stepz: unknown key" in joined
    assert "path: path does not exist" in joined
    assert "inner.rate: must be <= 1.0, got 2.0" in joined
    assert "inner.kind: must be one of ['a', 'b'], got 'c'" in joined
    assert "inner.sizes[1]: expected int" in joined
    assert len(problems) == 6


def test_yaml_float_strings_and_bools_are_strict():
    assert from_dict(Inner, {"rate": "4.5e-1"}).rate == pytest.approx(0.45)
    with pytest.raises(ConfigError):
        from_dict(Outer, {"steps": True})


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"inner": {"rate": 0.1}}, ["inner.rate=0.9", "steps=7", "inner.sizes=[3]", "name=x"])
    o = from_dict(Outer, data)
    assert (o.inner.rate, o.steps, o.inner.sizes, o.name) == (0.9, 7, (3,), "x")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"])


def test_load_recipe_and_round_trip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("steps: 4\ninner:\n  kind: b\n")
    o = load_recipe(Outer, p, ["inner.rate=0.25"])
    assert to_dict(o) == {"steps": 4, "name": None, "path": None,
                          "inner": {"rate": 0.25, "kind": "b", "sizes": [1, 2]}}
    assert from_dict(Outer, to_dict(o)) == o


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_recipe(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(Outer, lst)
