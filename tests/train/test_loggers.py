"""TensorBoard events read back with tensorboard's own reader equal metrics.jsonl (across a
crash past the last checkpoint and its resume); curves.png panels hold the jsonl's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factory import prior_recipe, saved_tokenizer, token_shards, tokenizer, tokenizer_recipe
from PIL import Image

from vqgan_cli.config import ConfigError
from vqgan_cli.train.curves import curve_panels, write_curves
from vqgan_cli.train.tokenizer import TokenizerRecipe, train_tokenizer

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

def _recipe(out: Path, *overrides: str) -> TokenizerRecipe:
    """The shared tiny tokenizer recipe at batch 2 with 4 validation scenes (4 steps, val at 2 and 4)."""
    return tokenizer_recipe(out, "train.batch_size=2", "data.val_count=4", *overrides)


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                     "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_crash_and_resume(tmp_path, monkeypatch):
    from vqgan_cli.train import losses

    original = losses.TokenizerLoss.generator_loss

    def crash_at_step_3(self, x, x_hat, q_loss, step, last_layer):
        if step == 3:  # steps 1-3 are logged, the last checkpoint is step 2
            raise RuntimeError("simulated crash")
        return original(self, x, x_hat, q_loss, step, last_layer)

    run = tmp_path / "run"
    monkeypatch.setattr(losses.TokenizerLoss, "generator_loss", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_tokenizer(_recipe(run, "train.loggers=[jsonl,tensorboard]"), "tiny")
    before = _events(run)
    assert [e.step for e in before.Scalars("train/loss")] == [1, 2, 3]  # step 3 is past the checkpoint
    crashed_loss_3 = before.Scalars("train/loss")[2].value
    monkeypatch.setattr(losses.TokenizerLoss, "generator_loss", original)
    assert train_tokenizer(_recipe(run, "train.loggers=[jsonl,tensorboard]"), "tiny").steps == 4

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = _events(run)
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                tag = f"{r['split']}/{k}"
                assert r["step"] not in expected.setdefault(tag, {}), (tag, r["step"])
                expected[tag][r["step"]] = float(v)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(by_step), tag  # each step once, in order
        for e in events:
            assert e.value == pytest.approx(by_step[e.step], rel=1e-6, abs=1e-30), (tag, e.step)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    # the resumed step 3 is the replay from the checkpoint, not the crashed run's (same value, since
    # resume is exact, but it is the only one kept)
    assert acc.Scalars("train/loss")[2].value == pytest.approx(crashed_loss_3, rel=1e-6)

    grids = acc.Images("reconstructions")
    assert [g.step for g in grids] == [2, 4]
    png = np.asarray(Image.open(run / "images" / "step_0000004.png").convert("RGB"))
    assert (grids[-1].height, grids[-1].width) == png.shape[:2]
    hist = acc.Histograms("train/codes_used")
    assert [h.step for h in hist] == [1, 2, 3, 4]
    assert all(0 <= h.histogram_value.min and h.histogram_value.max < 16 for h in hist)

    curves = Image.open(run / "curves.png")
    assert curves.size[0] > 500 and curves.size[1] > 300


def test_tensorboard_without_the_package_is_a_recipe_error_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real(name, *a))
    with pytest.raises(ConfigError) as err:
        _recipe(tmp_path / "r", "train.loggers=[jsonl,tensorboard]")
    assert "train.loggers" in str(err.value) and "vqgan[tensorboard]" in str(err.value)
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        _recipe(tmp_path / "r", "train.loggers=[jsonl,wandb]")


def test_curve_panels_hold_the_jsonl_numbers_by_split(tmp_path):
    records = [{"step": 1, "split": "train", "loss": 2.0, "lr": 1e-3, "codebook_usage": 0.5, "g_loss": 0.0},
               {"step": 2, "split": "train", "loss": 1.5, "lr": 1e-3, "codebook_usage": "nan"},
               {"step": 2, "split": "val", "psnr": 20.5, "codebook_usage": 0.25},
               {"step": 3, "split": "train", "loss": float("nan"), "lr": 5e-4}]
    panels = {p.title: p for p in curve_panels(records)}
    assert set(panels) == {"loss", "PSNR (dB)", "codebook usage", "learning rate"}
    (loss,) = panels["loss"].series  # g_loss, zero throughout, is not drawn
    assert (loss.label, loss.steps, loss.values) == ("train loss", [1, 2], [2.0, 1.5])  # nan left out
    usage = {s.label: (s.steps, s.values) for s in panels["codebook usage"].series}
    assert usage == {"train codebook_usage": ([1], [0.5]), "val codebook_usage": ([2], [0.25])}
    assert panels["learning rate"].log and panels["learning rate"].series[0].values == [1e-3, 1e-3, 5e-4]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = write_curves(tmp_path)
    assert out == tmp_path / "curves.png" and Image.open(out).size[0] > 500
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_curves(empty) is None


def test_prior_run_logs_scalars_and_sample_grids_to_tensorboard(tmp_path):
    from vqgan_cli.images import to_uint8
    from vqgan_cli.train.prior import train_prior

    # f = 2 over the shards' 32 codes: 4x4 tokens decode to 8x8 pixels
    tok = tokenizer(resolution=8, attn_resolutions=(), z_channels=4, n_embed=32, embed_dim=4)
    tok_path = saved_tokenizer(tmp_path / "tok.safetensors", tok)
    shards = token_shards(tmp_path / "shards", n_embed=32)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tok_path)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "prior"
    train_prior(prior_recipe(shards, run, "train.loggers=[jsonl,tensorboard]"), "p")

    acc = _events(run)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and v == v:
                (event,) = [e for e in acc.Scalars(f"{r['split']}/{k}") if e.step == r["step"]]
                assert event.value == pytest.approx(v, rel=1e-6, abs=1e-30), (k, r["step"])
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [2, 4]
    png = np.asarray(Image.open(run / "images" / "samples_step_0000004.png").convert("RGB"))
    assert (grids[-1].height, grids[-1].width) == png.shape[:2]
    # top row: the validation tokens decoded by the tokenizer the shards name (4 samples of 4x4
    # tokens -> 8x8 pixels each, 2 px padding)
    val = [r for r in records if r["split"] == "val"]
    assert val and (run / "curves.png").is_file()
    import torch

    from vqgan_cli.train.prior_data import build_split, collate_tokens, resolve_data

    recipe = prior_recipe(shards, run)
    data = resolve_data(recipe.data, recipe.model.cond, recipe.model.sos_token, recipe.model.cond_dropout,
                        recipe.train.batch_size)
    ds = build_split(data, recipe.data, validation=True, seed=recipe.train.seed, with_cond=data.cond.spatial)
    first = next(iter(torch.utils.data.DataLoader(ds, batch_size=recipe.train.batch_size,
                                                  collate_fn=collate_tokens, num_workers=0)))
    with torch.no_grad():
        expected = to_uint8(tok.decode_indices(first["tokens"][:4].long()).clamp(-1, 1))  # (B, 8, 8, 3)
    for i in range(expected.shape[0]):
        x0 = 2 + i * (8 + 2)
        assert np.array_equal(png[2:10, x0:x0 + 8], expected[i]), i
