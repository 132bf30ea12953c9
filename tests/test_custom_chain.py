"""The user's own data, end to end through the CLI on the real example photos and maps, with
recipes/custom.yaml, custom_prior.yaml and custom_seg_prior.yaml at tiny sizes (``--set``):

(a) photos in two class folders: train-tokenizer, encode-dataset --labels folders --flip-copies,
    verify-shards, train-prior (class-conditional), sample --class, info;
(b) S-FLCKR photos + label maps: a tiny segmentation tokenizer, encode-dataset --cond seg with the
    image tokenizer of (a), verify-shards, train-prior on 4x4 windows, a sample larger than the
    window from one map with --window fast;
(c) D-RIN photos named by a file list with their depth maps: image and depth tokenizers trained
    from the list, encode-dataset --cond depth, verify-shards, a depth-conditioned prior.

Expectations come from the files (photo counts, folder names, map values, PNG sizes) and from the
documented held-out rule, never from the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vqgan_cli.cli import app

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CLASSES = ("geysir", "norway")  # the two S-FLCKR groups with the most example photos
PHOTO = (".jpg", ".jpeg", ".png")
# f16 tokenizers small enough for two CPU steps: 5 levels of width 32, one block each
TINY_AE = ["model.autoencoder.ch=32", "model.autoencoder.ch_mult=[1,1,1,1,1]",
           "model.autoencoder.num_res_blocks=1", "model.autoencoder.z_channels=16",
           "model.quantizer.n_embed=64", "model.quantizer.embed_dim=16", "data.size=64",
           "data.resize=64", "data.val_count=2", "train.max_steps=2", "train.batch_size=2",
           "data.workers=0"]
TINY_GPT = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "train.max_steps=2",
            "train.batch_size=2", "train.val_batches=50", "data.workers=0"]


def cli(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"vqgan {' '.join(map(str, args))}\n{res.output}\n{res.exception!r}"
    return res.output


def sets(pairs: list[str]) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


def held_out(key: str, fraction: float) -> bool:
    """The split rule train-prior documents: the first 8 bytes of sha256(key), little-endian."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0 ** 64 < fraction


def prior_record(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return json.loads(meta["config"]), json.loads(meta["info"])


def last_val(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "val"][-1]


def shard_members(folder: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                out[m.name] = t.extractfile(m).read()  # type: ignore[union-attr]
    return out


def test_own_photos_then_own_photos_with_label_maps(examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # ---- (a) photos in class folders ------------------------------------------------------------
    photos = tmp_path / "photos"
    for name in CLASSES:
        (photos / name).mkdir(parents=True)
        for src in sorted((examples / "sflckr_images" / name).iterdir()):
            (photos / name / src.name).symlink_to(src)
    n_photos = sum(1 for p in photos.rglob("*") if p.suffix.lower() in PHOTO)
    assert n_photos == 6

    cli("train-tokenizer", RECIPES / "custom.yaml", *sets(
        ["data.train=photos", "data.val=null", "train.out_dir=runs/custom", "loss.perceptual_weight=0",
         *TINY_AE]))
    tok = Path("runs/custom/tokenizer.safetensors")
    assert tok.is_file()

    cli("encode-dataset", "--tokenizer", tok, "--data", "photos", "--labels", "folders", "--size", "64",
        "--flip-copies", "--workers", "0", "--out", "runs/custom/shards")
    assert "all good" in cli("verify-shards", "runs/custom/shards")
    m = json.loads(Path("runs/custom/shards/manifest.json").read_text())
    assert m["counts"]["samples"] == n_photos and m["grid"] == [4, 4]  # 64 px / 16
    assert sorted(m["labels"]["names"]) == sorted(CLASSES) and m["labels"]["n_classes"] == 2
    members = shard_members(Path("runs/custom/shards"))
    # one class label and an original + mirrored encoding per photo: 2 x the photos
    cls = {k[:-4]: int(v) for k, v in members.items() if k.endswith(".cls")}
    assert len([k for k in members if k.endswith((".tokens.npy", ".tokens_flip.npy"))]) == 2 * n_photos
    assert set(cls.values()) == {0, 1}
    for key, index in cls.items():
        assert m["labels"]["names"][index] == key.split("/")[0]  # the photo's own folder

    fraction = 0.34
    cli("train-prior", RECIPES / "custom_prior.yaml", *sets(
        ["data.shards=runs/custom/shards", f"data.tokenizer={tok}", "train.out_dir=runs/custom_prior",
         "model.cond=class", f"data.val_fraction={fraction}", *TINY_GPT]))
    prior = Path("runs/custom_prior/prior.safetensors")
    config, info = prior_record(prior)
    assert config["cond"]["kind"] == "class" and config["cond"]["n_classes"] == 2
    assert info["held_out"]["val_fraction"] == pytest.approx(fraction)
    n_val = sum(held_out(k, fraction) for k in cls)
    assert 0 < n_val < n_photos
    assert last_val(Path("runs/custom_prior"))["tokens"] == n_val * 16  # every held-out grid, once

    cli("sample", "--prior", prior, "--class", "1", "--size", "64x64", "--n", "1", "--out", "samples/a")
    pngs = sorted(Path("samples/a").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (64, 64)
    shown = json.loads(cli("info", prior, "--json"))
    assert shown["conditioning"]["n_classes"] == 2
    assert shown["held_out"] == {"shards": str(Path("runs/custom/shards").resolve()), "val_fraction": fraction}

    # ---- (b) photos + segmentation maps --------------------------------------------------------
    images, maps = examples / "sflckr_images", examples / "sflckr_segmentations"
    n_maps = sum(1 for _ in maps.rglob("*.png"))
    values = set()
    for p in maps.rglob("*.png"):
        values |= set(np.unique(np.asarray(Image.open(p))).tolist())
    cli("train-tokenizer", RECIPES / "sflckr_segmentation.yaml", *sets(
        [f"data.train={images}", f"data.maps={maps}", "train.out_dir=runs/custom_segmentation", *TINY_AE]))
    seg_tok = Path("runs/custom_segmentation/tokenizer.safetensors")
    cli("encode-dataset", "--tokenizer", tok, "--data", images, "--cond", "seg", "--cond-tokenizer", seg_tok,
        "--cond-data", maps, "--size", "128", "--workers", "0", "--out", "runs/custom/seg_shards")
    assert "all good" in cli("verify-shards", "runs/custom/seg_shards")
    m = json.loads(Path("runs/custom/seg_shards/manifest.json").read_text())
    assert m["counts"]["samples"] == n_maps == 25 and m["grid"] == [8, 8]
    # the label vocabulary the map tokenizer was built for (182 COCO-Stuff labels) holds every
    # value found in the maps, and the maps use many of them
    assert m["cond"]["kind"] == "seg" and m["cond"]["n_labels"] == 182
    assert max(values) < 182 and len(values) > 10
    cond_grids = [k for k in shard_members(Path("runs/custom/seg_shards")) if k.endswith(".cond.npy")]
    assert len(cond_grids) == n_maps

    # no map tokenizer: --cond labels stores each cell's centre label; every label on a sample's
    # grid is a value of that photo's own map
    cli("encode-dataset", "--tokenizer", tok, "--data", images, "--cond", "labels", "--n-labels", "182",
        "--cond-data", maps, "--size", "128", "--workers", "0", "--out", "runs/custom/label_shards")
    grids = {k[:-len(".cond.npy")]: np.load(io.BytesIO(v))
             for k, v in shard_members(Path("runs/custom/label_shards")).items() if k.endswith(".cond.npy")}
    assert len(grids) == n_maps
    for key, grid in grids.items():
        own = set(np.unique(np.asarray(Image.open(maps / f"{key}.png"))).tolist())
        assert grid.shape == (8, 8) and set(np.unique(grid).tolist()) <= own, key
    assert len(set(np.concatenate([g.ravel() for g in grids.values()]).tolist())) > 5

    cli("train-prior", RECIPES / "custom_seg_prior.yaml", *sets(
        ["data.shards=runs/custom/seg_shards", f"data.tokenizer={tok}", "train.out_dir=runs/custom_seg_prior",
         "data.crop=[4,4]", "data.val_fraction=0.2", *TINY_GPT]))
    seg_prior = Path("runs/custom_seg_prior/prior.safetensors")
    config, info = prior_record(seg_prior)
    assert config["cond"]["kind"] == "spatial" and config["grid"] == [4, 4]
    assert info["held_out"]["val_fraction"] == pytest.approx(0.2)

    landscape = next(p for p in sorted(maps.rglob("*.png")) if Image.open(p).width > Image.open(p).height)
    cli("sample", "--prior", seg_prior, "--cond", landscape, "--size", "160x96", "--window", "fast",
        "--n", "1", "--out", "samples/b")
    pngs = sorted(Path("samples/b").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (160, 96)  # 10x6 tokens > the 4x4 window


def test_from_a_file_list_with_depth_maps(examples, tmp_path, monkeypatch):
    """(c) D-RIN photos named by a file list (relative to --root) with their depth maps: a tiny
    image tokenizer and depth tokenizer trained from the list, depth-conditioned shards."""
    monkeypatch.chdir(tmp_path)
    images, depth = examples / "drin_images", examples / "drin_depth"
    lines = [ln.strip() for ln in (examples / "drin_examples.txt").read_text().splitlines() if ln.strip()]
    listed = [ln for ln in lines if (images / ln).is_file()]
    assert len(listed) == len(lines) >= 10  # every listed photo exists
    Path("train.txt").write_text("\n".join(listed) + "\n")
    common = ["data.train=train.txt", f"data.root={images}", "data.val=null", *TINY_AE]
    cli("train-tokenizer", RECIPES / "custom.yaml", *sets([*common, "train.out_dir=runs/img",
                                                          "loss.perceptual_weight=0"]))
    cli("train-tokenizer", RECIPES / "drin_depth.yaml", *sets([*common, f"data.maps={depth}",
                                                              "train.out_dir=runs/depth"]))
    cli("encode-dataset", "--tokenizer", "runs/img/tokenizer.safetensors", "--data", "train.txt",
        "--root", images, "--cond", "depth", "--cond-tokenizer", "runs/depth/tokenizer.safetensors",
        "--cond-data", depth, "--size", "64", "--workers", "0", "--out", "shards")
    assert "all good" in cli("verify-shards", "shards")
    m = json.loads(Path("shards/manifest.json").read_text())
    assert m["counts"]["samples"] == len(listed) and m["grid"] == [4, 4]  # one per listed photo; 64 px / 16
    assert m["cond"]["kind"] == "depth"
    keys = {k.split(".")[0] for k in shard_members(Path("shards")) if k.endswith(".cond.npy")}
    assert len(keys) == len(listed)  # a depth token grid for every photo
    cli("train-prior", RECIPES / "custom_seg_prior.yaml", *sets([
        "data.shards=shards", "data.tokenizer=runs/img/tokenizer.safetensors", "train.out_dir=runs/prior",
        "data.crop=[4,4]", "data.val_fraction=0.2", *TINY_GPT]))
    config, _ = prior_record(Path("runs/prior/prior.safetensors"))
    assert config["cond"]["kind"] == "spatial", config["cond"]
