"""Data layer: sources, robust decoding, paired maps, crops, datasets, collate and the sampler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgan_cli.config import ConfigError, from_dict
from vqgan_cli.data import (
    LANDSCAPE_CLASSES,
    BadFile,
    DataConfig,
    DataError,
    DataWarning,
    ResumableSampler,
    build_dataset,
    collate,
    model_input,
    one_hot,
)
from vqgan_cli.data import dataset as dataset_mod
from vqgan_cli.data.maps import (
    LabelError,
    cell_labels,
    depth_to_rgba,
    normalize_depth,
    read_map,
    rgba_to_depth,
)
from vqgan_cli.data.sources import MapIndex, resolve_source
from vqgan_cli.data.transforms import read_image, tensor_to_image


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- sources

def test_folder_source_is_recursive_and_sorted(tmp_path):
    _png(tmp_path / "b" / "sub" / "y.png", _rgb(8, 8))
    _png(tmp_path / "a" / "x.png", _rgb(8, 8))
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "a" / "z.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    src = resolve_source(str(tmp_path))
    assert src.kind == "files"
    assert [i.key for i in src.items] == ["a/x", "a/z", "b/sub/y"]


def test_file_list_relative_to_list_or_root(tmp_path):
    _png(tmp_path / "imgs" / "a.png", _rgb(8, 8))
    _png(tmp_path / "imgs" / "deep" / "b.png", _rgb(8, 8))
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\n\n../imgs/a.png\n  ../imgs/deep/b.png  \n")
    assert [Path(i.path).resolve() for i in resolve_source(str(lst)).items] == [
        (tmp_path / "imgs" / "a.png").resolve(), (tmp_path / "imgs" / "deep" / "b.png").resolve()]
    lst2 = tmp_path / "lists" / "rooted.txt"
    lst2.write_text("a.png\ndeep/b.png\n")
    src = resolve_source(str(lst2), root=str(tmp_path / "imgs"))
    assert [i.key for i in src.items] == ["a", "deep/b"]
    with pytest.raises(DataError, match="set data.root"):
        resolve_source(str(lst2))


def test_missing_or_empty_sources_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        resolve_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        resolve_source(str(tmp_path / "empty"))
    _write_shards(tmp_path, 1, 1)
    with pytest.raises(DataError, match=r"shard-001\.tar does not exist$"):
        resolve_source(str(tmp_path / "shard-{000..001}.tar"))
    with pytest.raises(DataError, match="unknown built-in"):
        resolve_source("builtin:faces")


def _write_shards(folder: Path, n_shards: int, per_shard: int, size: int = 24) -> list[str]:
    """Shards in webdataset layout (``key.jpg`` + ``key.seg.png``), written by webdataset itself."""
    import webdataset as wds

    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as sink:
            for j in range(per_shard):
                keys.append(f"s{s}_{j}")
                img = np.full((size, size, 3), 10 * len(keys), np.uint8)
                seg = np.full((size, size), len(keys) % 5, np.uint8)
                sink.write({"__key__": keys[-1], "jpg": _encode(img, "JPEG"), "seg.png": _encode(seg)})
    return keys


def test_tar_shards_by_brace_pattern_with_holdout_and_worker_split(tmp_path, monkeypatch):
    keys = _write_shards(tmp_path, 2, 3)
    cfg = DataConfig(train=str(tmp_path / "shard-{000..001}.tar"), size=16, val_count=2)
    train = build_dataset(cfg, "train", "segmentation", 5)
    val = build_dataset(cfg, "val", "segmentation", 5)
    train_keys = [s["key"] for s in train]
    assert sorted(train_keys) == sorted(keys[:4])
    assert sorted(s["key"] for s in val) == keys[4:]
    sample = next(iter(val))
    assert sample["image"].shape == (3, 16, 16) and sample["seg"].shape == (16, 16)
    # split between 2 slots (ranks x workers): disjoint and complete, shard-wise and sample-wise
    for n_slots in (2, 3):
        parts = []
        for slot in range(n_slots):
            monkeypatch.setattr(dataset_mod, "reader_slot", lambda slot=slot, n=n_slots: (slot, n))
            parts.append([s["key"] for s in train])
        flat = [k for p in parts for k in p]
        assert len(flat) == len(set(flat)) and sorted(flat) == sorted(keys[:4])


# ---------------------------------------------------------------- decoding

def test_decode_modes_to_rgb8(tmp_path):
    gray = np.array([[0, 100, 255]], np.uint8)
    assert (read_image(str(_png(tmp_path / "g.png", gray))) == gray[..., None]).all()

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert read_image(str(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [0, 0, 255]]]

    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 128], [10, 20, 30, 255]]], np.uint8)
    _png(tmp_path / "rgba.png", rgba)
    want = [[[255, 255, 255], [255, 127, 127], [10, 20, 30]]]  # alpha 0 -> white, 128 -> half white
    assert read_image(str(tmp_path / "rgba.png")).tolist() == want
    Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert read_image(str(tmp_path / "la.png")).tolist() == [[[255] * 3, [0] * 3]]

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert np.abs(read_image(str(tmp_path / "c.jpg")).astype(int) - [255, 0, 0]).max() < 8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    v16 = np.array([[0, 257, 1000, 32896, 65535]], np.uint16)
    want = [0, 1, 4, 128, 255]  # round(v / 257)
    Image.fromarray(v16).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert read_image(str(tmp_path / "i16.png"))[0, :, 0].tolist() == want
    Image.fromarray(v16.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    out = read_image(str(tmp_path / "i32.tif"))
    assert out[0, :, 0].tolist() == want and (out[..., 0] == out[..., 2]).all()


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jpg = _encode(_rgb(64, 64), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "text.png").write_text("this is not a picture")
    return {"truncated": folder / "truncated.jpg", "text": folder / "text.png"}


def test_bad_files_skip_with_warning_or_stop(tmp_path):
    bad = _bad_files(tmp_path / "imgs")
    for p in bad.values():
        with pytest.raises(BadFile, match=p.name):
            read_image(str(p))
    _png(tmp_path / "imgs" / "ok.png", _rgb(20, 20))
    cfg = DataConfig(train=str(tmp_path / "imgs"), val_count=0, size=16)
    ds = build_dataset(cfg, "train", "image", None)
    with pytest.warns(DataWarning) as rec:
        batch = collate([ds[i] for i in range(len(ds))])
    assert batch["key"] == ["ok"] and batch["image"].shape == (1, 3, 16, 16)
    assert len(batch["skipped"]) == 2 and any("text.png" in m for m in batch["skipped"])
    assert any("truncated.jpg" in str(w.message) for w in rec)
    cfg.bad_files = "stop"
    stop = build_dataset(cfg, "train", "image", None)
    with pytest.raises(BadFile, match="text.png"):
        [stop[i] for i in range(len(stop))]


def test_too_small_image_is_upscaled_and_counted(tmp_path):
    _png(tmp_path / "small.png", _rgb(10, 20))
    _png(tmp_path / "big.png", _rgb(40, 40))
    ds = build_dataset(DataConfig(train=str(tmp_path), val_count=0, size=16), "train", "image", None)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["upscaled"] == 1
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


# ---------------------------------------------------------------- maps

def test_label_out_of_range_names_file_value_and_n_labels(tmp_path):
    _png(tmp_path / "imgs" / "photo.png", _rgb(16, 16))
    seg = np.zeros((16, 16), np.uint8)
    seg[3, 4] = 200
    _png(tmp_path / "maps" / "photo.png", seg)
    cfg = DataConfig(train=str(tmp_path / "imgs"), maps=str(tmp_path / "maps"), val_count=0, size=8)
    ds = build_dataset(cfg, "train", "segmentation", 182)  # bad_files=skip must not hide it
    with pytest.raises(LabelError) as err:
        ds[0]
    assert all(s in str(err.value) for s in ("photo.png", "200", "182"))
    assert read_map(str(tmp_path / "maps" / "photo.png"), label_shift=56).array[3, 4] == 0  # mod 256


def test_missing_map_is_a_bad_file(tmp_path):
    _png(tmp_path / "imgs" / "a.png", _rgb(16, 16))
    _png(tmp_path / "imgs" / "b.png", _rgb(16, 16))
    _png(tmp_path / "maps" / "a.png", np.zeros((16, 16), np.uint8))
    cfg = DataConfig(train=str(tmp_path / "imgs"), maps=str(tmp_path / "maps"), val_count=0, size=8)
    ds = build_dataset(cfg, "train", "segmentation", 4)
    with pytest.warns(DataWarning, match="no paired map"):
        assert "skipped" in ds[1] and "seg" in ds[0]
    with pytest.raises(DataError, match="needs paired maps"):
        build_dataset(DataConfig(train=str(tmp_path / "imgs"), val_count=0), "train", "segmentation", 4)


def test_image_and_map_share_crop_and_flip(tmp_path):
    h, w = 64, 96
    yy, xx = np.mgrid[0:h, 0:w].astype(np.uint8)
    _png(tmp_path / "imgs" / "coords.png", np.stack([xx, yy, np.zeros_like(xx)], -1))
    _png(tmp_path / "maps" / "coords.png", xx)  # the map encodes the column too
    cfg = DataConfig(train=str(tmp_path / "imgs"), maps=str(tmp_path / "maps"), val_count=0,
                     size=48, resize=64, flip=True)
    ds = build_dataset(cfg, "train", "segmentation", 256, seed=3)
    corners, flips = set(), set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[0]
        img = tensor_to_image(s["image"]).astype(int)
        assert (img[..., 0] == s["seg"].numpy()).all()           # same columns (and same flip)
        assert (np.diff(img[:, 0, 1]) == 1).all()                   # rows stay in order
        corners.add((img[0, 0, 1], img[0, :, 0].min()))
        flips.add(bool(img[0, 0, 0] > img[0, -1, 0]))
    assert len(corners) > 3 and flips == {True, False}
    val = build_dataset(DataConfig(train=str(tmp_path / "imgs"), val=str(tmp_path / "imgs"),
                                   maps=str(tmp_path / "maps"), size=48, resize=64, flip=True),
                        "val", "image", None)
    centre = tensor_to_image(val[0]["image"])
    assert centre[0, 0, 1] == 8 and centre[0, 0, 0] == 24 and val[0]["seg"][0, 0] == 24


def test_training_randomness_is_a_function_of_seed_epoch_index():
    cfg = DataConfig(size=32, resize=48, flip=True, builtin_train=10)
    a, b = (build_dataset(cfg, "train", "image", None, seed=5) for _ in range(2))
    a.set_epoch(2), b.set_epoch(2)
    assert torch.equal(a[4]["image"], b[4]["image"])
    b.set_epoch(3)
    assert not torch.equal(a[4]["image"], b[4]["image"])


def test_cell_labels_take_the_centre_pixel_of_each_cell():
    m = torch.arange(4 * 6).reshape(4, 6)  # label = 6 * row + column
    # f = 2: the centre pixel of a 2 x 2 cell is its bottom-right one (rows 1, 3; columns 1, 3, 5)
    assert cell_labels(m, 2).tolist() == [[7, 9, 11], [19, 21, 23]]
    # f = 4 on an 8 x 8 map: rows and columns 2 and 6
    big = torch.arange(64).reshape(1, 8, 8)
    assert cell_labels(big, 4).tolist() == [[[18, 22], [50, 54]]]
    assert cell_labels(big.numpy(), 4).tolist() == [[[18, 22], [50, 54]]]


def test_depth_png_round_trip_and_normalisation(tmp_path):
    depth = np.array([[100.0, 6000.5], [1234.25, 3.0e-3]], np.float32)
    Image.fromarray(depth_to_rgba(depth), "RGBA").save(tmp_path / "d.png")
    assert np.array_equal(rgba_to_depth(np.asarray(Image.open(tmp_path / "d.png"))), depth)
    n = normalize_depth(depth)
    assert n.min() == -1 and n.max() == 1 and n[0, 1] == 1 and n[1, 1] == -1
    assert (normalize_depth(np.full((3, 3), 7.0, np.float32)) == 0).all()


def test_depth_dataset_and_model_input(tmp_path):
    _png(tmp_path / "imgs" / "x.png", _rgb(20, 30))
    d = np.linspace(100, 5000, 600, dtype=np.float32).reshape(20, 30)
    (tmp_path / "maps").mkdir()
    Image.fromarray(depth_to_rgba(d), "RGBA").save(tmp_path / "maps" / "x.png")
    cfg = DataConfig(train=str(tmp_path / "imgs"), maps=str(tmp_path / "maps"), val_count=0, size=16)
    batch = collate([build_dataset(cfg, "train", "depth", None)[0]])
    x = model_input(batch, "depth", None)
    assert x.shape == (1, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    with pytest.raises(DataError, match="seg"):
        model_input(batch, "segmentation", 10)


def test_one_hot_and_model_input():
    labels = torch.tensor([[[0, 2], [1, 2]]])
    oh = one_hot(labels, 3)
    assert oh.shape == (1, 3, 2, 2) and oh.dtype == torch.float32
    assert torch.equal(oh.argmax(1), labels) and (oh.sum(1) == 1).all()
    with pytest.raises(DataError, match="n_labels = 2"):
        one_hot(labels, 2)
    batch = {"image": torch.zeros(1, 3, 2, 2), "seg": labels}
    assert model_input(batch, "image", None) is batch["image"]
    assert torch.equal(model_input(batch, "segmentation", 3), oh)
    with pytest.raises(DataError, match="depth"):
        model_input(batch, "depth", None)


def test_map_index_prefers_relative_key(tmp_path):
    _png(tmp_path / "a" / "001.png", np.zeros((2, 2), np.uint8))
    _png(tmp_path / "b" / "001.png", np.zeros((2, 2), np.uint8))
    _png(tmp_path / "c" / "002.png", np.zeros((2, 2), np.uint8))
    idx = MapIndex(tmp_path)
    assert idx.find("b/001").endswith("b/001.png")
    assert idx.find("other/002").endswith("c/002.png")
    assert idx.find("001") is None  # ambiguous stem


# ---------------------------------------------------------------- datasets, splits, config

def test_folder_holdout_is_the_last_items(tmp_path):
    for i in range(5):
        _png(tmp_path / f"{i}.png", _rgb(8, 8, i))
    cfg = DataConfig(train=str(tmp_path), val_count=2, size=8)
    assert [s["key"] for s in build_dataset(cfg, "train", "image", None)] == ["0", "1", "2"]
    assert [s["key"] for s in build_dataset(cfg, "val", "image", None)] == ["3", "4"]
    cfg.val_count = 5
    with pytest.raises(DataError, match="val_count"):
        build_dataset(cfg, "train", "image", None)


def test_builtin_train_and_val_are_disjoint_and_labelled():
    cfg = DataConfig(size=32, resize=40, builtin_train=50, val_count=3)
    train, val = build_dataset(cfg, "train", "segmentation", None), build_dataset(cfg, "val", "image", None)
    assert len(train) == 50 and len(val) == 3
    batch = collate([train[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["seg"].dtype == torch.int64
    assert batch["seg"].max() < len(LANDSCAPE_CLASSES)
    n = len(LANDSCAPE_CLASSES)
    assert model_input(batch, "segmentation", n).shape == (3, n, 32, 32)
    assert not {s["key"] for s in val} & {train[i]["key"] for i in range(50)}
    with pytest.raises(DataError, match="n_labels"):
        build_dataset(cfg, "train", "segmentation", 4)
    with pytest.raises(DataError, match="depth"):
        build_dataset(cfg, "train", "depth", None)


def test_config_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"size": 4, "bad_files": "maybe", "train": "/no/such/dir"})
    text = str(err.value)
    assert "size: must be >= 8" in text and "bad_files" in text and "/no/such/dir" in text
    with pytest.raises(ConfigError, match="smaller than the crop"):
        from_dict(DataConfig, {"size": 64, "resize": 32})


# ---------------------------------------------------------------- real example data

def test_sflckr_images_with_segmentations(examples):
    cfg = DataConfig(train=str(examples / "sflckr_examples.txt"), root=str(examples / "sflckr_images"),
                     maps=str(examples / "sflckr_segmentations"), val_count=2, size=64)
    ds = build_dataset(cfg, "train", "segmentation", 182)
    assert len(ds) == 23
    batch = collate([ds[0], ds[5]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["seg"].max() < 182
    assert -1 <= batch["image"].min() < 0 < batch["image"].max() <= 1 and not batch["skipped"]


def test_coco_label_shift_and_drin_depth(examples):
    coco = DataConfig(train=str(examples / "coco_images"), maps=str(examples / "coco_segmentations"),
                      val_count=0, size=32, label_shift=1)
    s = build_dataset(coco, "train", "segmentation", 183)[0]
    assert s["seg"].max() < 183
    drin = DataConfig(train=str(examples / "drin_images"), maps=str(examples / "drin_depth"),
                      val_count=0, size=48)
    s = build_dataset(drin, "train", "depth", None)[0]
    assert s["depth"].shape == (1, 48, 48) and -1 <= s["depth"].min() < s["depth"].max() <= 1


# ---------------------------------------------------------------- sampler

def test_sampler_resume_continues_exactly():
    full = ResumableSampler(37, seed=9)
    full.set_epoch(4)
    order = list(full)
    assert sorted(order) == list(range(37)) and order != list(range(37))
    resumed = ResumableSampler(37, seed=9)
    resumed.start_at(4, 11)
    resumed.set_epoch(4)  # a loop that always calls set_epoch keeps the pending resume
    assert len(resumed) == 26 and list(resumed) == order[11:]
    resumed.set_epoch(5)
    full.set_epoch(5)
    assert list(resumed) == list(full) and len(resumed) == 37
    full.set_epoch(6)
    assert list(full) != list(resumed)


def test_sampler_ranks_are_disjoint_and_equal_length():
    ranks = [ResumableSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    parts = [list(s) for s in ranks]
    assert all(len(p) == 4 == len(s) for p, s in zip(parts, ranks, strict=True))
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(10)) and len(flat) == 12  # padded by 2 repeats
    assert len(set(parts[0]) & set(parts[1])) <= 2
    assert list(ResumableSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def _find_crop(big: np.ndarray, crop: np.ndarray) -> list[tuple[int, int, bool]]:
    """Every (top, left, mirrored) at which ``crop`` is a window of ``big`` (plain search)."""
    n = crop.shape[0]
    hits = []
    for mirrored, c in ((False, crop), (True, crop[:, ::-1])):
        for top in range(big.shape[0] - n + 1):
            for left in range(big.shape[1] - n + 1):
                if np.array_equal(big[top:top + n, left:left + n], c):
                    hits.append((top, left, mirrored))
    return hits


def test_builtin_sizes_give_crops_of_large_renders():
    """data.builtin_sizes: each training sample is a crop of the scene rendered at a drawn size,
    with its labels cut from the same window (and the same flip)."""
    from vqgan_cli.data.landscapes import render_landscape

    cfg = from_dict(DataConfig, {"size": 16, "builtin_sizes": [40, 40], "flip": True})
    ds = build_dataset(cfg, "train", "image", None, seed=3)
    flips = set()
    for i in range(6):
        s = ds[i]
        scene = render_landscape(i, 40, 40)
        rgb = tensor_to_image(s["image"])
        hits = _find_crop(scene.image, rgb)
        assert hits, f"sample {i} is not a crop of the 40x40 render"
        top, left, mirrored = hits[0]
        labels = scene.labels[top:top + 16, left:left + 16]
        assert np.array_equal(s["seg"].numpy(), labels[:, ::-1] if mirrored else labels)
        flips.add(mirrored)
    assert flips == {True, False}


def test_builtin_sizes_span_the_range():
    """Sides are drawn from [lo, hi]: a crop of a large render is flatter than a whole small scene."""
    cfg_small = from_dict(DataConfig, {"size": 32, "builtin_sizes": [32, 32]})
    cfg_large = from_dict(DataConfig, {"size": 32, "builtin_sizes": [512, 512]})
    spread = []
    for cfg in (cfg_small, cfg_large):
        ds = build_dataset(cfg, "train", "image", None, seed=0)
        spread.append(np.mean([float(ds[i]["image"].std((1, 2)).mean()) for i in range(24)]))
    assert spread[1] < 0.6 * spread[0]


def test_builtin_sizes_and_val_scene_are_checked():
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"size": 64, "builtin_sizes": [32, 512], "val_scene": [512]})
    text = str(err.value)
    assert "builtin_sizes" in text and "val_scene" in text
