"""Stage two: conditioning sequences, pkeep, crops, decay groups, exact resume, DDP, bad input.

The official key layout (strict load of a tiny Net2NetTransformer state dict through
``load_prior``) and the KV-cache equivalence are covered in tests/checkpoints/test_official.py
(``test_transformer_loads_strictly_and_matches``) and tests/models/test_gpt.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factory import PRIOR_RECIPE, SHA, cond_config, saved_tokenizer, token_shards, tokenizer
from factory import prior as factory_prior
from factory import prior_recipe as tiny_recipe

from vqgan_cli.checkpoints.format import load_state, read_weights
from vqgan_cli.checkpoints.load import load_prior
from vqgan_cli.config import ConfigError
from vqgan_cli.models.prior import Prior
from vqgan_cli.shards.format import MANIFEST, shard_name
from vqgan_cli.train.optim import scheduled_lr
from vqgan_cli.train.prior import PriorRecipe, train_prior
from vqgan_cli.train.prior_data import build_split, collate_tokens, cond_input, is_held_out, resolve_data


def tiny_prior(kind: str = "sos", null_token: int | None = None, vocab: int = 20, **kw) -> Prior:
    """A 2x2-grid prior, 8 wide, in training mode: sos token 7, 5 classes, or 6 labels at f = 2."""
    extra = {"sos": {"sos_token": 7}, "class": {}, "labels": {"n_labels": 6}}[kind]
    cond = cond_config(kind, null_token=null_token, **extra)
    return factory_prior(cond, grid=(2, 2), vocab_size=vocab, n_embd=8, **kw).train()


# ---- sequences -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sos", "class", "labels"])
def test_conditioning_variants_build_exact_sequences(kind):
    prior = tiny_prior(kind, permuter="alternate")
    z = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])  # (B, h, w) raster
    batch = {"keys": ["a", "b"], "tokens": z, "label": torch.tensor([3, 0]),
             "cond": torch.tensor([[[0, 1], [2, 3]], [[4, 5], [0, 1]]])}
    c = cond_input(batch, prior.cond)
    seq = prior.training_sequences(c, z)
    reading = torch.tensor([[1, 2, 4, 3], [5, 6, 8, 7]])  # alternate rows: row 1 right to left
    expected_c = {"sos": torch.tensor([[7], [7]]), "class": torch.tensor([[3], [0]]),
                  "labels": torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])}[kind]  # cond stays raster
    assert torch.equal(seq.cond, expected_c)
    assert torch.equal(seq.targets, reading)
    inputs = torch.cat((expected_c, reading), 1)[:, :-1]  # what the GPT reads (eval: no corruption)
    assert torch.equal(torch.cat((seq.cond, seq.image), 1)[:, :-1], inputs)
    logits = prior(seq.cond, seq.image)
    assert logits.shape == (2, 4, 20)
    full = prior.gpt(inputs)
    assert torch.equal(logits, full[:, expected_c.shape[1] - 1:])  # predictions of s: the last len(s)


def test_labels_conditioning_from_a_map_matches_encode():
    prior = tiny_prior("labels")
    label_map = torch.arange(16).view(1, 4, 4)  # f = 2: the label at pixel (1, 1) of every cell
    assert torch.equal(prior.cond_tokens(label_map), torch.tensor([[5, 7, 13, 15]]))


def test_pkeep_corrupts_the_expected_share_and_keeps_targets():
    prior = tiny_prior("sos", pkeep=0.7, vocab=1000, image_vocab=1000)
    prior.gpt.cfg.block_size = 10**6  # no forward here; only the sequences
    z = torch.zeros(64, 2, 2, dtype=torch.long).repeat(50, 1, 1)  # 12,800 tokens
    seq = prior.training_sequences(torch.full((3200, 1), 7), z, torch.Generator().manual_seed(0))
    changed = (seq.image != 0).float().mean().item()
    assert changed == pytest.approx(0.3 * (1 - 1 / 1000), abs=0.015)
    assert int(seq.image.max()) < 1000 and torch.equal(seq.targets, torch.zeros_like(seq.targets))
    prior.eval()
    assert torch.equal(prior.training_sequences(torch.full((3200, 1), 7), z).image, seq.targets)


def test_cond_dropout_replaces_whole_samples_with_the_null_token():
    prior = tiny_prior("labels", null_token=19, cond_dropout=0.25)
    c = torch.arange(4).repeat(4000, 1)
    z = torch.zeros(4000, 2, 2, dtype=torch.long)
    seq = prior.training_sequences(c, z, torch.Generator().manual_seed(1))
    dropped = (seq.cond == 19).all(1)
    assert torch.equal(seq.cond[~dropped], c[~dropped]) and ((seq.cond == 19).any(1) == dropped).all()
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(prior.null_cond(2, 4), torch.full((2, 4), 19))


def test_crops_keep_image_and_conditioning_aligned(tmp_path):
    root = token_shards(tmp_path / "s", n=8, grid=(6, 6), n_embed=64, cond_vocab=40)
    recipe = tiny_recipe(root, tmp_path / "r", "data.crop=[3,3]", "data.val_fraction=0.01")
    data = resolve_data(recipe.data, "spatial")
    assert data.grid == (3, 3) and data.crop == (3, 3)
    batch = collate_tokens(list(build_split(data, recipe.data, False, 0, True)))
    # every image token was made from its cond token: (5 c + {0,1}) mod 64 -> alignment holds
    diff = (batch["tokens"] - 5 * batch["cond"]) % 64
    assert ((diff == 0) | (diff == 1)).all() and batch["tokens"].shape[1:] == (3, 3)
    # whole grids when the crop is the grid
    whole = resolve_data(tiny_recipe(root, tmp_path / "r", "data.crop=[6,6]").data, "spatial")
    assert whole.crop is None and whole.grid == (6, 6)


def test_held_out_split_is_by_key():
    keys = [f"k{i}" for i in range(2000)]
    held = [k for k in keys if is_held_out(k, 0.1)]
    assert 150 < len(held) < 250 and held == [k for k in keys if is_held_out(k, 0.1)]


def test_schedule_warmup_then_cosine():
    lrs = [scheduled_lr(s, 1.0, 2, 10, "cosine", 0.1) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 0.1
    assert scheduled_lr(10, 1.0, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert scheduled_lr(5, 1.0, 0, 10, "constant") == 1.0


# ---- the loop ------------------------------------------------------------------------------------


def test_run_writes_metrics_checkpoints_and_a_self_describing_prior(tmp_path):
    root = token_shards(tmp_path / "s")
    res = train_prior(tiny_recipe(root, tmp_path / "run"), "tiny")
    run = tmp_path / "run"
    assert res.steps == 4 and res.stopped_by_signal is None
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    for r in train + val:
        assert r["bits_per_token"] == pytest.approx(r["loss"] / math.log(2))
    assert train[0]["lr"] == pytest.approx(0.5 * 1e-4 * 4)  # warm-up: step 1 of 2
    held_out = sum(is_held_out(f"img-{i:04d}", 0.2) for i in range(48))  # 10 of the 48 samples
    assert val[-1]["tokens"] == min(held_out, 2 * 4) * 4 * 4  # val_batches 2 x batch 4, 4x4 tokens each
    assert 0 < val[-1]["unigram_entropy"] <= math.log(32)  # at most uniform over the 32 codes
    w = read_weights(run / "prior.safetensors")
    assert w.format == "vqgan-prior"
    assert w.info["tokenizer_sha256"] == SHA and w.info["tokenizer"] == "tok.safetensors"
    assert w.config["gpt"]["vocab_size"] == 32 and w.config["gpt"]["block_size"] == 16 + 16 - 1
    prior = load_prior(run / "prior.safetensors")
    assert prior.cond.kind == "labels" and prior.cond.label_factor == 8 and prior.config.image_vocab == 32
    state = load_state(sorted((run / "checkpoints").glob("*.state.pt"))[-1])
    groups = state["opt"]["param_groups"]
    n_linear = 2 * 6 + 1  # key, query, value, proj, mlp.0, mlp.2 per layer, and head
    assert [len(g["params"]) for g in groups][0] == n_linear
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[0]["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in groups) == len(list(prior.gpt.parameters()))


def _weights(run: Path) -> dict:
    return read_weights(run / "prior.safetensors").state_dict


def test_resume_is_exact(tmp_path):
    root = token_shards(tmp_path / "s")
    over = ("model.cond_dropout=0.2", "model.attn_pdrop=0.1", "train.accumulate=2")
    train_prior(tiny_recipe(root, tmp_path / "straight", *over), "tiny")
    assert train_prior(tiny_recipe(root, tmp_path / "split", *over, "train.max_steps=2"), "tiny").steps == 2
    assert train_prior(tiny_recipe(root, tmp_path / "split", *over), "tiny").steps == 4
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    def strip(lines: list[str]) -> list[dict]:  # "run" records describe each invocation (a resume adds one)
        records = [json.loads(x) for x in lines]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if r["split"] != "run"]

    assert strip(la) == strip(lb)


def test_class_and_unconditional_runs(tmp_path):
    root = token_shards(tmp_path / "s", cond_vocab=None, classes=40)
    res = train_prior(tiny_recipe(root, tmp_path / "c", "model.cond=class", "model.cond_dropout=0.1",
                                  "train.max_steps=2"), "tiny")
    prior = load_prior(res.prior)
    assert prior.cond.kind == "class" and prior.cond.n_classes == 40
    assert prior.config.gpt.vocab_size == 41 and prior.cond.null_token == 40  # max(32, 40) + null
    res = train_prior(tiny_recipe(root, tmp_path / "u", "model.cond=unconditional", "train.max_steps=2"),
                      "tiny")
    prior = load_prior(res.prior)
    assert prior.cond.kind == "sos" and prior.config.gpt.block_size == 16


def test_nonfinite_losses_skip_then_stop(tmp_path, monkeypatch):
    from vqgan_cli.train import TrainingError
    from vqgan_cli.train import prior as P

    real = P.token_nll
    monkeypatch.setattr(P, "token_nll", lambda *a, **k: real(*a, **k) * float("nan"))
    recipe = tiny_recipe(token_shards(tmp_path / "s"), tmp_path / "r", "train.max_nonfinite=2")
    with pytest.raises(TrainingError, match="2 non-finite losses in a row"):
        train_prior(recipe, "tiny")


def test_sigint_saves_and_resumes(tmp_path, monkeypatch):
    import signal

    calls = []
    original = Prior.training_sequences

    def interrupt_on_step_2(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(Prior, "training_sequences", interrupt_on_step_2)
    root = token_shards(tmp_path / "s")
    res = train_prior(tiny_recipe(root, tmp_path / "r", "train.ckpt_every=100"), "tiny")
    assert res.stopped_by_signal == 130 and res.steps == 2
    assert (tmp_path / "r" / "checkpoints" / "step_0000002.safetensors").is_file()
    assert not (tmp_path / "r" / "prior.safetensors").exists()
    monkeypatch.setattr(Prior, "training_sequences", original)
    assert train_prior(tiny_recipe(root, tmp_path / "r", "train.ckpt_every=100"), "tiny").steps == 4


# ---- bad input -----------------------------------------------------------------------------------


def _problems(recipe: PriorRecipe) -> str:
    with pytest.raises(ConfigError) as e:
        train_prior(recipe, "tiny")
    return str(e.value)


def test_bad_input_is_refused_before_training(tmp_path):
    root = token_shards(tmp_path / "s")
    msg = _problems(tiny_recipe(root, tmp_path / "r", f"data.tokenizer_sha256={'cd' * 32}",
                                "data.crop=[5,5]"))
    assert "encoded by a tokenizer with weights sha256" in msg and "larger than the token grid" in msg
    assert "class labels" in _problems(tiny_recipe(root, tmp_path / "r", "model.cond=class"))
    nocond = token_shards(tmp_path / "nocond", cond_vocab=None)
    assert "no conditioning tokens" in _problems(tiny_recipe(nocond, tmp_path / "r"))
    assert "no manifest.json" in _problems(tiny_recipe(tmp_path / "nowhere", tmp_path / "r"))
    (root / shard_name(1)).unlink()
    msg = _problems(tiny_recipe(root, tmp_path / "r"))
    assert "shard-000001.tar listed in the manifest is missing" in msg
    empty = token_shards(tmp_path / "empty", n=0)
    assert "holds no samples" in _problems(tiny_recipe(empty, tmp_path / "r"))
    other = token_shards(tmp_path / "other", n_embed=64)
    msg = _problems(tiny_recipe(token_shards(tmp_path / "s2"), tmp_path / "r", f"data.val={other}"))
    assert "data.val: vocabulary differs" in msg
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_samples_contradicting_the_manifest_stop_the_run(tmp_path):
    from vqgan_cli.shards.format import ShardError

    root = token_shards(tmp_path / "s", n_embed=64)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["tokenizer"]["n_embed"] = 16  # tokens reach 31: the manifest lies about the codebook
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="outside the manifest's codebook of 16"):
        train_prior(tiny_recipe(root, tmp_path / "r"), "tiny")


def test_tokenizer_named_by_the_recipe_must_have_made_the_shards(tmp_path):
    tok = saved_tokenizer(tmp_path / "tok.safetensors", attn_resolutions=(), z_channels=4, n_embed=32, embed_dim=4)
    msg = _problems(tiny_recipe(token_shards(tmp_path / "s"), tmp_path / "r", f"data.tokenizer={tok}"))
    assert "did not make the shards" in msg


def test_spatial_prior_embeds_the_conditioning_tokenizer(tmp_path):
    from vqgan_cli.checkpoints.format import weights_sha256
    from vqgan_cli.checkpoints.load import save_tokenizer

    # f = 2 over 5 labels at 8 px: the 4x4 cond grid of the shards; 6 codes, the shards' cond vocabulary
    seg = tokenizer(resolution=8, attn_resolutions=(), z_channels=4, n_embed=6, embed_dim=4,
                    modality="segmentation", n_labels=5)
    path = saved_tokenizer(tmp_path / "seg.safetensors", seg)
    root = token_shards(tmp_path / "s")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["cond"].update(kind="seg", tokenizer={"path": str(path),
                                                   "weights_sha256": weights_sha256(seg.state_dict())})
    (root / MANIFEST).write_text(json.dumps(manifest))
    res = train_prior(tiny_recipe(root, tmp_path / "r", "train.max_steps=1"), "tiny")
    prior = load_prior(res.prior)
    assert prior.cond.kind == "spatial" and prior.cond.key == "seg"
    assert read_weights(res.prior).info["cond_tokenizer"] == str(path.resolve())
    for k, v in seg.state_dict().items():  # embedded unchanged (frozen during training)
        assert torch.equal(prior.cond_tokenizer.state_dict()[k], v), k
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 8, 8)), 5).permute(0, 3, 1, 2).float()
    assert prior.cond_tokens(one_hot).shape == (2, 16)
    seg.quantize.embedding.weight.data += 1  # the tokenizer changed after encoding: refused
    save_tokenizer(path, seg)
    assert "has changed since the shards" in _problems(tiny_recipe(root, tmp_path / "r2"))


def test_changed_shards_under_a_run_are_refused(tmp_path):
    train_prior(tiny_recipe(token_shards(tmp_path / "s"), tmp_path / "r", "train.max_steps=2"), "tiny")
    token_shards(tmp_path / "s", n_embed=48)  # re-encoded in place with another codebook
    assert "vocab_size" in _problems(tiny_recipe(tmp_path / "s", tmp_path / "r"))


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    root = token_shards(tmp_path / "s")
    recipe = tmp_path / "p.yaml"
    data = json.loads(json.dumps(PRIOR_RECIPE))
    data["data"].update(shards=str(root), crop=[9, 9])
    recipe.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "vqgan_cli", "train-prior", str(recipe),
                           "--set", f"train.out_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "larger than the token grid" in proc.stderr


# ---- DDP -----------------------------------------------------------------------------------------


def test_ddp_two_cpu_processes_stay_identical(tmp_path, run_two_ranks):
    root = token_shards(tmp_path / "s")
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, pathlib, torch
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from factory import prior_recipe as tiny_recipe
        from vqgan_cli.train import prior as P
        models, writes = [], []
        build = P.build_prior
        P.build_prior = lambda *a: models.append(build(*a)) or models[-1]
        save = P.save_prior
        P.save_prior = lambda *a: writes.append(1) or save(*a)
        P.train_prior(tiny_recipe(pathlib.Path({str(root)!r}), pathlib.Path({str(tmp_path / "run")!r}),
                                  "train.max_steps=3", "train.ckpt_every=3"), "tiny")
        rank = int(os.environ["RANK"])
        torch.save({{"weights": models[0].state_dict(), "writes": len(writes)}},
                   {str(tmp_path)!r} + f"/rank{{rank}}.pt")
    """))
    run_two_ranks(script)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["writes"] == 2 and r1["writes"] == 0  # step checkpoint + final prior, rank 0 only
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    saved = _weights(tmp_path / "run")
    assert all(torch.equal(saved[k], v) for k, v in r0["weights"].items())
    state = load_state(tmp_path / "run" / "checkpoints" / "step_0000003.state.pt")
    assert len(state["rng"]) == 2
