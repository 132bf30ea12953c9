"""The built-in procedural landscapes: deterministic, varied, labelled, learnable, fast."""

from __future__ import annotations

import numpy as np
import pytest

from vqgan_cli.data.landscapes import LANDSCAPE_CLASSES, render_landscape

SEEDS = range(16)


@pytest.fixture(scope="module")
def scenes():
    return [render_landscape(s, 64, 64) for s in SEEDS]


def test_deterministic_by_seed_and_seeds_differ():
    a, b, c = render_landscape(7, 48, 64), render_landscape(7, 48, 64), render_landscape(8, 48, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5


@pytest.mark.parametrize("hw", [(64, 64), (40, 96), (96, 40), (8, 8), (1, 3)])
def test_any_size_and_aspect(hw):
    scene = render_landscape(3, *hw)
    assert scene.image.shape == (*hw, 3) and scene.image.dtype == np.uint8
    assert scene.labels.shape == hw and scene.labels.dtype == np.uint8
    assert scene.labels.max() < len(LANDSCAPE_CLASSES)


def test_same_scene_at_any_resolution():
    """Coordinates are in image-height units, so resolution changes sampling, not layout."""
    small, big = render_landscape(11, 64, 64).labels, render_landscape(11, 128, 128).labels
    assert (big[::2, ::2] == small).mean() > 0.9


def test_every_class_appears_and_composition_varies(scenes):
    assert len(LANDSCAPE_CLASSES) >= 6
    present = np.zeros(len(LANDSCAPE_CLASSES), int)
    for s in scenes:
        present += np.bincount(s.labels.ravel(), minlength=len(LANDSCAPE_CLASSES)) > 0
    assert (present >= 2).all(), dict(zip(LANDSCAPE_CLASSES, present, strict=True))
    assert present[LANDSCAPE_CLASSES.index("sky")] == len(scenes)
    # composition varies: class sets differ between scenes
    assert len({tuple(np.unique(s.labels)) for s in scenes}) >= 4


def _class_means(scenes) -> dict[str, np.ndarray]:
    means = {}
    for c, name in enumerate(LANDSCAPE_CLASSES):
        px = np.concatenate([s.image[s.labels == c] for s in scenes]).astype(float)
        means[name] = px.mean(0)
    return means


def test_colours_follow_labels(scenes):
    m = _class_means(scenes)
    r, g, b = 0, 1, 2
    assert m["sky"][b] > m["sky"][r] + 60            # sky is blue
    assert m["grass"][g] > m["grass"][r] + 30 and m["grass"][g] > m["grass"][b] + 40
    assert m["forest"][g] > m["forest"][r] and m["forest"].sum() < 0.7 * m["grass"].sum()
    assert m["cloud"].min() > 190 and m["snow"].min() > 190  # white
    assert m["sand"][r] > m["sand"][b] + 40            # warm tan
    assert m["water"][b] > m["water"][r] + 15          # bluish, darker than sky
    assert m["water"].sum() < m["sky"].sum()
    assert abs(m["mountain"][r] - m["mountain"][b]) < 40  # grey


def test_texture_is_mild_within_classes(scenes):
    """Small neighbour differences inside a class keep the data learnable by a tiny tokenizer."""
    diffs = []
    for s in scenes:
        im, lab = s.image.astype(float), s.labels
        same = lab[:, 1:] == lab[:, :-1]
        diffs.append(np.abs(im[:, 1:] - im[:, :-1]).mean(-1)[same].mean())
    assert np.mean(diffs) < 4.0, diffs


@pytest.mark.parametrize("seed", [0, 5, 13, 21])
def test_window_render_equals_the_crop_of_the_whole_render(seed):
    """Rendering only a window (the training crops of large scenes) gives exactly those pixels."""
    from vqgan_cli.data.landscapes import Window

    H, W = 300, 470
    whole = render_landscape(seed, H, W)
    rng = np.random.default_rng(seed)
    boxes = [(0, 0, 64, 64), (H - 64, W - 64, 64, 64), (H - 40, 10, 40, 300), (120, 200, 1, 1)]
    boxes += [tuple(int(v) for v in (rng.integers(0, H - 64), rng.integers(0, W - 64), 64, 64))
              for _ in range(4)]
    for top, left, h, w in boxes:
        part = render_landscape(seed, H, W, Window(top, left, h, w))
        assert np.array_equal(part.image, whole.image[top:top + h, left:left + w]), (top, left, h, w)
        assert np.array_equal(part.labels, whole.labels[top:top + h, left:left + w]), (top, left, h, w)


def test_window_outside_the_scene_is_refused():
    from vqgan_cli.data.landscapes import Window

    with pytest.raises(ValueError, match="not inside a 64x64 scene"):
        render_landscape(0, 64, 64, Window(32, 0, 64, 64))
