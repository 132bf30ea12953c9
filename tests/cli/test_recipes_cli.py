"""Every shipped recipe validates; the CLI reports recipe and setup problems with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vqgan_cli.cli import app
from vqgan_cli.config import ConfigError, load_recipe
from vqgan_cli.train.tokenizer import TokenizerRecipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TOKENIZER_RECIPES = ["quickstart", "celebahq", "ffhq", "imagenet_f16_1024", "imagenet_f16_16384", "custom",
                     "sflckr", "sflckr_segmentation", "drin_depth"]
runner = CliRunner()


@pytest.mark.parametrize("name", TOKENIZER_RECIPES)
def test_recipe_validates_except_for_data_the_user_provides(name):
    path = RECIPES / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and f"vqgan train-tokenizer recipes/{name}.yaml" in text
    try:
        r = load_recipe(TokenizerRecipe, path)
    except ConfigError as e:
        # The only acceptable problems: data folders the user has not put in place yet.
        assert all("path does not exist: data/" in p for p in e.problems), e.problems
        return
    assert name == "quickstart" and r.data.train == "builtin:landscapes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_no_recipe_fixes_the_loader_workers(path):
    """A fixed count (8) made PyTorch warn on small machines; ``auto`` fits each one."""
    import yaml

    assert yaml.safe_load(path.read_text()).get("data", {}).get("workers", "auto") == "auto"


def test_released_hyper_parameters():
    def rec(name: str) -> dict:
        import yaml

        return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())

    big = rec("imagenet_f16_16384")
    assert big["model"]["quantizer"]["n_embed"] == 16384
    assert (big["loss"]["disc_start"], big["loss"]["disc_weight"], big["loss"]["disc_num_layers"]) == (0, 0.75, 2)
    small = rec("imagenet_f16_1024")
    assert (small["loss"]["disc_start"], small["loss"]["disc_weight"]) == (250001, 0.8)
    for name in ("celebahq", "ffhq"):
        assert rec(name)["loss"]["disc_start"] == 30001
    seg = rec("sflckr_segmentation")["model"]
    assert seg["n_labels"] == 182 and seg["autoencoder"]["in_channels"] == 182
    assert rec("drin_depth")["model"]["autoencoder"]["in_channels"] == 1
    for name in TOKENIZER_RECIPES[1:]:
        ae = rec(name)["model"]["autoencoder"]
        arch = (ae["ch"], ae["ch_mult"], ae["num_res_blocks"], ae["attn_resolutions"])
        assert arch == (128, [1, 1, 2, 2, 4], 2, [16])


def test_cli_recipe_errors_exit_2_with_dotted_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  disc_start: soon\ntrain:\n  batch_size: 0\n  colour: red\n")
    res = runner.invoke(app, ["train-tokenizer", str(bad)])
    assert res.exit_code == 2
    out = res.output
    assert "loss.disc_start: expected int, got 'soon'" in out
    assert "train.batch_size: must be >= 1, got 0" in out
    assert "train.colour: unknown key" in out
    assert "Traceback" not in out


def test_cli_set_override_error_and_missing_recipe(tmp_path):
    res = runner.invoke(app, ["train-tokenizer", str(RECIPES / "quickstart.yaml"), "--set", "model.quantizer.kind=pq"])
    assert res.exit_code == 2 and "model.quantizer.kind: must be one of" in res.output
    res = runner.invoke(app, ["train-tokenizer", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "recipe file not found" in res.output


def test_cli_missing_lpips_weights_stop_before_training(tmp_path):
    res = runner.invoke(app, ["train-tokenizer", str(RECIPES / "quickstart.yaml"),
                              "--set", "loss.perceptual_weight=1.0", "--set", f"train.out_dir={tmp_path / 'run'}"])
    assert res.exit_code == 2
    flat = " ".join(res.output.split())
    assert "vgg16-397923af.pth" in flat and "perceptual_weight=0" in flat
    assert not (tmp_path / "run").exists()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "train-tokenizer" in res.output
