"""`vqgan sample` / `vqgan upscale` end to end on tiny random checkpoints: files, sidecars,
byte-identical reruns, completion, and every bad input caught before sampling (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import cond_config, saved_prior, saved_tokenizer, tokenizer, tokenizer_config
from factory import prior as factory_prior
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.checkpoints.load import load_tokenizer
from vqgan_cli.cli import app
from vqgan_cli.data.transforms import image_to_tensor
from vqgan_cli.images import to_uint8
from vqgan_cli.models.prior import CondConfig
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.sample.inputs import load_models
from vqgan_cli.sample.plan import plan_sample, sampling_options
from vqgan_cli.sample.request import SampleRequest
from vqgan_cli.sample.run import sample_batch

runner = CliRunner()



TOK = {"resolution": 8, "attn_resolutions": ()}  # f = 2, 16 codes: the priors read 4x4 crops of 8x8 px


def save_prior_for(tok: VQGAN, path: Path, cond: str | CondConfig, seed: int, **kw) -> Path:
    """A 4x4-crop prior over ``tok``'s 16 codes, its GPT drawn wide so samples are not uniform."""
    model = factory_prior(cond, seed=seed, spread=0.3, image_vocab=16, **kw)
    return saved_prior(path, model, tokenizer_model=tok)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    tok = tokenizer(seed=0, **TOK)
    saved_tokenizer(d / "tok.safetensors", tok)
    saved_tokenizer(d / "other.safetensors", seed=1, **TOK)
    save_prior_for(tok, d / "sos.safetensors", "sos", 2)
    save_prior_for(tok, d / "class.safetensors", "class", 3)  # 5 classes
    save_prior_for(tok, d / "labels.safetensors", cond_config("labels", null_token=16), 4,  # 8 labels, f = 2
                   vocab_size=17, cond_dropout=0.1)
    save_prior_for(tok, d / "sr.safetensors", cond_config("lowres", tokenizer=tokenizer_config(**TOK)), 5)
    Image.fromarray(np.full((10, 10), 3, np.uint8)).save(d / "map10.png")
    bad = np.zeros((8, 8), np.uint8)
    bad[2, 2] = 9
    Image.fromarray(bad).save(d / "bad_labels.png")
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "small.png")
    return {p.stem: p for p in d.iterdir()}


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def png_pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def sample(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, ["sample", *args])
    return r.exit_code, r.output


def test_unconditional_files_sidecars_and_byte_identical_reruns(ckpts, tmp_path) -> None:
    for run in ("a", "b"):
        code, out = sample("--prior", str(ckpts["sos"]), "--n", "3", "--batch-size", "2",
                           "--seed", "5", "--top-k", "8", "--out", str(tmp_path / run), "--grid")
        assert code == 0, out
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == ["0000_seed5.png", "0001_seed6.png", "0002_seed7.png", "grid_seed5.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    side = json.loads((tmp_path / "a" / "0001_seed6.json").read_text())
    assert side["seed"] == 6 and side["size"] == [8, 8] and side["settings"]["top_k"] == 8
    assert side["checkpoints"]["tokenizer"].endswith("tok.safetensors")
    assert len(side["checkpoints"]["prior_sha256"]) == 64
    # image 1 alone, with its own seed, is the same picture
    code, out = sample("--prior", str(ckpts["sos"]), "--n", "1", "--seed", "6", "--top-k", "8",
                       "--out", str(tmp_path / "c"))
    assert code == 0, out
    assert png_pixels(tmp_path / "c" / "0000_seed6.png") == \
        png_pixels(tmp_path / "a" / "0001_seed6.png")


def test_class_and_map_conditioned_window_with_guidance(ckpts, tmp_path) -> None:
    code, out = sample("--prior", str(ckpts["class"]), "--class", "1", "--class", "4", "--n", "1",
                       "--out", str(tmp_path / "cls"))
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "cls").glob("*.png")) == \
        ["0000_class1_seed0.png", "0001_class4_seed1.png"]
    code, out = sample("--prior", str(ckpts["labels"]), "--cond", "builtin:landscapes:3",
                       "--size", "20x12", "--cfg-scale", "2", "--n", "2", "--out", str(tmp_path / "seg"))
    assert code == 0, out
    assert png_size(tmp_path / "seg" / "0001_seed1.png") == (20, 12)
    code, out = sample("--prior", str(ckpts["labels"]), "--cond", str(ckpts["map10"]),
                       "--size", "16x12", "--window", "exact", "--out", str(tmp_path / "map"))
    assert code == 0, out
    assert "resized (nearest neighbour)" in out and "16x12" in out
    assert png_size(tmp_path / "map" / "0000_seed0.png") == (16, 12)


def test_completion_keeps_the_top_rows(ckpts, tmp_path) -> None:
    init = np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(init).save(tmp_path / "init.png")
    models = load_models(ckpts["sos"], None, torch.device("cpu"))
    with torch.no_grad():  # the oracle: the tokenizer's own tokens of the (unresized) 16x12 image
        own = load_tokenizer(ckpts["tok"]).encode(image_to_tensor(init)[None]).indices  # (1, 6, 8)
    # f = 2: an 8x8 sample is a 4x4 grid (the crop: a plain prefix), 16x12 a 6x8 grid (the window);
    # --keep 0.5 keeps the top half of the rows
    for size, grid, rows in (("8x8", (4, 4), 2), ("16x12", (6, 8), 3)):
        req = SampleRequest(prior=str(ckpts["sos"]), init=str(tmp_path / "init.png"), keep=0.5,
                            size=size, n=2)
        notes: list[str] = []
        plan = plan_sample(req, models, notes)
        toks = sample_batch(models, plan, sampling_options(req, models), [0, 1])
        assert tuple(toks.shape) == (2, *grid)
        known = torch.zeros(grid, dtype=torch.bool)
        known[:rows] = True
        assert torch.equal(plan.known.reshape(grid).bool(), known)
        if size == "16x12":
            assert torch.equal(plan.init, own)
        assert torch.equal(toks[:, :rows], plan.init.expand(2, -1, -1)[:, :rows])
        assert not torch.equal(toks[:, rows:], plan.init.expand(2, -1, -1)[:, rows:])
        # the 16x12 init image is resized for an 8x8 sample only, and the note says so
        assert any("resized to 8x8" in n for n in notes) == (size == "8x8"), notes
    code, out = sample("--prior", str(ckpts["sos"]), "--init", str(tmp_path / "init.png"),
                       "--size", "16x12", "--out", str(tmp_path / "done"), "--n", "1")
    assert code == 0, out


@pytest.mark.parametrize("args, message", [
    (["--size", "15x12"], "nearest valid sizes: 14x12, 16x12"),
    (["--size", "6x6"], "smaller than the prior's crop 8x8"),
    (["--top-k", "0"], "--top-k must be in [1, 16]"),
    (["--top-k", "17"], "--top-k must be in [1, 16]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--cond", "builtin:landscapes:1"], "this prior is unconditional: drop --cond"),
    (["--class", "2"], "this prior is unconditional: drop --class"),
    (["--cfg-scale", "3"], "no null token"),
    (["--tokenizer", "OTHER"], "is not the tokenizer"),
    (["--size", "16x12", "--window", "per-token"], "--window must be one of exact, fast, got 'per-token'"),
    (["--size", "16x12", "--window", "exact", "--window-memory", "0.001"],
     "--window-memory 0.001 MiB cannot hold one window forward"),
    (["--size", "16x12", "--window", "fast", "--window-memory", "0.001"],
     "--window-memory 0.001 MiB cannot hold the fast window's caches"),
    (["--size", "16x12", "--window", "fast", "--segment", "4"], "--segment must be in [1, 3]"),
    (["--size", "16x12", "--window", "fast", "--band-rows", "5"], "--band-rows must be in [1, 4]"),
])
def test_bad_input_exits_2_before_sampling(ckpts, tmp_path, args, message) -> None:
    args = [str(ckpts["other"]) if a == "OTHER" else a for a in args]
    code, out = sample("--prior", str(ckpts["sos"]), "--out", str(tmp_path / "o"), *args)
    assert code == 2, out
    assert message in " ".join(out.split())
    assert not list(tmp_path.glob("o/*.png"))


@pytest.mark.parametrize("prior, args, message", [
    ("class", ["--class", "5"], "--class 5 is out of range: the prior knows 5 classes"),
    ("class", [], "pass --class"),
    ("class", ["--cond", "x.png"], "use --class, not --cond"),
    ("labels", [], "pass --cond MAP.png"),
    ("labels", ["--cond", "BAD"], "label value 9 is outside 0..7"),
    ("sos", [], None),
])
def test_conditioning_mismatches(ckpts, tmp_path, prior, args, message) -> None:
    args = [str(ckpts["bad_labels"]) if a == "BAD" else a for a in args]
    code, out = sample("--prior", str(ckpts[prior]), "--out", str(tmp_path / "o"), "--n", "1", *args)
    if message is None:
        assert code == 0, out
        return
    assert code == 2, out
    assert message in " ".join(out.split())


def test_fast_window_and_defaults_reach_the_sidecar(ckpts, tmp_path) -> None:
    code, out = sample("--prior", str(ckpts["sos"]), "--size", "16x12", "--window", "fast",
                       "--segment", "2", "--n", "1", "--out", str(tmp_path / "f"))
    assert code == 0, out
    settings = json.loads((tmp_path / "f" / "0000_seed0.json").read_text())["settings"]
    assert (settings["window"], settings["segment"], settings["device"]) == ("fast", 2, "auto")
    code, out = sample("--prior", str(ckpts["sos"]), "--size", "16x12", "--n", "1", "--window", "exact",
                       "--out", str(tmp_path / "e"))
    assert code == 0, out
    settings = json.loads((tmp_path / "e" / "0000_seed0.json").read_text())["settings"]
    assert settings["window"] == "exact"
    code, out = sample("--prior", str(ckpts["sos"]), "--size", "16x12", "--n", "1",
                       "--out", str(tmp_path / "d"))
    assert code == 0, out
    assert json.loads((tmp_path / "d" / "0000_seed0.json").read_text())["settings"]["window"] == "exact"  # the default
    assert png_pixels(tmp_path / "e" / "0000_seed0.png") != png_pixels(tmp_path / "f" / "0000_seed0.png")


@pytest.mark.parametrize(("native", "expected"), [(False, "fp32"), (True, "bf16")])
def test_precision_auto_follows_the_cpu_and_reaches_the_sidecar(ckpts, tmp_path, monkeypatch, native, expected):
    """The CPU's bf16 support faked both ways: auto's choice is printed, recorded beside the asked
    value, and equals asking for that precision explicitly (same pixels)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    common = ("--prior", str(ckpts["sos"]), "--size", "16x12", "--n", "1", "--window", "fast")
    code, out = sample(*common, "--out", str(tmp_path / "auto"))
    assert code == 0, out
    assert f"precision: {expected} (auto: " in " ".join(out.split())
    settings = json.loads((tmp_path / "auto" / "0000_seed0.json").read_text())["settings"]
    assert (settings["precision"], settings["precision_used"]) == ("auto", expected)
    code, out = sample(*common, "--precision", expected, "--out", str(tmp_path / "explicit"))
    assert code == 0, out
    assert png_pixels(tmp_path / "auto" / "0000_seed0.png") == png_pixels(tmp_path / "explicit" / "0000_seed0.png")


def test_non_raster_prior_samples_only_its_crop(tmp_path) -> None:
    tok = tokenizer(**TOK)
    saved_tokenizer(tmp_path / "tok.safetensors", tok)
    save_prior_for(tok, tmp_path / "z.safetensors", "sos", 2, permuter="zcurve")
    code, out = sample("--prior", str(tmp_path / "z.safetensors"), "--size", "16x12", "--out",
                       str(tmp_path / "o"))
    assert code == 2, out
    assert "--size: this prior reads tokens in 'zcurve' order" in " ".join(out.split())
    assert not list(tmp_path.glob("o/*.png"))
    code, out = sample("--prior", str(tmp_path / "z.safetensors"), "--n", "1", "--out", str(tmp_path / "c"))
    assert code == 0, out


def test_upscale(ckpts, tmp_path) -> None:
    r = runner.invoke(app, ["upscale", str(ckpts["small"]), "--prior", str(ckpts["sr"]), "--scale", "2",
                            "--n", "2", "--out", str(tmp_path / "up.png")])
    assert r.exit_code == 0, r.output
    outs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert outs == ["up_00_seed0.png", "up_01_seed1.png"]
    assert png_size(tmp_path / "up_00_seed0.png") == (16, 12)
    r = runner.invoke(app, ["upscale", str(ckpts["small"]), "--prior", str(ckpts["sos"]),
                            "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "not a super-resolution prior" in " ".join(r.output.split())


# ---- --save-tokens: each image's token grid beside its PNG ----------------------------------------


def decoded_pixels(tok: VQGAN, tokens: np.ndarray) -> np.ndarray:
    """The oracle: the tokenizer's own decode of a saved grid, as the uint8 picture a PNG holds."""
    with torch.no_grad():
        return to_uint8(tok.decode_indices(torch.from_numpy(tokens)[None])[0])


def test_save_tokens_beside_each_png_decode_to_its_pixels(ckpts, tmp_path) -> None:
    tok = load_tokenizer(ckpts["tok"])
    # f = 2: 16x12 pixels is a 6-row, 8-column grid, sampled through the window
    code, out = sample("--prior", str(ckpts["sos"]), "--size", "16x12", "--n", "2", "--save-tokens",
                       "--out", str(tmp_path / "s"))
    assert code == 0, out
    for name in ("0000_seed0", "0001_seed1"):
        side = json.loads((tmp_path / "s" / f"{name}.json").read_text())
        assert side["tokens"] == f"{name}.tokens.npy" and side["grid"] == [6, 8]
        tokens = np.load(tmp_path / "s" / side["tokens"])
        assert tokens.shape == (6, 8) and tokens.dtype == np.int64
        with Image.open(tmp_path / "s" / f"{name}.png") as im:
            png = np.asarray(im.convert("RGB")).astype(np.int16)
        assert np.abs(decoded_pixels(tok, tokens).astype(np.int16) - png).max() <= 1
    # without the option: no token files, no entry
    code, out = sample("--prior", str(ckpts["sos"]), "--n", "1", "--out", str(tmp_path / "plain"))
    assert code == 0, out
    assert not list((tmp_path / "plain").glob("*.npy"))
    assert "tokens" not in json.loads((tmp_path / "plain" / "0000_seed0.json").read_text())


def test_upscale_saves_tokens_too(ckpts, tmp_path) -> None:
    r = runner.invoke(app, ["upscale", str(ckpts["small"]), "--prior", str(ckpts["sr"]), "--scale", "2",
                            "--save-tokens", "--out", str(tmp_path / "up.png")])
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "up.json").read_text())
    assert side["tokens"] == "up.tokens.npy"
    tokens = np.load(tmp_path / "up.tokens.npy")
    assert list(tokens.shape) == side["grid"]
    with Image.open(tmp_path / "up.png") as im:
        png = np.asarray(im.convert("RGB")).astype(np.int16)
    assert np.abs(decoded_pixels(load_tokenizer(ckpts["tok"]), tokens).astype(np.int16) - png).max() <= 1


def test_skip_existing_draws_again_the_images_saved_without_tokens(ckpts, tmp_path) -> None:
    """Tokens cannot be read back from a PNG: an image asked for with --save-tokens but saved
    without them is drawn again (the same seed: the same picture), the others are kept."""
    d = tmp_path / "s"
    common = ("--prior", str(ckpts["sos"]), "--n", "2", "--out", str(d))
    assert sample(*common)[0] == 0
    before = {p.name: p.read_bytes() for p in d.glob("*.png")}
    code, out = sample(*common, "--skip-existing", "--save-tokens")
    assert code == 0, out
    assert "already in" not in out  # both drawn again
    assert {p.name: p.read_bytes() for p in d.glob("*.png")} == before
    assert sorted(p.name for p in d.glob("*.npy")) == ["0000_seed0.tokens.npy", "0001_seed1.tokens.npy"]
    (d / "0001_seed1.tokens.npy").unlink()
    code, out = sample(*common, "--skip-existing", "--save-tokens")
    assert code == 0, out
    assert "1 of 2 image(s) were already in" in " ".join(out.split())
    assert (d / "0001_seed1.tokens.npy").is_file()
    # asking for no tokens keeps finished images (and their tokens); drawing over them drops stale ones
    code, out = sample(*common, "--skip-existing")
    assert code == 0, out
    assert "2 of 2 image(s) were already in" in " ".join(out.split()) and len(list(d.glob("*.npy"))) == 2
    assert sample(*common)[0] == 0
    assert not list(d.glob("*.npy")) and "tokens" not in json.loads((d / "0000_seed0.json").read_text())


def test_one_token_tiles_draw_what_exact_draws(ckpts, tmp_path) -> None:
    """``--segment 1 --band-rows 1``: every fast tile is one token with the reference's window."""
    common = ("--prior", str(ckpts["labels"]), "--cond", str(ckpts["map10"]), "--size", "16x12", "--n", "2",
              "--top-k", "8", "--save-tokens")
    grids = {}
    for name, extra in (("exact", ("--window", "exact")), ("tiles", ("--window", "fast", "--segment", "1",
                                                                      "--band-rows", "1")),
                        ("fast", ("--window", "fast"))):
        code, out = sample(*common, *extra, "--out", str(tmp_path / name))
        assert code == 0, out
        grids[name] = [np.load(tmp_path / name / f"000{i}_seed{i}.tokens.npy") for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(grids["exact"], grids["tiles"], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(grids["exact"], grids["fast"], strict=True))
    settings = json.loads((tmp_path / "tiles" / "0000_seed0.json").read_text())["settings"]
    assert (settings["segment"], settings["band_rows"]) == (1, 1)


def test_compiled_decoding_draws_the_eager_image(ckpts, tmp_path) -> None:
    for name, flag in (("eager", "--no-compile"), ("compiled", "--compile")):
        code, out = sample("--prior", str(ckpts["sos"]), "--n", "2", "--top-k", "8", flag,
                           "--out", str(tmp_path / name))
        assert code == 0, out
    for i in range(2):
        png = f"000{i}_seed{i}.png"
        assert png_pixels(tmp_path / "eager" / png) == png_pixels(tmp_path / "compiled" / png)
    assert json.loads((tmp_path / "compiled" / "0000_seed0.json").read_text())["settings"]["compile"] is True
