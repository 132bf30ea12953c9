"""Every stage-two recipe loads, names its commands, and gives the released shapes on shards
of the kind its header says to encode (tiny stand-in shards: only the manifest's shape matters)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from factory import gpt, token_shards

from vqgan_cli.config import load_recipe
from vqgan_cli.train.prior import PriorRecipe, prior_config, train_prior
from vqgan_cli.train.prior_data import resolve_data

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# recipe -> (shard grid, codebook, cond vocab, classes, expected block size, expected GPT params)
EXPECTED = {
    "quickstart_prior": ((8, 8), 256, 8, None, 64 + 63, None),
    "ffhq_prior": ((16, 16), 1024, None, None, 256, None),
    "celebahq_prior": ((16, 16), 1024, None, None, 256, None),
    "imagenet_class_prior": ((16, 16), 16384, None, 1000, 256, 1.4e9),
    "sflckr_prior": ((32, 32), 1024, 182, None, 511, None),
    "drin_prior": ((16, 16), 1024, 1024, None, 511, None),
    "superres_prior": ((16, 16), 1024, 1024, None, 511, None),
    "custom_prior": ((16, 16), 1024, None, None, 256, None),
    "custom_seg_prior": ((32, 32), 1024, 1024, None, 511, None),
}


def test_every_prior_recipe_is_listed():
    assert {p.stem for p in RECIPES.glob("*_prior.yaml")} == set(EXPECTED)


def gpt_params(cfg) -> int:  # noqa: ANN001 - a GPTConfig
    C, V, T, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    per_layer = 4 * (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C
    return V * C + T * C + L * per_layer + 2 * C + C * V


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_and_gives_the_released_shapes(tmp_path, name):
    path = RECIPES / f"{name}.yaml"
    text = path.read_text()
    assert re.search(rf"vqgan train-prior recipes/{name}\.yaml", text), "header must show the command"
    for ref in re.findall(r"recipes/(\w+)\.yaml", text):
        assert (RECIPES / f"{ref}.yaml").is_file(), f"header names a missing recipe {ref}"
    recipe = load_recipe(PriorRecipe, path)
    assert recipe.name == name and recipe.data.shards and recipe.data.tokenizer
    grid, n_embed, cond_vocab, classes, block, params = EXPECTED[name]
    assert (recipe.model.cond == "spatial") == (cond_vocab is not None)
    assert (recipe.model.cond == "class") == (classes is not None)
    shards = token_shards(tmp_path / "s", n=8, grid=grid, n_embed=n_embed, cond_vocab=cond_vocab,
                         classes=classes, per_shard=8)
    over = [f"data.shards={shards}", "data.tokenizer=null", "train.batch_size=1"]
    if recipe.data.val is not None:
        over.append(f"data.val={shards}")
    recipe = load_recipe(PriorRecipe, path, over)
    data = resolve_data(recipe.data, recipe.model.cond, recipe.model.sos_token, recipe.model.cond_dropout,
                        recipe.train.batch_size)
    cfg = prior_config(recipe, data)
    assert cfg.gpt.block_size == block
    assert cfg.gpt.vocab_size == max(n_embed, cond_vocab or 0, classes or 0)
    if params is not None:
        assert gpt_params(cfg.gpt) == pytest.approx(params, rel=0.05)


def test_quickstart_prior_trains_a_step_on_stand_in_shards(tmp_path):
    shards = token_shards(tmp_path / "s", n=16, grid=(8, 8), n_embed=256, cond_vocab=8, per_shard=8)
    recipe = load_recipe(PriorRecipe, RECIPES / "quickstart_prior.yaml",
                         [f"data.shards={shards}", "data.tokenizer=null", "train.batch_size=2",
                          "train.max_steps=1", "train.val_batches=1", "data.val_fraction=0.2",
                          f"train.out_dir={tmp_path / 'run'}"])
    res = train_prior(recipe, "quickstart_prior")
    assert res.steps == 1 and res.prior.is_file()
    # one step at a small learning rate leaves the 0.02 init nearly uniform over the 256 codes:
    # cross-entropy ln 256 plus about half the variance of its small random logits
    assert res.val["loss"] == pytest.approx(math.log(256), abs=0.25)
    assert res.val["bits_per_token"] == pytest.approx(res.val["loss"] / math.log(2))
    assert res.val["tokens"] == 1 * 2 * 64  # val_batches x batch_size x 8x8 tokens


# ---- benchmarks/prior_step.py: its baseline computes our maths, and it runs ----------------------


def _reference_gpt():
    """benchmarks/reference_gpt.py (prior_step.py's baseline), imported as the scripts import it."""
    import importlib
    import sys

    sys.path.append(str(RECIPES.parent / "benchmarks"))
    return importlib.import_module("reference_gpt")


def test_benchmark_baseline_is_the_same_function_as_ours():
    import torch

    bench = _reference_gpt()
    ours = gpt(vocab_size=40, block_size=17, n_layer=2, n_head=4)
    torch.nn.init.normal_(ours.pos_emb, std=0.02, generator=torch.Generator().manual_seed(1))  # exercised
    ref = bench.RefGPT(ours.cfg)
    ref.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 40, (3, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ref(idx), ours(idx), atol=1e-5, rtol=1e-5)


def test_benchmark_quick_reports_the_quickstart_model_and_consistent_numbers():
    import subprocess
    import sys

    from vqgan_cli.models.gpt import GPTConfig

    proc = subprocess.run([sys.executable, str(RECIPES.parent / "benchmarks" / "prior_step.py"), "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    machine, header, _, *rows = proc.stdout.splitlines()
    assert machine.startswith("machine: ") and "CPU capability" in machine and "bf16 " in machine
    # the quickstart model (4 x 256, 4 heads) over 256 codes, 8x8 image tokens after 8x8 label
    # tokens: 64 + 64 - 1 = 127 positions; --quick: batch 2
    cfg = GPTConfig(vocab_size=256, block_size=127, n_layer=4, n_head=4, n_embd=256)
    assert f"4 layers x 256 wide, 4 heads, {gpt_params(cfg):,} parameters; batch 2 x 127 tokens" in header
    names = [r[:32].strip() for r in rows]
    # bf16 is timed only where the CPU computes it natively (emulated it is ~10x slower than fp32)
    bf16 = ["ours bf16 autocast"] if "bf16 native" in machine else []
    assert names == ["reference fp32 (minGPT eager)", "ours fp32 (SDPA)", *bf16]
    medians, per_s, ratios = zip(*[(float(a), float(b), float(c.rstrip("x"))) for a, b, c in
                                   (r[32:].split() for r in rows)], strict=True)
    # Printed to 4, 0 and 2 decimals: each check allows exactly the rounding of the numbers it
    # reads, so it holds at any speed (a slow CPU prints small rates whose rounding is coarse).
    for med, tps, ratio in zip(medians, per_s, ratios, strict=True):
        rate = 2 * 127 / med  # from the median, whose rounding (5e-5 s) moves it by rate * 5e-5 / med
        assert abs(rate - tps) <= 0.5 + rate * 5e-5 / med + 1e-6
        # the ratio from the rates, each rounded by up to 0.5
        expected = tps / per_s[0]
        assert abs(ratio - expected) <= 0.005 + expected * (0.5 / tps + 0.5 / per_s[0]) + 1e-6
