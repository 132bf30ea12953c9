"""The stage-one loop: outputs, exact resume, disc_start, non-finite guard, signals, DDP."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from factory import tokenizer_recipe as tiny_recipe

from vqgan_cli.checkpoints.format import load_state, read_weights
from vqgan_cli.train import TrainingError
from vqgan_cli.train.tokenizer import train_tokenizer


def test_run_writes_metrics_images_checkpoints_and_tokenizer(tmp_path):
    res = train_tokenizer(tiny_recipe(tmp_path / "run"), "tiny")
    run = tmp_path / "run"
    assert res.steps == 4 and res.stopped_by_signal is None
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "nll", "q_loss", "adaptive_weight", "codebook_usage", "perplexity", "lr", "images_per_s"):
        assert key in train[-1], key
    assert train[0]["disc_factor"] == 0.0 and train[-1]["disc_factor"] == 1.0
    assert train[-1]["lr"] == pytest.approx(1e-4 * 4)
    assert [r["step"] for r in val] == [2, 4]
    assert 0.0 < val[-1]["codebook_usage"] <= 1.0 and val[-1]["psnr"] > 0
    assert sorted(p.name for p in (run / "images").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000002.safetensors", "step_0000002.state.pt",
                     "step_0000004.safetensors", "step_0000004.state.pt"]
    w = read_weights(run / "tokenizer.safetensors")
    assert w.format == "vqgan-tokenizer" and w.config["quantizer"]["n_embed"] == 16
    assert (run / "recipe.yaml").is_file()


def _final_state(run: Path) -> tuple[dict, dict]:
    w = read_weights(run / "tokenizer.safetensors").state_dict
    ckpts = sorted((run / "checkpoints").glob("*.state.pt"))
    return w, load_state(ckpts[-1])


def test_resume_is_exact(tmp_path):
    train_tokenizer(tiny_recipe(tmp_path / "straight"), "tiny")
    first = train_tokenizer(tiny_recipe(tmp_path / "split", "train.max_steps=2"), "tiny")
    assert first.steps == 2
    second = train_tokenizer(tiny_recipe(tmp_path / "split"), "tiny")
    assert second.steps == 4
    (wa, sa), (wb, sb) = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for k in sa["discriminator"]:
        assert torch.equal(sa["discriminator"][k], sb["discriminator"][k]), k
    assert (sa["epoch"], sa["batch"]) == (sb["epoch"], sb["batch"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_a_different_recipe(tmp_path):
    from vqgan_cli.config import ConfigError

    train_tokenizer(tiny_recipe(tmp_path / "r", "train.max_steps=2"), "tiny")
    with pytest.raises(ConfigError, match="quantizer.n_embed"):
        train_tokenizer(tiny_recipe(tmp_path / "r", "model.quantizer.n_embed=32"), "tiny")
    res = train_tokenizer(tiny_recipe(tmp_path / "r", "model.quantizer.n_embed=32", "train.max_steps=1"),
                          "tiny", overwrite=True)
    assert res.steps == 1


def test_discriminator_untouched_before_disc_start(tmp_path):
    from vqgan_cli.train.losses import TokenizerLoss

    recipe = tiny_recipe(tmp_path / "r", "loss.disc_start=100", "train.max_steps=3", "train.ckpt_every=3")
    train_tokenizer(recipe, "tiny")
    state = load_state(tmp_path / "r" / "checkpoints" / "step_0000003.state.pt")
    torch.manual_seed(recipe.train.seed)
    from vqgan_cli.models.vqgan import VQGAN

    VQGAN(recipe.model)  # same construction order as the loop, so the same initial weights
    fresh = TokenizerLoss(recipe.loss, "image", 3).discriminator.state_dict()
    for k, v in fresh.items():
        if k.endswith("num_batches_tracked") or "running" in k:
            continue  # BatchNorm statistics move in every forward, by design
        assert torch.equal(v, state["discriminator"][k]), k
    assert state["opt_d"]["state"] == {}


def test_nonfinite_losses_skip_then_stop_with_checkpoint_intact(tmp_path, monkeypatch):
    from vqgan_cli.train import losses

    original = losses.TokenizerLoss.generator_loss

    def poisoned(self, x, x_hat, q_loss, step, last_layer):
        out = original(self, x, x_hat, q_loss, step, last_layer)
        return out._replace(total=out.total * float("nan")) if step >= 2 else out

    monkeypatch.setattr(losses.TokenizerLoss, "generator_loss", poisoned)
    recipe = tiny_recipe(tmp_path / "r", "train.max_steps=10", "train.ckpt_every=1", "train.max_nonfinite=3")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train_tokenizer(recipe, "tiny")
    ckpts = sorted((tmp_path / "r" / "checkpoints").glob("*.safetensors"))
    assert ckpts[-1].name == "step_0000004.safetensors"  # steps 3 and 4 were skipped, not saved after
    w = read_weights(ckpts[-1]).state_dict
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    state = load_state(ckpts[-1].with_name("step_0000004.state.pt"))
    assert state["nonfinite"] == 2


def test_sigint_saves_and_resumes(tmp_path, monkeypatch):
    from vqgan_cli.train import losses

    original = losses.TokenizerLoss.generator_loss

    def interrupt_at_step_1(self, x, x_hat, q_loss, step, last_layer):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, x_hat, q_loss, step, last_layer)

    monkeypatch.setattr(losses.TokenizerLoss, "generator_loss", interrupt_at_step_1)
    res = train_tokenizer(tiny_recipe(tmp_path / "r", "train.ckpt_every=100"), "tiny")
    assert res.stopped_by_signal == 130 and res.steps == 2
    assert (tmp_path / "r" / "checkpoints" / "step_0000002.safetensors").is_file()
    assert not (tmp_path / "r" / "tokenizer.safetensors").exists()
    monkeypatch.setattr(losses.TokenizerLoss, "generator_loss", original)
    assert train_tokenizer(tiny_recipe(tmp_path / "r", "train.ckpt_every=100"), "tiny").steps == 4


_SLOW_VALIDATION = """
import os, sys, time
import vqgan_cli.train.validation as V
real = V.batch_metrics
said = []

def slow(*a, **kw):  # the first batch's metrics say validation is under way; SLOW_VAL: 0.5 s a batch
    if not said:
        said.append(print("validation started", flush=True))
    if os.environ.get("SLOW_VAL"):
        time.sleep(0.5)
    return real(*a, **kw)

V.batch_metrics = slow
sys.argv = ["vqgan", *sys.argv[1:]]
from vqgan_cli.cli import main
main()
"""


@pytest.mark.slow
def test_sigterm_in_the_final_validation_exits_143_at_once_and_the_rerun_completes(tmp_path):
    """``vqgan train-tokenizer`` in its own process, stopped by a real SIGTERM while its final
    validation (40 batches, 20 s) runs; the same command again finishes that validation."""
    import subprocess
    import sys
    import time

    from factory import TOKENIZER_RECIPE

    recipe = json.loads(json.dumps(TOKENIZER_RECIPE))
    recipe["data"]["val_count"] = 160
    recipe["train"].update(out_dir=str(tmp_path / "run"), val_every=4, val_batches=40)
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    (tmp_path / "cli.py").write_text(_SLOW_VALIDATION)
    command = [sys.executable, str(tmp_path / "cli.py"), "train-tokenizer", str(tmp_path / "r.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(command, env={**env, "SLOW_VAL": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "validation started", proc.stderr.read()[-3000:]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    err = " ".join(err.split())
    assert proc.returncode == 143, err[-3000:]
    assert waited < 5, f"{waited:.1f} s from SIGTERM to exit"
    assert "stopped by signal at step 4" in err
    run = tmp_path / "run"
    assert not (run / "tokenizer.safetensors").exists()
    assert load_state(run / "checkpoints" / "step_0000004.state.pt")["val_due"] is True

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "from step 4" in " ".join(again.stderr.split())  # resumed, not restarted
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [4] and val[0]["images"] == 160  # the whole validation, once
    assert read_weights(run / "tokenizer.safetensors").format == "vqgan-tokenizer"


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_identical(tmp_path, run_two_ranks):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, pathlib, torch
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from factory import tokenizer_recipe as tiny_recipe
        from vqgan_cli.train import tokenizer as T
        models, writes = [], []
        build = T.VQGAN
        T.VQGAN = lambda cfg: models.append(build(cfg)) or models[-1]
        save = T.save_tokenizer
        T.save_tokenizer = lambda *a: writes.append(1) or save(*a)
        T.train_tokenizer(tiny_recipe(pathlib.Path({str(tmp_path / "run")!r}),
                                      "train.max_steps=3", "train.ckpt_every=3"), "tiny")
        rank = int(os.environ["RANK"])
        torch.save({{"weights": models[0].state_dict(), "writes": len(writes)}},
                   {str(tmp_path)!r} + f"/rank{{rank}}.pt")
    """))
    run_two_ranks(script)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["writes"] == 2 and r1["writes"] == 0  # step checkpoint + final tokenizer, rank 0 only
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    saved = read_weights(tmp_path / "run" / "tokenizer.safetensors").state_dict
    assert all(torch.equal(saved[k], v) for k, v in r0["weights"].items())
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_0000003.safetensors", "step_0000003.state.pt"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if json.loads(x)["split"] == "train"] == [1, 2, 3]


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    common = ("loss.disc_start=1000", "model.quantizer.restart_dead=false", "train.max_steps=1",
              "data.flip=false")
    train_tokenizer(tiny_recipe(tmp_path / "big", *common, "train.batch_size=4"), "tiny")
    train_tokenizer(tiny_recipe(tmp_path / "acc", *common, "train.batch_size=2", "train.accumulate=2"), "tiny")
    a = read_weights(tmp_path / "big" / "tokenizer.safetensors").state_dict
    b = read_weights(tmp_path / "acc" / "tokenizer.safetensors").state_dict
    init = tiny_recipe(tmp_path / "x")
    torch.manual_seed(init.train.seed)
    from vqgan_cli.models.vqgan import VQGAN

    fresh = VQGAN(init.model).state_dict()
    # Adam's first step is about lr * sign(grad), so summation-order rounding in near-zero
    # gradients can flip a few elements' steps; the update as a whole must agree to < 1%.
    update = torch.cat([(a[k] - fresh[k]).flatten() for k in a])
    gap = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert update.norm() > 0.01
    assert gap.norm() / update.norm() < 0.01


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from vqgan_cli.checkpoints.format import atomic_write

    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"good")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temp file left behind


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    common = ("train.max_steps=2", "loss.disc_start=1", "model.quantizer.restart_dead=false")
    train_tokenizer(tiny_recipe(tmp_path / "eager", *common), "tiny")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train_tokenizer(tiny_recipe(tmp_path / "compiled", *common, "train.compile=true"), "tiny")
    # encoder and decoder compile whole; the quantizer's bookkeeping stays outside the graphs
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    a = read_weights(tmp_path / "eager" / "tokenizer.safetensors").state_dict
    b = read_weights(tmp_path / "compiled" / "tokenizer.safetensors").state_dict
    gap = torch.cat([(a[k] - b[k]).flatten() for k in a]).abs().max()
    assert gap < 1e-3  # fused kernels round differently; the same two updates were applied


def test_validation_at_the_scale_of_use(tmp_path):
    """data.val_scene adds held-out whole scenes at that size; large_psnr is their mean PSNR,
    recomputed here from the saved tokenizer with the formula 10 log10(4 / MSE) on [-1, 1]."""
    import numpy as np

    from vqgan_cli import load_tokenizer
    from vqgan_cli.data.landscapes import render_landscape

    recipe = tiny_recipe(tmp_path / "run", "data.builtin_sizes=[16,64]", "data.val_scene=[48,32]",
                         "data.val_scene_count=2", "model.autoencoder.norm=pixel")
    train_tokenizer(recipe, "tiny")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "val"][-1]
    tok = load_tokenizer(tmp_path / "run" / "tokenizer.safetensors").eval()
    values = []
    for k in range(2):
        img = render_landscape(1_000_000 + k, 32, 48).image
        x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            _, idx = tok.encode(x)
            x_hat = tok.decode_indices(idx).clamp(-1, 1)
        values.append(float(10 * torch.log10(4 / ((x_hat - x) ** 2).mean())))
    assert last["large_images"] == 2
    assert last["large_psnr"] == pytest.approx(sum(values) / 2, abs=1e-3)
    assert (tmp_path / "run" / "images" / "large_step_0000004.png").is_file()


def test_cosine_schedule_and_betas_reach_both_optimisers(tmp_path):
    """optim.schedule=cosine: the lr of step s (0-based) is peak * (r + (1 - r) * (1 + cos(pi s / S)) / 2),
    written by hand here; the discriminator's Adam follows the same lr and both take optim.betas."""
    import math

    from vqgan_cli.runtime import Runtime
    from vqgan_cli.train.tokenizer import TokenizerStage

    recipe = tiny_recipe(tmp_path / "run", "optim.schedule=cosine", "optim.min_lr_ratio=0.25",
                         "optim.betas=[0.9,0.99]", "loss.disc_start=0")
    train_tokenizer(recipe, "tiny")
    peak, steps, r = 1e-4 * 4, 4, 0.25
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(x["step"], x["lr"]) for x in records if x["split"] == "train"]
    for step, lr in logged:  # the record at step k holds the lr of step k - 1
        s = step - 1
        assert lr == pytest.approx(peak * (r + (1 - r) * (1 + math.cos(math.pi * s / steps)) / 2))
    stage = TokenizerStage(recipe, Runtime(torch.device("cpu")))
    stage.step(iter([{"image": torch.rand(2, 3, 16, 16) * 2 - 1}]), 2)
    for opt in (stage.opt_ae, stage.opt_d):
        assert opt.param_groups[0]["betas"] == (0.9, 0.99)
        assert opt.param_groups[0]["lr"] == pytest.approx(peak * (r + (1 - r) * (1 + math.cos(math.pi / 2)) / 2))
