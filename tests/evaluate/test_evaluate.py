"""`vqgan evaluate`: the Inception path with the real architecture and random weights from a file,
tokenizer / samples / prior evaluation against numbers computed here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factory import cond_config, token_shards, tokenizer
from factory import prior as factory_prior
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.cli import app
from vqgan_cli.metrics import feature_stats, frechet_distance, kernel_inception_distance

fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                         reason="torch-fidelity is not installed (pip install -e '.[test]')")

from vqgan_cli.evaluate import (  # noqa: E402
    INCEPTION_FILE,
    EvaluationError,
    Inception,
    InceptionWeightsMissing,
    evaluate_prior,
    evaluate_samples,
    load_stats,
)

runner = CliRunner()
F4_32PX = {"resolution": 32, "ch_mult": (1, 2, 2), "attn_resolutions": (), "n_embed": 32}  # f = 4: 8x8 tokens at 32 px


def _random_inception_file(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 built with random (variance-preserving) weights, saved as the
    state dict the real weights file holds; construction's own weight loading is bypassed once."""
    cls = fe.FeatureExtractorInceptionV3
    orig_load, orig_url = cls.load_state_dict, fe.load_state_dict_from_url
    cls.load_state_dict = lambda self, sd, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: None
    try:
        torch.manual_seed(seed)
        net = cls("random", ["2048"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = orig_load, orig_url
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return _random_inception_file(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


@pytest.fixture(scope="module")
def inception(weights) -> Inception:
    return Inception(weights)


def _write_images(folder: Path, arrays, fmt: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, a in enumerate(arrays):
        p = folder / f"{i:04d}.{fmt}"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def _scenes(seeds, size=64):
    from vqgan_cli.data.landscapes import render_landscape

    return [render_landscape(s, size, size).image for s in seeds]


# ---- the network and its weights file ----------------------------------------------------------


def test_inception_loads_the_file_it_is_given(weights, inception, tmp_path):
    saved = torch.load(weights, weights_only=True)
    loaded = inception.net.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = torch.from_numpy(np.stack(_scenes([1, 2]))).permute(0, 3, 1, 2).contiguous()
    pool, logits = inception.features(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and pool.std() > 1e-3
    other = Inception(_random_inception_file(tmp_path / "other.pth", seed=1))
    assert not np.allclose(other.features(x)[0], pool)  # the weights come from the file


def test_missing_weights_name_the_file_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(InceptionWeightsMissing) as e:
        Inception()
    msg = str(e.value)
    assert INCEPTION_FILE in msg and str(tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_FILE) in msg
    assert "`inception_weights`" in msg and "https://github.com/toshas/torch-fidelity/releases" in msg
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(InceptionWeightsMissing, match="not a readable PyTorch state dict"):
        Inception(bad)
    # the command stops before any work: the tokenizer does not exist and is never opened
    r = runner.invoke(app, ["evaluate", "tokenizer", "--tokenizer", str(tmp_path / "nope.safetensors"),
                            "--data", "builtin:landscapes", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and INCEPTION_FILE in r.output and "nope" not in r.output
    r = runner.invoke(app, ["evaluate", "samples", str(tmp_path), "--reference", "builtin:landscapes"])
    assert r.exit_code == 2 and INCEPTION_FILE in r.output
    assert not (tmp_path / "o").exists()


# ---- evaluate samples ------------------------------------------------------------------------


def test_samples_fid_kid_against_features_computed_here(inception, tmp_path):
    gen = _write_images(tmp_path / "gen", _scenes(range(3)))
    ref = _write_images(tmp_path / "ref", _scenes(range(10, 13)))
    (tmp_path / "gen" / "broken.png").write_bytes(b"\x89PNG garbage")
    res = evaluate_samples(tmp_path / "gen", str(tmp_path / "ref"), inception, kid_subsets=5,
                           is_splits=2, save_stats_to=tmp_path / "ref.npz", agreement=False)

    def feats(paths):
        x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
        return inception.features(x.permute(0, 3, 1, 2).contiguous())

    both = feats(gen + ref)
    fg, fr = (both[0][:3],), (both[0][3:],)
    assert res.metrics["samples"] == 3 and res.metrics["reference_images"] == 3
    assert res.metrics["fid"] == pytest.approx(frechet_distance(*feature_stats(fg[0]), *feature_stats(fr[0])),
                                                rel=1e-6)
    assert res.metrics["kid_mean"] == pytest.approx(kernel_inception_distance(fg[0], fr[0], 5, 3)[0], rel=1e-6)
    assert len(res.skipped) == 1 and "broken.png" in res.skipped[0]
    assert any("rank-deficient" in n for n in res.notes)
    # the cached reference gives the same numbers, and itself against itself FID ~ 0
    again = evaluate_samples(tmp_path / "gen", str(tmp_path / "ref.npz"), inception, kid_subsets=5,
                             is_splits=2, agreement=False)
    assert again.metrics["fid"] == pytest.approx(res.metrics["fid"], rel=1e-5)
    same = evaluate_samples(tmp_path / "ref", str(tmp_path / "ref.npz"), inception, kid_subsets=5,
                            is_splits=2, agreement=False)
    assert abs(same.metrics["fid"]) < 1e-3 * res.metrics["fid"]


def test_samples_bad_inputs(inception, tmp_path):
    _write_images(tmp_path / "gen", _scenes(range(2), 64) + _scenes(range(2, 3), 48))
    _write_images(tmp_path / "ref", _scenes(range(10, 12)))
    with pytest.raises(EvaluationError, match="at least 4 images on each side; .* has 3 sample file"):
        evaluate_samples(tmp_path / "gen", str(tmp_path / "ref"), inception, kid_subset_size=4, agreement=False)
    res = evaluate_samples(tmp_path / "gen", str(tmp_path / "ref"), inception, kid_subsets=2, is_splits=2,
                           save_stats_to=tmp_path / "s.npz", agreement=False)
    with pytest.raises(EvaluationError, match="at least 3 images on each side; .* and 2 reference images"):
        evaluate_samples(tmp_path / "gen", str(tmp_path / "s.npz"), inception, kid_subset_size=3, agreement=False)
    assert any("2 different sizes" in n and "299x299" in n for n in res.notes)
    one = tmp_path / "one"
    _write_images(one, [_scenes([1])[0]])
    with pytest.raises(EvaluationError, match="at least 2 readable images"):
        evaluate_samples(one, str(tmp_path / "s.npz"), inception, agreement=False)
    # statistics made with other settings are refused, naming the difference
    with np.load(tmp_path / "s.npz") as z:
        parts = dict(z)
    settings = json.loads(str(parts["settings"]))
    settings["features"] = "768"
    parts["settings"] = np.array(json.dumps(settings))
    np.savez(tmp_path / "other.npz", **parts)
    with pytest.raises(EvaluationError, match="features = '768', this run uses '2048'"):
        load_stats(tmp_path / "other.npz", {"format": settings["format"], "network": settings["network"],
                                            "weights": settings["weights"], "features": "2048"})
    with pytest.raises(EvaluationError, match="features"):
        evaluate_samples(tmp_path / "gen", str(tmp_path / "other.npz"), inception, agreement=False)


def test_label_agreement_of_samples_from_builtin_maps(inception, tmp_path):
    from vqgan_cli.data.landscapes import render_landscape
    from vqgan_cli.evaluate.map_agreement import fit_cell_classifier, label_agreement

    clf = fit_cell_classifier(range(3), [(64, 64)], factor=8, steps=50)
    folder = tmp_path / "s"
    imgs = _scenes([5, 6, 7], 32)
    paths = _write_images(folder, imgs)
    for p, seed in zip(paths[:2], (5, 6), strict=True):
        p.with_suffix(".json").write_text(json.dumps({"settings": {"cond": f"builtin:landscapes:{seed}"}}))
    paths[2].with_suffix(".json").write_text(json.dumps({"settings": {"cond": None}}))  # as vqgan sample writes
    res = evaluate_samples(folder, str(folder), inception, kid_subsets=1, is_splits=1, classifier=clf)
    expected = np.mean([label_agreement(imgs[i], render_landscape(s, 32, 32).labels, 8, clf)
                        for i, s in ((0, 5), (1, 6))])
    assert res.metrics["label_agreement_samples"] == 2
    assert res.metrics["label_agreement"] == pytest.approx(expected)


# ---- evaluate tokenizer ----------------------------------------------------------------------


def test_sigterm_stops_an_evaluation_between_batches_with_exit_143(tmp_path, monkeypatch):
    import os
    import signal

    import vqgan_cli.evaluate.tokenizer as E

    real, calls = E.batch_metrics, []

    def signal_at_batch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, through the command's handler
        return real(*a, **kw)

    monkeypatch.setattr(E, "batch_metrics", signal_at_batch_2)
    handler = signal.getsignal(signal.SIGTERM)
    ckpt = save_tokenizer_for_test(tmp_path)
    out = tmp_path / "ev"
    r = runner.invoke(app, ["evaluate", "tokenizer", "--tokenizer", str(ckpt), "--data", "builtin:landscapes",
                            "--size", "32", "--limit", "8", "--batch-size", "2", "--lpips", "none", "--no-fid",
                            "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 143 and "stopped by SIGTERM" in r.output, r.output
    assert len(calls) == 2  # not one batch more
    assert not (out / "metrics.json").exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the command


def save_tokenizer_for_test(folder: Path) -> Path:
    from vqgan_cli.checkpoints.load import save_tokenizer

    return save_tokenizer(folder / "tok.safetensors", tokenizer(**F4_32PX))


def test_tokenizer_cli_psnr_and_usage_match_the_reconstructions(weights, tmp_path):
    from vqgan_cli.checkpoints.load import load_tokenizer, save_tokenizer
    from vqgan_cli.data.dataset import VAL_SEED_BASE
    from vqgan_cli.data.transforms import image_to_tensor

    ckpt = save_tokenizer(tmp_path / "tok.safetensors", tokenizer(**F4_32PX))
    out = tmp_path / "ev"
    r = runner.invoke(app, ["evaluate", "tokenizer", "--tokenizer", str(ckpt), "--data", "builtin:landscapes",
                            "--size", "32", "--limit", "3", "--batch-size", "2", "--lpips", "none",
                            "--inception-weights", str(weights), "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 3 and got["metrics"]["images"] == 3
    assert "psnr" in got["definitions"] and got["settings"]["size"] == 32

    from vqgan_cli.data.landscapes import render_landscape

    model = load_tokenizer(ckpt)
    x = torch.stack([image_to_tensor(render_landscape(VAL_SEED_BASE + i, 32, 32).image) for i in range(3)])
    with torch.no_grad():
        o = model(x)
    a = ((x.clamp(-1, 1) + 1) / 2).double().numpy()
    b = ((o.x_hat.clamp(-1, 1) + 1) / 2).double().numpy()
    psnr = [10 * math.log10(1 / ((a[i] - b[i]) ** 2).mean()) for i in range(3)]
    assert [float(r["psnr"]) for r in rows] == pytest.approx(psnr, abs=1e-3)
    assert got["metrics"]["psnr"] == pytest.approx(np.mean(psnr), abs=1e-3)
    codes = o.indices.flatten().tolist()
    n_embed = model.config.quantizer.n_embed
    assert got["metrics"]["codebook_usage"] == pytest.approx(len(set(codes)) / n_embed)
    freq = [codes.count(c) / len(codes) for c in set(codes)]
    assert got["metrics"]["codebook_perplexity"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in freq)),
                                                                  rel=1e-6)
    assert got["metrics"]["rfid"] >= 0 and "LPIPS skipped" in " ".join(got["notes"])


# ---- evaluate prior --------------------------------------------------------------------------


def _own_cross_entropy(prior, shards: Path, tile: int | None):
    from vqgan_cli.shards.format import read_manifest, read_shard

    nll, n, counts = 0.0, 0, {}
    for path in read_manifest(shards).shard_paths():
        for s in read_shard(path):
            z = torch.from_numpy(s.tokens.astype(np.int64))
            c = torch.from_numpy(s.cond.astype(np.int64)) if s.cond is not None else None
            h, w = z.shape
            t = tile or h
            for top in range(0, h - t + 1, t):
                for left in range(0, w - t + 1, t):
                    zz = z[top:top + t, left:left + t].reshape(1, -1)
                    cc = (c[top:top + t, left:left + t].reshape(1, -1) if prior.cond.kind != "sos"
                          else torch.tensor([[prior.cond.sos_token]]))
                    with torch.no_grad():
                        logp = F.log_softmax(prior(cc, zz).float(), -1)[0]
                    nll -= float(logp.gather(1, zz[0][:, None]).sum())
                    n += zz.numel()
                    for v in zz.flatten().tolist():
                        counts[v] = counts.get(v, 0) + 1
    total = sum(counts.values())
    entropy = -sum(k / total * math.log(k / total) for k in counts.values())
    return nll / n, n, entropy


@pytest.mark.parametrize("kind", ["sos", "labels"])
def test_prior_bits_per_token_equal_own_cross_entropy(kind, tmp_path):
    shards = token_shards(tmp_path / "sh", n=10, grid=(4, 4), per_shard=4,
                         cond_vocab=6 if kind == "labels" else None)
    cond = cond_config("labels", n_labels=6) if kind == "labels" else cond_config("sos", sos_token=7)
    prior = factory_prior(cond, grid=(2, 2), vocab_size=40, n_embd=8)
    res = evaluate_prior(prior, shards, batch_size=3)
    nll, n, entropy = _own_cross_entropy(prior, shards, 2)  # 4x4 grids, prior trained on 2x2 crops
    assert res.metrics["tokens"] == n == 10 * 16
    assert res.metrics["nll_nats"] == pytest.approx(nll, rel=1e-5)
    assert res.metrics["bits_per_token"] == pytest.approx(nll / math.log(2), rel=1e-5)
    assert res.metrics["unigram_entropy_nats"] == pytest.approx(entropy, rel=1e-9)
    assert any("4 non-overlapping 2x2 crops" in s for s in res.notes)
    limited = evaluate_prior(prior, shards, batch_size=3, limit=5)
    assert limited.metrics["samples"] == 5 and limited.metrics["tokens"] == 5 * 16
    from vqgan_cli.train.prior_data import is_held_out

    held = evaluate_prior(prior, shards, val_fraction=0.5)
    assert held.metrics["samples"] == sum(is_held_out(f"img-{i:04d}", 0.5) for i in range(10))


def test_tokenizer_sources_skip_unreadable_files_and_limit_shards(tmp_path):
    import io
    import tarfile

    from vqgan_cli.evaluate import evaluate_tokenizer

    folder = tmp_path / "imgs"
    _write_images(folder, _scenes(range(2), 48))
    (folder / "zz_broken.png").write_bytes(b"\x89PNG not really")
    res = evaluate_tokenizer(tokenizer(**F4_32PX), str(folder), size=32, batch_size=2)
    assert res.metrics["images"] == 2 and len(res.skipped) == 1 and "zz_broken.png" in res.skipped[0]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for i, a in enumerate(_scenes(range(3), 40)):
            b = io.BytesIO()
            Image.fromarray(a).save(b, "PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(b.getvalue())
            tf.addfile(info, io.BytesIO(b.getvalue()))
    res = evaluate_tokenizer(tokenizer(**F4_32PX), str(tmp_path / "shard-000.tar"), size=32, limit=2, batch_size=1)
    assert res.metrics["images"] == 2 and [r["key"] for r in res.per_image] == ["0000", "0001"]
