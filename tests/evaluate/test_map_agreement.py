"""Label agreement against hand-built images and counted answers; the window-quality benchmark
end to end on a tiny random prior and tokenizer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import cond_config, saved_prior, saved_tokenizer, tokenizer
from factory import prior as factory_prior
from PIL import Image

from vqgan_cli.data.landscapes import GRASS, MOUNTAIN, SKY, render_landscape
from vqgan_cli.evaluate.map_agreement import CellClassifier, fit_cell_classifier, label_agreement, map_cell_labels
from vqgan_cli.sample.window import WINDOW_MODES

HELD_OUT = range(1_000_000, 1_000_008)  # the built-in validation scenes


@pytest.fixture(scope="module")
def classifier() -> CellClassifier:
    """The documented default (32 training scenes at 5 sizes, f8): about 15 s on one core."""
    torch.set_num_threads(1)
    return fit_cell_classifier()


def test_cell_labels_are_the_centre_pixels():
    f, h, w = 8, 3, 5
    labels = np.zeros((h * f, w * f), np.uint8)
    want = (np.arange(h * w).reshape(h, w) % 7 + 1).astype(np.uint8)
    labels[f // 2::f, f // 2::f] = want  # everything else in the cell says 0
    assert np.array_equal(map_cell_labels(labels, f), want)
    with pytest.raises(ValueError, match="not a grid of 8 px cells"):
        map_cell_labels(labels[:-1], f)


def test_hand_painted_scene_agrees_fully(classifier):
    """Bands of the renderer's base colours on cell boundaries: sky gradient, mountain, grass."""
    H, W, f = 320, 512, 8
    v = (np.arange(H) + 0.5) / H
    top, bottom = np.array([50.0, 100, 190]), np.array([180.0, 208, 236])
    img = np.repeat((top + (bottom - top) * np.clip(v / 0.5, 0, 1)[:, None])[:, None], W, 1)
    labels = np.full((H, W), SKY, np.uint8)
    labels[96:160], img[96:160] = MOUNTAIN, (104, 94, 86)
    labels[160:], img[160:] = GRASS, (92, 146, 62)
    img = img + np.random.default_rng(0).normal(0, 2, img.shape)  # a little texture
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    assert label_agreement(img, labels, f, classifier) == 1.0
    # the same pixels as a model-space tensor give the same answer
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    assert label_agreement(x, torch.from_numpy(labels), f, classifier) == 1.0


def test_agreement_counts_relabelled_cells(classifier):
    """Map = the classifier's own cell predictions, then k cells changed: agreement = 1 - k/n."""
    f = 8
    img = render_landscape(1_000_003, 320, 512).image
    pred = classifier.predict(img)  # (40, 64)
    rng = np.random.default_rng(1)
    n = pred.size
    for k in (0, 1, 100, 1280, n):
        cells = pred.copy().reshape(-1)
        pick = rng.choice(n, k, replace=False)
        cells[pick] = (cells[pick] + 1 + rng.integers(0, 7, k)) % 8  # always a different class
        labels = np.kron(cells.reshape(pred.shape), np.ones((f, f), np.uint8))  # every pixel of a cell
        assert label_agreement(img, labels, f, classifier) == (n - k) / n


def test_real_renders_reach_the_ceiling_and_a_flipped_one_does_not(classifier):
    f = 8
    for (h, w), floor in (((64, 64), 0.93), ((320, 512), 0.98)):  # measured 0.952 and 0.991 (16 seeds)
        scores = [label_agreement((s := render_landscape(seed, h, w)).image, s.labels, f, classifier)
                  for seed in HELD_OUT]
        assert np.mean(scores) >= floor
    scene = render_landscape(1_000_000, 320, 512)
    assert label_agreement(scene.image[::-1].copy(), scene.labels, f, classifier) < 0.5


def test_fit_is_deterministic_and_saves(tmp_path):
    a = fit_cell_classifier(range(3), [(64, 64)], factor=8, steps=50)
    b = fit_cell_classifier(range(3), [(64, 64)], factor=8, steps=50)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    path = a.save(tmp_path / "cells")  # no suffix added: the path is the file
    c = CellClassifier.load(path)
    img = render_landscape(1_000_001, 128, 128).image
    assert np.array_equal(a.predict(img), c.predict(img))
    assert (c.factor, c.classes, c.sizes.tolist(), c.seeds.tolist()) == (8, a.classes, [[64, 64]], [0, 1, 2])
    with pytest.raises(ValueError, match="held out"):
        fit_cell_classifier([1_000_000], [(64, 64)])
    with pytest.raises(ValueError, match="fitted on 8 px cells"):
        label_agreement(img, np.zeros((128, 128), np.uint8), 4, c)


# --- benchmarks/window_quality.py on tiny random models ---

def _bench():
    name = "window_quality"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # the script's sibling imports (benchmarks/machine.py)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_window_quality_benchmark_end_to_end(tmp_path, capsys):
    f, size, seeds = 2, 32, [1_000_000, 1_000_001]
    tok = tokenizer(resolution=8, attn_resolutions=())  # f = 2
    saved_tokenizer(tmp_path / "tok.safetensors", tok)
    prior = factory_prior(cond_config("labels", label_factor=f), grid=(4, 4), image_vocab=16, seed=1, spread=0.3)
    saved_prior(tmp_path / "prior.safetensors", prior, tokenizer_model=tok)
    clf = fit_cell_classifier(range(4), [(32, 32), (64, 64)], factor=f, steps=200)
    clf.save(tmp_path / "cells.npz")

    rows = _bench().main([
        "--prior", str(tmp_path / "prior.safetensors"), "--seeds", ",".join(map(str, seeds)),
        "--size", f"{size}x{size}", "--windows", ",".join(WINDOW_MODES), "--top-k", "none,4",
        "--precision", "fp32", "--classifier", str(tmp_path / "cells.npz"),
        "--out", str(tmp_path / "table.json"), "--save-images", str(tmp_path / "img")])
    printed = capsys.readouterr().out

    scenes = [render_landscape(s, size, size) for s in seeds]
    ceiling = float(np.mean([label_agreement(s.image, s.labels, f, clf) for s in scenes]))
    line = next(ln for ln in printed.splitlines() if ln.startswith("| real render (ceiling) |"))
    assert line.split("|")[2].strip() == f"{ceiling:.4f}"
    saved = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert saved[0]["name"] == "real render (ceiling)" and saved[0]["agreement"] == ceiling
    assert saved[0]["band"] == 1.0 and saved[0]["token"] == 1.0
    assert saved[1]["name"] == "tokenizer reconstruction (bound)" and 0 <= saved[1]["agreement"] <= 1
    assert [r["window"] for r in saved[2:]] == [m for m in WINDOW_MODES for _ in range(2)]
    assert [r["top_k"] for r in saved[2:]] == [None, 4] * len(WINDOW_MODES)
    for r in saved[2:]:  # each sample's numbers, recomputed from its saved PNG
        name = r["name"].replace(" ", "_").replace("=", "")
        for seed, scene, got in zip(seeds, scenes, r["per_seed"], strict=True):
            img = np.asarray(Image.open(tmp_path / "img" / f"{name}_seed{seed}.png").convert("RGB"))
            assert got["agreement"] == label_agreement(img, scene.labels, f, clf)
            assert got["s/img"] > 0 and np.isfinite(got["band"]) and np.isfinite(got["seam"])
        assert f"| {r['name']} | {r['agreement']:.4f} |" in printed
    assert len(rows) == len(saved)
