"""The official releases from the command line: run folders, ``--config``, every conditioning
kind the released YAMLs use, errors in the user's words, and ``vqgan info``.

The models are tiny official-layout files built by ``official_files``. The
oracle for sampling is the Python path written out here (load_prior/load_tokenizer with the
YAML, conditioning input built by hand from the release's data convention, sample_sequence with
one generator per seed, decode_indices): the CLI must write exactly its pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factory import tokenizer_config
from official_files import (
    GRID,
    KINDS,
    RES,
    make_prior_case,
    make_tokenizer,
    save_lightning,
    tokenizer_state,
    tokenizer_yaml,
)
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.checkpoints.load import load_prior, load_tokenizer
from vqgan_cli.cli import app
from vqgan_cli.images import to_uint8
from vqgan_cli.models.prior import Prior
from vqgan_cli.sample.tokens import SamplingOptions, make_generators, sample_sequence

runner = CliRunner()
STAMP = "2020-11-09T13-31-51"
DATA = {  # the data section of each release's project YAML (taming/data/*.py)
    "sflckr": {"target": "taming.data.sflckr.Examples", "params": {"size": 256}},
    "coco": {"target": "taming.data.coco.CocoImagesAndCaptionsTrain",
             "params": {"size": 296, "crop_size": 256, "onehot_segmentation": True, "use_stuffthing": True}},
    "ade20k": {"target": "taming.data.ade20k.ADE20kTrain", "params": {"size": 256}},
    "drin": {"target": "taming.data.imagenet.RINTrainWithDepth", "params": {"size": 256}},
}


def with_cond_stage(cond_cfg, seed: int = 0):
    """A spatial case (like make_prior_case("spatial")) with another conditioning tokenizer."""
    _, _, state, node = make_prior_case("spatial", seed=seed)
    cond_tok = make_tokenizer(cond_cfg, seed + 1)
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state.update(tokenizer_state(cond_tok, "cond_stage_model.", with_loss=False))
    node["params"]["cond_stage_config"] = tokenizer_yaml(cond_cfg)
    node["params"]["cond_stage_key"] = "depth" if cond_cfg.modality == "depth" else "segmentation"
    node["params"].pop("permuter_config", None)
    state = {k: v for k, v in state.items() if not k.startswith("permuter.")}
    return state, node


def first_stage_as_cond():
    """``cond_stage_config: __is_first_stage__``: conditioned on an image, encoded by the first stage."""
    state, node = with_cond_stage(KINDS["segmentation"]())
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    state.update({"cond_stage_model." + k[len("first_stage_model."):]: v
                  for k, v in state.items() if k.startswith("first_stage_model.")})
    node["params"]["cond_stage_config"] = "__is_first_stage__"
    node["params"]["cond_stage_key"] = "image"
    return state, node


CASES = {
    "ffhq": lambda: make_prior_case("sos", sos_token=0)[2:],
    "cin": lambda: make_prior_case("class")[2:],
    "sflckr": lambda: with_cond_stage(KINDS["segmentation"]()),
    "coco": lambda: with_cond_stage(tokenizer_config(modality="segmentation", n_labels=183, n_embed=12)),
    "ade20k": lambda: with_cond_stage(tokenizer_config(modality="segmentation", n_labels=151, n_embed=12)),
    "drin": lambda: with_cond_stage(tokenizer_config(modality="depth", n_embed=12)),
    "faceshq": lambda: make_prior_case("coord")[2:],
    "image": first_stage_as_cond,
}


def release(root: Path, name: str, older_yaml: bool = True) -> tuple[Path, Path, dict]:
    """logs/<stamp>_<name>/ with checkpoints/last.ckpt and configs/<stamp>-project.yaml;
    an older project YAML (wrong heads) beside it must not be the one chosen."""
    state, node = CASES[name]()
    run = root / "logs" / f"{STAMP}_{name}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    save_lightning(run / "checkpoints" / "last.ckpt", state)
    full = {"model": node}
    if name in DATA:
        full["data"] = {"target": "main.DataModuleFromConfig",
                        "params": {"batch_size": 2, "train": DATA[name], "validation": DATA[name]}}
    yml = run / "configs" / f"{STAMP}-project.yaml"
    yml.write_text(yaml.safe_dump(full))
    if older_yaml:
        old = yaml.safe_load(yml.read_text())
        old["model"]["params"]["transformer_config"]["params"]["n_head"] = 4
        (run / "configs" / "2020-11-01T00-00-00-project.yaml").write_text(yaml.safe_dump(old))
    return run, yml, full


def cli(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---- the Python path (oracle) ------------------------------------------------------------------

def python_sample(ckpt: Path, yml: Path, cond_input: torch.Tensor | None, seed: int,
                  top_k: int | None = None, cls: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    prior: Prior = load_prior(ckpt, config=yml)
    tok = load_tokenizer(ckpt, config=yml)
    if prior.cond.kind == "class":
        c = prior.cond_tokens(torch.tensor([cls]))
    else:
        c = prior.cond_tokens(cond_input, batch_size=1)
    opts = SamplingOptions(1.0, top_k, None, 1.0, n_tokens=tok.config.quantizer.n_embed)
    with torch.no_grad():
        seq = sample_sequence(prior.gpt, c, GRID * GRID, opts, make_generators([seed]))
        tokens = prior.unpermute(seq).reshape(1, GRID, GRID)
        image = to_uint8(tok.decode_indices(tokens))[0]
    return tokens, image


def seg_png(path: Path, n_labels: int, unlabelled_255: bool = False) -> np.ndarray:
    rng = np.random.default_rng(3)
    top = n_labels - 1 if unlabelled_255 else n_labels
    arr = rng.integers(0, top, (RES, RES)).astype(np.uint8)
    if unlabelled_255:
        arr[:4, :4] = 255
    Image.fromarray(arr, mode="L").save(path)
    return arr


def one_hot(labels: np.ndarray, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), n).permute(2, 0, 1)[None].float()


def depth_png(path: Path) -> np.ndarray:
    depth = np.random.default_rng(4).uniform(0.5, 9.0, (RES, RES)).astype("<f4")
    Image.fromarray(depth[..., None].view(np.uint8).reshape(RES, RES, 4), mode="RGBA").save(path)
    return depth


# ---- 1. one way to name a model ----------------------------------------------------------------

def test_folder_ckpt_and_config_give_the_pngs_of_convert_then_sample(tmp_path):
    run, yml, _ = release(tmp_path, "ffhq")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", elsewhere / "model.ckpt")
    shutil.copy(yml, elsewhere / "model.yaml")
    code, out = cli("convert", str(run), str(tmp_path / "conv.safetensors"))
    assert code == 0, out
    common = ["--n", "2", "--seed", "3", "--top-k", "8"]
    ways = {"conv": ["--prior", str(tmp_path / "conv.safetensors")],
            "folder": ["--prior", str(run)],
            "ckpt": ["--prior", str(run / "checkpoints" / "last.ckpt")],
            "config": ["--prior", str(elsewhere / "model.ckpt"), "--config", str(elsewhere / "model.yaml")]}
    for name, args in ways.items():
        code, out = cli("sample", *args, *common, "--out", str(tmp_path / name))
        assert code == 0, (name, out)
        if name in ("folder", "ckpt"):  # the YAML used is named, the newest of the two
            assert f"{STAMP}-project.yaml (newest of 2)" in out.replace("\n", "")
    for png in ("0000_seed3.png", "0001_seed4.png"):
        ref = pixels(tmp_path / "conv" / png)
        for name in ("folder", "ckpt", "config"):
            assert np.array_equal(pixels(tmp_path / name / png), ref), (name, png)
    side = json.loads((tmp_path / "folder" / "0000_seed3.json").read_text())["checkpoints"]
    assert side["prior"] == str(run / "checkpoints" / "last.ckpt") and side["config"] == str(yml)
    assert len(side["config_sha256"]) == 64  # the YAML that made the model is recorded with it
    # and they are the Python path's pixels
    _, image = python_sample(run / "checkpoints" / "last.ckpt", yml, None, 3, top_k=8)
    assert np.array_equal(pixels(tmp_path / "folder" / "0000_seed3.png"), image)


def test_reconstruct_and_convert_take_the_folder(tmp_path):
    run, yml, _ = release(tmp_path, "ffhq", older_yaml=False)
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(img)
    code, out = cli("reconstruct", str(img), "--tokenizer", str(run), "--out", str(tmp_path / "rec"))
    assert code == 0, out
    assert f"config {yml}" in "".join(out.split("\n"))  # the YAML used is named
    code, out = cli("convert", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "c.safetensors"))
    assert code == 0 and f"config {yml}" in "".join(out.split("\n"))
    tok = load_tokenizer(run / "checkpoints" / "last.ckpt", config=yml)
    from vqgan_cli.data.transforms import image_to_tensor
    with torch.no_grad():
        x = image_to_tensor(pixels(img).copy())[None]
        want = to_uint8(tok.decode_indices(tok.encode(x).indices))[0]
    assert np.array_equal(pixels(tmp_path / "rec" / "x_rec.png"), want)


# ---- 2. errors in the user's words -------------------------------------------------------------

def test_missing_yaml_names_config_and_where_releases_keep_it(tmp_path):
    run, _, _ = release(tmp_path, "ffhq", older_yaml=False)
    lone = tmp_path / "lone.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    code, out = cli("sample", "--prior", str(lone), "--out", str(tmp_path / "s"))
    assert code == 2
    text = " ".join(out.split())
    assert "lone.ckpt: n_head cannot be read" in text
    assert "pass it with --config PATH" in text and "configs/<date>-project.yaml" in text


def test_folder_without_checkpoint_lists_what_it_found(tmp_path):
    run = tmp_path / "logs" / "2020-11-09T13-31-51_empty"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "a-project.yaml").write_text("model: {}\n")
    (run / "README.txt").write_text("x")
    code, out = cli("sample", "--prior", str(run), "--out", str(tmp_path / "s"))
    assert code == 2
    text = " ".join(out.split())
    assert "no checkpoint in this folder" in text
    assert "found: README.txt, configs/a-project.yaml" in text


def test_yaml_that_does_not_match_names_key_and_both_shapes(tmp_path):
    run, yml, full = release(tmp_path, "ffhq", older_yaml=False)
    full["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["z_channels"] = 4
    yml.write_text(yaml.safe_dump(full))
    code, out = cli("sample", "--prior", str(run), "--out", str(tmp_path / "s"))
    assert code == 2
    text = " ".join(out.split())
    assert "z_channels is 4 but the weights say 8" in text
    assert ("first key that differs: first_stage_model.encoder.conv_out.weight has shape (8, 64, 3, 3) "
            "in the weights, (4, 64, 3, 3) from the YAML") in text
    full["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["z_channels"] = 8
    full["model"]["params"]["transformer_config"]["params"]["block_size"] = 70
    yml.write_text(yaml.safe_dump(full))
    code, out = cli("sample", "--prior", str(run), "--out", str(tmp_path / "s"))
    assert code == 2
    assert ("transformer.pos_emb has shape (1, 64, 32) in the weights, (1, 70, 32) from the YAML"
            in " ".join(out.split()))


def test_config_not_found_and_config_for_our_file(tmp_path):
    run, _, _ = release(tmp_path, "ffhq", older_yaml=False)
    code, out = cli("sample", "--prior", str(run), "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: config file not found (--config)" in " ".join(out.split())
    cli("convert", str(run), str(tmp_path / "c.safetensors"))
    yml = next((run / "configs").glob("*.yaml"))
    code, out = cli("sample", "--prior", str(tmp_path / "c.safetensors"), "--config", str(yml))
    assert code == 2 and "carry their own config; drop --config" in " ".join(out.split())


def test_upscale_names_models_the_same_way(tmp_path):
    """upscale goes through the same resolver: --config is read (and checked) there too."""
    run, _, _ = release(tmp_path, "ffhq", older_yaml=False)
    low = tmp_path / "low.png"
    Image.new("RGB", (8, 8), (90, 120, 200)).save(low)
    code, out = cli("upscale", "--prior", str(run), "--config", str(tmp_path / "nope.yaml"), str(low))
    assert code == 2 and "nope.yaml: config file not found (--config)" in " ".join(out.split())
    code, out = cli("upscale", "--prior", str(run), str(low), "--out", str(tmp_path / "up.png"))
    assert code == 2 and "is not a super-resolution prior" in " ".join(out.split())


# ---- 3. every conditioning kind ------------------------------------------------------------------

def _run_case(tmp_path: Path, name: str, extra: list[str], cond_input, cls=None):
    run, yml, _ = release(tmp_path, name, older_yaml=False)
    code, out = cli("sample", "--prior", str(run), "--n", "1", "--seed", "11", *extra,
                    "--out", str(tmp_path / "out"))
    assert code == 0, out
    png = next((tmp_path / "out").glob("0000_*.png"))
    _, image = python_sample(run / "checkpoints" / "last.ckpt", yml, cond_input, 11, cls=cls)
    assert np.array_equal(pixels(png), image)
    return run


def test_unconditional(tmp_path):
    _run_case(tmp_path, "ffhq", [], None)


def test_class_conditional(tmp_path):
    _run_case(tmp_path, "cin", ["--class", "7"], None, cls=7)


def test_sflckr_segmentation_labels_as_stored(tmp_path):
    labels = seg_png(tmp_path / "seg.png", 182)
    _run_case(tmp_path, "sflckr", ["--cond", str(tmp_path / "seg.png")], one_hot(labels, 182))


def test_coco_segmentation_is_shifted_by_one(tmp_path):
    labels = seg_png(tmp_path / "seg.png", 183, unlabelled_255=True)
    shifted = ((labels.astype(np.int64) + 1) % 256)  # taming/data/coco.py: 255 (unlabelled) -> 0
    _run_case(tmp_path, "coco", ["--cond", str(tmp_path / "seg.png")], one_hot(shifted, 183))


def test_ade20k_segmentation(tmp_path):
    labels = seg_png(tmp_path / "seg.png", 151)
    _run_case(tmp_path, "ade20k", ["--cond", str(tmp_path / "seg.png")], one_hot(labels, 151))


def test_drin_depth(tmp_path):
    d = depth_png(tmp_path / "depth.png")
    norm = (d - d.min()) / (d.max() - d.min()) * 2 - 1  # taming/data/imagenet.py preprocess_depth
    _run_case(tmp_path, "drin", ["--cond", str(tmp_path / "depth.png")],
              torch.from_numpy(norm.astype(np.float32))[None, None])


def test_faceshq_coordinates(tmp_path):
    coord = torch.from_numpy(np.arange(RES * RES).reshape(1, 1, RES, RES) / (RES * RES)).float()
    _run_case(tmp_path, "faceshq", [], coord)


def test_image_conditioned_through_the_first_stage(tmp_path):
    from vqgan_cli.data.transforms import image_to_tensor

    rgb = np.random.default_rng(5).integers(0, 255, (RES, RES, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    _run_case(tmp_path, "image", ["--cond", str(tmp_path / "in.png")], image_to_tensor(rgb.copy())[None])


def test_wrong_input_for_the_kind_exits_2(tmp_path):
    run, _, _ = release(tmp_path, "sflckr", older_yaml=False)
    code, out = cli("sample", "--prior", str(run), "--out", str(tmp_path / "s"))
    assert code == 2 and "pass --cond MAP.png" in out


# ---- 4. vqgan info -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_info_describes_every_release(tmp_path, name):
    run, yml, _ = release(tmp_path, name)
    code, out = cli("info", str(run), "--json")
    assert code == 0, out
    info = json.loads(out)
    prior = load_prior(run / "checkpoints" / "last.ckpt", config=yml)
    assert info["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert info["config"] == {"path": str(yml), "from": "run folder"}
    assert info["conditioning"]["kind"] == prior.cond.kind
    assert info["architecture"]["n_head"] == prior.config.gpt.n_head == 2
    assert info["parameters"] == sum(p.numel() for p in prior.parameters())
    assert info["commands"][0].startswith(f"vqgan sample --prior {run}")
    if name == "coco":
        assert info["conditioning"]["n_labels"] == 183 and info["conditioning"]["label_shift"] == 1
    code, out = cli("info", str(run))
    assert code == 0 and "transformer prior" in out


@pytest.mark.parametrize("kind", list(KINDS))
def test_info_on_every_tokenizer_layout(tmp_path, kind):
    tok = make_tokenizer(KINDS[kind]())
    ck = save_lightning(tmp_path / "t.ckpt", tokenizer_state(tok))
    code, out = cli("info", str(ck), "--json")
    assert code == 0, out
    info = json.loads(out)
    assert info["kind"] == f"{tok.config.modality} tokenizer"
    assert info["tokenizer"]["codebook"]["n_embed"] == 16
    assert info["tokenizer"]["codebook"]["quantizer"] == tok.config.quantizer.kind
    assert info["tokenizer"]["parameters"] == sum(p.numel() for p in tok.parameters())
    assert info["tokenizer"]["architecture"]["ch_mult"] == list(tok.config.autoencoder.ch_mult)
    if kind == "segmentation":
        assert info["tokenizer"]["n_labels"] == 182
    first = "vqgan reconstruct" if kind in ("vq", "gumbel") else "vqgan encode-dataset --cond-tokenizer"
    assert info["commands"][0].startswith(first)
    assert cli("info", str(ck))[0] == 0


def test_info_without_yaml(tmp_path):
    run, _, _ = release(tmp_path, "ffhq", older_yaml=False)
    lone = tmp_path / "lone.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    code, out = cli("info", str(lone), "--json")
    assert code == 0, out
    info = json.loads(out)
    assert info["architecture"]["n_head"] is None and "--config" in info["missing"]


def test_tokenizer_folder_with_model_yaml_and_scene_images_refused(tmp_path):
    cfg = KINDS["vq"]()
    run = tmp_path / "logs" / "vqgan_imagenet_f16_16384"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    save_lightning(run / "checkpoints" / "last.ckpt", tokenizer_state(make_tokenizer(cfg)))
    (run / "configs" / "model.yaml").write_text(yaml.safe_dump({"model": tokenizer_yaml(cfg)}))
    info = json.loads(cli("info", str(run), "--json")[1])
    assert info["config"] == {"path": str(run / "configs" / "model.yaml"), "from": "run folder"}
    scene, yml, full = release(tmp_path, "ffhq", older_yaml=False)
    full["model"]["params"]["cond_stage_key"] = "objects_bbox"
    full["model"]["params"]["cond_stage_config"] = {
        "target": "taming.models.dummy_cond_stage.DummyCondStage", "params": {"conditional_key": "objects_bbox"}}
    yml.write_text(yaml.safe_dump(full))
    code, out = cli("sample", "--prior", str(scene), "--out", str(tmp_path / "s"))
    assert code == 2 and "scene-image transformer conditioned on object bounding boxes" in " ".join(out.split())


def test_encode_dataset_takes_a_folder_and_config(tmp_path):
    from vqgan_cli.data.landscapes import render_landscape
    from vqgan_cli.data.transforms import image_to_tensor
    from vqgan_cli.shards.format import read_manifest, read_shard

    cfg = KINDS["vq"]()
    run = tmp_path / "logs" / "vqgan_tiny"
    (run / "checkpoints").mkdir(parents=True)
    save_lightning(run / "checkpoints" / "last.ckpt", tokenizer_state(make_tokenizer(cfg)))
    yml = tmp_path / "kept_elsewhere.yaml"
    yml.write_text(yaml.safe_dump({"model": tokenizer_yaml(cfg)}))
    for name, args in (("folder", [str(run)]), ("config", [str(run / "checkpoints" / "last.ckpt"),
                                                          "--config", str(yml)])):
        code, out = cli("encode-dataset", "--tokenizer", *args, "--data", "builtin:landscapes",
                        "--limit", "2", "--size", str(RES), "--workers", "0", "--out", str(tmp_path / name))
        assert code == 0, out
    tok = load_tokenizer(run / "checkpoints" / "last.ckpt", config=yml)
    for name in ("folder", "config"):
        got = {s.key: s for p in read_manifest(tmp_path / name).shard_paths() for s in read_shard(p)}
        scene = render_landscape(1, RES, RES)
        with torch.inference_mode():
            want = tok.encode(image_to_tensor(scene.image)[None]).indices.numpy()[0]
        np.testing.assert_array_equal(got["landscape-0000001"].tokens, want)
    bad = yaml.safe_load(yml.read_text())
    bad["model"]["params"]["n_embed"] = 32  # --config is read: a YAML that disagrees is refused
    yml.write_text(yaml.safe_dump(bad))
    code, out = cli("encode-dataset", "--tokenizer", str(run), "--config", str(yml), "--data",
                    "builtin:landscapes", "--limit", "1", "--out", str(tmp_path / "bad"))
    assert code == 2 and "n_embed is 32 but the weights say 16" in " ".join(out.split())
