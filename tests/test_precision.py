"""precision: auto picks bf16 only where the hardware computes it natively, and every run says so.

The CPU's capability is faked both ways by replacing torch's own feature queries, so these tests
hold on any machine (an AVX2 laptop or an avx512_bf16 server).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factory import tokenizer_recipe as tiny_recipe

from vqgan_cli import runtime as P
from vqgan_cli.train.tokenizer import TokenizerStage, train_tokenizer

CPU = torch.device("cpu")


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(avx512_bf16=..., amx=...): torch's CPU feature queries answer as told."""

    def fake(avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return fake


@pytest.fixture
def fake_cuda(monkeypatch):
    """fake_cuda(bf16=...): a CUDA device named 'Fake GPU' that does or does not compute bf16."""

    def fake(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")

    return fake


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected", "named"), [
    (True, False, "bf16", "avx512_bf16"),
    (False, True, "bf16", "amx_bf16"),
    (True, True, "bf16", "avx512_bf16, amx_bf16"),
    (False, False, "fp32", "no avx512_bf16 or AMX"),
])
def test_auto_on_a_cpu_follows_its_bf16_features(fake_cpu, avx512_bf16, amx, expected, named):
    fake_cpu(avx512_bf16=avx512_bf16, amx=amx)
    for training in (True, False):
        choice = P.resolve_precision("auto", CPU, training=training)
        assert (choice.name, choice.requested, choice.slow) == (expected, "auto", False)
        assert named in choice.reason and choice.reason.startswith("auto: ")


def test_explicit_bf16_on_an_emulating_cpu_runs_with_a_warning_naming_the_fix(fake_cpu):
    fake_cpu(avx512_bf16=False, amx=False)
    choice = P.resolve_precision("bf16", CPU, key="train.precision")
    assert choice.name == "bf16" and choice.slow
    text = P.slow_bf16_warning(choice, "train.precision")
    assert "emulated" in text and "slower than fp32" in text
    assert "train.precision=auto" in text and "train.precision=fp32" in text
    fake_cpu(avx512_bf16=True)
    native = P.resolve_precision("bf16", CPU)
    assert native.name == "bf16" and not native.slow and P.slow_bf16_warning(native) is None
    assert P.resolve_precision("fp32", CPU).name == "fp32"


def test_fp16_on_a_cpu_and_unknown_names_are_usage_errors(fake_cpu):
    fake_cpu(avx512_bf16=True)
    with pytest.raises(P.PrecisionError, match="--precision=fp16 needs a CUDA device"):
        P.resolve_precision("fp16", CPU, key="--precision")
    with pytest.raises(P.PrecisionError, match="train.precision: must be one of auto, fp32, bf16, fp16, got 'half'"):
        P.resolve_precision("half", CPU, key="train.precision")


def test_auto_on_cuda_is_bf16_where_supported_else_fp16_for_training_and_fp32_otherwise(fake_cuda):
    gpu = torch.device("cuda", 0)
    fake_cuda(bf16=True)
    assert P.resolve_precision("auto", gpu).name == "bf16"
    assert P.resolve_precision("auto", gpu, training=False).name == "bf16"
    assert "Fake GPU computes bf16" in P.resolve_precision("auto", gpu).reason
    fake_cuda(bf16=False)
    training = P.resolve_precision("auto", gpu, training=True)
    assert training.name == "fp16" and "loss scaling" in training.reason
    assert P.resolve_precision("auto", gpu, training=False).name == "fp32"
    with pytest.raises(P.PrecisionError):
        P.resolve_precision("fp16", gpu, training=False)  # sampling has no fp16 path


def test_without_torch_queries_the_cpu_flags_decide(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert P.cpu_bf16_features() == ["avx512_bf16"]
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx2", "fma"})
    assert P.cpu_bf16_features() == [] and P.resolve_precision("auto", CPU).name == "fp32"


@pytest.mark.parametrize(("native", "expected", "dtype"), [(False, "fp32", None), (True, "bf16", torch.bfloat16)])
def test_a_training_run_uses_prints_and_records_autos_choice(tmp_path, fake_cpu, capsys, native, expected, dtype):
    """The tiny tokenizer recipe with train.precision=auto: the stage computes in the chosen
    dtype, the console says which and why, metrics.jsonl and the final weights record it."""
    fake_cpu(avx512_bf16=native)
    recipe = tiny_recipe(tmp_path / "run", "train.precision=auto", "train.max_steps=2")
    from vqgan_cli.runtime import Runtime

    stage = TokenizerStage(recipe, Runtime(CPU))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with stage.amp:
        out = stage.model(x)
    assert out.x_hat.dtype == (dtype or torch.float32)

    train_tokenizer(recipe, "tiny")
    err = capsys.readouterr().err
    assert f"precision: {expected} (auto: " in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    run = [r for r in records if r["split"] == "run"]
    assert len(run) == 1 and run[0]["step"] == 0
    assert (run[0]["precision"], run[0]["precision_requested"]) == (expected, "auto")
    assert run[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    from vqgan_cli.checkpoints.format import read_weights

    info = read_weights(tmp_path / "run" / "tokenizer.safetensors").info
    assert info["precision"] == expected and info["precision_requested"] == "auto"


def test_explicit_bf16_on_an_emulating_cpu_warns_at_the_start_of_training(tmp_path, fake_cpu, capsys):
    fake_cpu(avx512_bf16=False)
    train_tokenizer(tiny_recipe(tmp_path / "run", "train.precision=bf16", "train.max_steps=1"), "tiny")
    err = " ".join(capsys.readouterr().err.split())
    assert "precision: bf16 (asked for; this CPU" in err
    assert "warning: train.precision=bf16 on a CPU without avx512_bf16 or AMX" in err
    assert "set train.precision=auto or train.precision=fp32" in err


def test_the_shipped_recipes_choose_their_precision_by_the_hardware():
    import yaml

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) > 10
    for path in recipes:
        train = (yaml.safe_load(path.read_text()) or {}).get("train", {})
        assert train.get("precision", "auto") == "auto", path.name
