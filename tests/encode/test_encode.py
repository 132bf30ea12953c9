"""encode-dataset end to end with tiny tokenizers: contents, resume after kill -9, refusals,
verification, labels, conditioning and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import shard_hashes, tokenizer
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.checkpoints.load import load_tokenizer, save_tokenizer
from vqgan_cli.cli import app
from vqgan_cli.data.landscapes import render_landscape
from vqgan_cli.data.maps import one_hot
from vqgan_cli.data.transforms import image_to_tensor, resize_smaller_side
from vqgan_cli.encode import EncodeOptions, EncodeUsageError, encode_dataset, shard_batches
from vqgan_cli.encode.store import OutputFolder, open_output, partial_name
from vqgan_cli.models.vqgan import VQGAN
from vqgan_cli.shards.format import MANIFEST, TokenShardDataset, read_manifest, read_shard, shard_name
from vqgan_cli.shards.verify import verify_folder as verify_shards

SIZE = 16  # f = 4: a 4x4 token grid


def tiny(seed: int, modality: str = "image", n_labels: int | None = None) -> VQGAN:
    """f = 4 at SIZE, 64 codes spread so tokens vary."""
    return tokenizer(seed=seed, spread=True, resolution=SIZE, ch_mult=(1, 2, 2), attn_resolutions=(), n_embed=64,
                     modality=modality, n_labels=n_labels)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toks")
    out = {"a": tiny(0), "b": tiny(1), "seg": tiny(2, "segmentation", 8), "depth": tiny(3, "depth")}
    return {k: save_tokenizer(d / f"{k}.safetensors", m) for k, m in out.items()}


def opts(toks, out, **kw) -> EncodeOptions:
    base = dict(tokenizer=str(toks["a"]), data="builtin:landscapes", out=str(out), size=SIZE, limit=10,
                batch_size=4, workers=0, shard_size=4)
    base.update(kw)
    return EncodeOptions(**base)


def write_images(root: Path, names: list[str], sizes=None, maps: Path | None = None) -> None:
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        h, w = sizes[i] if sizes else (20, 24)
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        if maps is not None:
            m = maps / Path(name).with_suffix(".png")
            m.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 8, (h, w), dtype=np.uint8)).save(m)


def test_tokens_match_the_tokenizer_and_read_back(toks, tmp_path):
    r = encode_dataset(opts(toks, tmp_path / "o", cond="labels", flip_copies=True), progress=False)
    assert (r.shards, r.samples, r.skipped, r.grid, r.vocab_size) == (3, 10, 0, (4, 4), 64)
    m = read_manifest(tmp_path / "o")
    assert (m.n_embed, m.cond_vocab, m.grid, m.flip) == (64, 8, (4, 4), True)
    assert [s["count"] for s in m.shards] == [4, 4, 2]
    model = load_tokenizer(toks["a"])
    got = {s.key: s for p in m.shard_paths() for s in read_shard(p)}
    assert sorted(got) == [f"landscape-{i:07d}" for i in range(10)]
    for seed in (0, 7):
        scene = render_landscape(seed, SIZE, SIZE)
        x = image_to_tensor(scene.image)[None]
        with torch.inference_mode():
            want = model.encode(torch.cat([x, x.flip(-1)])).indices.numpy()
        s = got[f"landscape-{seed:07d}"]
        assert s.tokens.dtype == np.uint8 and s.cond.dtype == np.uint8
        np.testing.assert_array_equal(s.tokens, want[0])
        np.testing.assert_array_equal(s.tokens_flip, want[1])
        np.testing.assert_array_equal(s.cond, scene.labels[2::4, 2::4])  # centre pixel of each 4x4 cell
        np.testing.assert_array_equal(s.cond_flip, scene.labels[:, ::-1][2::4, 2::4])
    assert verify_shards(tmp_path / "o").ok
    items = list(TokenShardDataset(tmp_path / "o", crop=(2, 3), seed=0))
    assert len(items) == 20 and items[0]["tokens"].shape == (2, 3) and items[0]["cond"].shape == (2, 3)


def test_workers_batch_size_do_not_change_bytes_and_rerun_is_a_noop(toks, tmp_path):
    encode_dataset(opts(toks, tmp_path / "a"), progress=False)
    encode_dataset(opts(toks, tmp_path / "b", workers=1, batch_size=3), progress=False)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("shard-*.tar")}
    r = encode_dataset(opts(toks, tmp_path / "a"), progress=False)
    assert r.encoded_now == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("shard-*.tar")}


KILL_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from vqgan_cli.encode import EncodeOptions, encode_dataset
encode_dataset(EncodeOptions(tokenizer=sys.argv[1], data="builtin:landscapes", out=sys.argv[2], size=16,
               limit=160, batch_size=2, workers=1, shard_size=4, cond="labels"), progress=False)
"""


def _recorded(out: Path) -> int:
    try:
        return len(json.loads((out / MANIFEST).read_text())["shards"])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_resume_after_kill9_gives_identical_shards(toks, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(toks["a"]), str(out)]
    kills = 0
    for wait_for, extra in ((2, 0.0), (_recorded, 0.037)):  # after a commit, then at an arbitrary moment
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        floor = wait_for if isinstance(wait_for, int) else _recorded(out) + 1
        deadline = time.time() + 30
        while _recorded(out) < floor and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(extra)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    subprocess.run(cmd, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no partials or temps
    ref = tmp_path / "ref"
    encode_dataset(opts(toks, ref, limit=160, batch_size=2, shard_size=4, cond="labels"), progress=False)
    assert shard_hashes(out) == shard_hashes(ref) and len(shard_hashes(ref)) == 40
    for name in shard_hashes(ref):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert verify_shards(out).ok


def test_interrupted_commit_is_completed_not_rewritten(toks, tmp_path):
    encode_dataset(opts(toks, tmp_path / "o"), progress=False)
    out = tmp_path / "o"
    # a crash between "manifest records shard 1" and "rename": only the partial exists
    os.replace(out / shard_name(1), out / partial_name(1))
    (out / partial_name(2)).write_bytes(b"half a shard")  # a crash mid-write of a recorded shard
    os.remove(out / shard_name(2))
    ino = (out / partial_name(1)).stat().st_ino
    r = encode_dataset(opts(toks, out), progress=False)
    assert (out / shard_name(1)).stat().st_ino == ino  # renamed into place, not encoded again
    assert r.encoded_now == 2 and verify_shards(out).ok and not list(out.glob(".*partial"))


def test_refuses_another_tokenizer_or_settings_until_overwrite(toks, tmp_path):
    out = tmp_path / "o"
    encode_dataset(opts(toks, out), progress=False)
    with pytest.raises(EncodeUsageError, match="different tokenizer"):
        encode_dataset(opts(toks, out, tokenizer=str(toks["b"])), progress=False)
    with pytest.raises(EncodeUsageError, match="shard_size"):
        encode_dataset(opts(toks, out, shard_size=5), progress=False)
    r = encode_dataset(opts(toks, out, tokenizer=str(toks["b"]), overwrite=True), progress=False)
    assert r.encoded_now == 10
    assert json.loads((out / MANIFEST).read_text())["tokenizer"]["path"] == str(toks["b"])


def test_verify_catches_a_corrupted_shard(toks, tmp_path):
    out = tmp_path / "o"
    encode_dataset(opts(toks, out), progress=False)
    runner = CliRunner()
    assert runner.invoke(app, ["encode-dataset", "--verify", str(out)]).exit_code == 0
    p = out / shard_name(1)
    data = bytearray(p.read_bytes())
    data[600] ^= 0xFF  # one byte of the first token grid
    p.write_bytes(bytes(data))
    report = verify_shards(out)
    assert not report.ok and any("shard-000001.tar: sha256" in x for x in report.problems)
    for args in (["verify-shards", str(out)], ["encode-dataset", "--verify", str(out)]):  # new and old form
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and "shard-000001.tar: sha256" in res.output
        assert f"{len(report.problems)} problem(s)" in res.output
    res = runner.invoke(app, ["verify-shards", str(tmp_path)])  # no manifest: a usage error
    assert res.exit_code == 2 and "no manifest.json" in res.output


def test_labels_from_folders_and_csv(toks, tmp_path):
    src = tmp_path / "imgs"
    names = ["zebra/1.png", "ant/2.png", "ant/3.png", "mole/4.png"]
    write_images(src, names)
    r = encode_dataset(opts(toks, tmp_path / "f", data=str(src), labels="folders"), progress=False)
    m = read_manifest(tmp_path / "f")
    assert m.labels == ["ant", "mole", "zebra"] and r.samples == 4
    got = {s.key: s.label for p in m.shard_paths() for s in read_shard(p)}
    assert got == {"zebra/1": 2, "ant/2": 0, "ant/3": 0, "mole/4": 1}
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class\nzebra/1.png,7\n2.png,3\nant/3,3\n")
    with pytest.raises(EncodeUsageError, match="1 of 4 images have no class label"):
        encode_dataset(opts(toks, tmp_path / "c", data=str(src), labels=str(csv)), progress=False)
    r = encode_dataset(opts(toks, tmp_path / "c", data=str(src), labels=str(csv), missing="skip"),
                       progress=False)
    m = read_manifest(tmp_path / "c")
    assert m.raw["labels"]["table"] == {"3": 3, "7": 7} and m.n_classes == 8  # integer ids keep their value
    got = {s.key: s.label for p in m.shard_paths() for s in read_shard(p)}
    assert got == {"zebra/1": 7, "ant/2": 3, "ant/3": 3}
    assert m.raw["skipped"] == [{"id": "mole/4", "path": str(src / "mole/4.png"), "reason": "no class label"}]


def test_corrupt_images_are_skipped_and_recorded(toks, tmp_path):
    src = tmp_path / "imgs"
    write_images(src, ["a.png", "b.png", "d.png"])
    (src / "c.png").write_bytes(b"\x89PNG not really")
    r = encode_dataset(opts(toks, tmp_path / "o", data=str(src), shard_size=2), progress=False)
    assert (r.samples, r.skipped) == (3, 1)
    m = read_manifest(tmp_path / "o")
    assert [s["count"] for s in m.shards] == [2, 1]
    (sk,) = m.raw["skipped"]
    assert sk["id"] == "c" and "c.png" in sk["path"] and sk["reason"]
    assert verify_shards(tmp_path / "o").ok


def test_paired_maps_seg_tokenizer_and_missing_policy(toks, tmp_path):
    src, maps = tmp_path / "imgs", tmp_path / "maps"
    write_images(src, ["g/a.png", "g/b.png", "g/c.png"], maps=maps)
    os.remove(maps / "g/c.png")
    kw = dict(data=str(src), cond="seg", cond_tokenizer=str(toks["seg"]), cond_data=str(maps))
    with pytest.raises(EncodeUsageError, match="1 of 3 images have no paired map"):
        encode_dataset(opts(toks, tmp_path / "o", **kw), progress=False)
    assert not (tmp_path / "o").exists()  # refused before any work
    r = encode_dataset(opts(toks, tmp_path / "o", missing="skip", **kw), progress=False)
    assert (r.samples, r.skipped) == (2, 1)
    seg = load_tokenizer(toks["seg"])
    lab = resize_smaller_side(np.asarray(Image.open(maps / "g/a.png")), 16, "labels").array
    assert lab.shape == (16, 19)  # 20x24 resized (nearest), then the centre 16x16
    lab = torch.from_numpy(lab[:, 1:17].astype(np.int64))
    with torch.inference_mode():
        want = seg.encode(one_hot(lab[None], 8)).indices[0].numpy()
    (s, *_) = read_shard(tmp_path / "o" / shard_name(0))
    np.testing.assert_array_equal(s.cond, want)
    assert read_manifest(tmp_path / "o").cond_vocab == 64


def test_lowres_cond_and_keep_aspect_grids(toks, tmp_path):
    src = tmp_path / "imgs"
    write_images(src, ["a.png", "b.png"], sizes=[(20, 40), (36, 20)])
    r = encode_dataset(opts(toks, tmp_path / "o", data=str(src), keep_aspect=True, cond="lowres:4"),
                       progress=False)
    assert r.grid is None
    got = {s.key: s for s in read_shard(tmp_path / "o" / shard_name(0))}
    # smaller side 16: 20x40 -> 16x32 (8 x 4 tokens); 36x20 -> 29x16, cut to 28x16 (7 x 4 tokens)
    assert got["a"].tokens.shape == (4, 8) and got["b"].tokens.shape == (7, 4)
    assert got["a"].cond.shape == (4, 8) and not np.array_equal(got["a"].cond, got["a"].tokens)
    assert verify_shards(tmp_path / "o").ok


def test_usage_errors_exit_2_before_work(toks, tmp_path):
    runner = CliRunner()
    base = ["encode-dataset", "--tokenizer", str(toks["a"]), "--size", "16"]
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = {
        "takes 8-channel": ["encode-dataset", "--tokenizer", str(toks["seg"]), "--data", "builtin:landscapes",
                            "--out", str(tmp_path / "o1")],
        "no image files": base + ["--data", str(empty), "--out", str(tmp_path / "o2")],
        "not writable": base + ["--data", "builtin:landscapes", "--limit", "2", "--out", str(blocker / "o")],
        "needs --cond-tokenizer": base + ["--data", "builtin:landscapes", "--cond", "seg",
                                          "--out", str(tmp_path / "o3")],
        "not a multiple": base[:-1] + ["18", "--data", "builtin:landscapes", "--out", str(tmp_path / "o4")],
    }
    for expect, args in cases.items():
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (expect, res.output)
        assert expect in " ".join(res.output.split()), res.output
    res = runner.invoke(app, base + ["--data", "builtin:landscapes", "--limit", "3", "--shard-size", "2",
                                     "--cond", "labels", "--out", str(tmp_path / "ok"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    cmd = json.loads((tmp_path / "ok" / MANIFEST).read_text())["command"]
    assert cmd.startswith("vqgan encode-dataset --tokenizer")
    assert "--cond labels" in cmd and "--limit 3" in cmd
    res = runner.invoke(app, ["encode-dataset", "--tokenizer", str(toks["b"]), "--size", "16", "--data",
                              "builtin:landscapes", "--limit", "3", "--shard-size", "2", "--cond", "labels",
                              "--out", str(tmp_path / "ok")])
    assert res.exit_code == 2 and "different tokenizer" in res.output


def test_shard_batches_start_at_each_shard():
    b = shard_batches([0, 2], n_items=11, shard_size=4, batch_size=3)
    assert b == [[0, 1, 2], [3], [8, 9, 10]]


def test_open_output_refuses_foreign_shards(tmp_path):
    (tmp_path / shard_name(0)).write_bytes(b"")
    with pytest.raises(EncodeUsageError, match="no manifest.json"):
        open_output(tmp_path, {"identity": {}, "shards": []}, overwrite=False)
    folder, _ = open_output(tmp_path, {"identity": {}, "shards": [], "format": "x"}, overwrite=True)
    assert isinstance(folder, OutputFolder) and not (tmp_path / shard_name(0)).exists()


def test_tar_shard_source_with_inline_maps(toks, tmp_path):
    import io
    import tarfile

    rng = np.random.default_rng(1)
    src = tmp_path / "src-000.tar"
    with tarfile.open(src, "w") as tf:
        for key, with_map in (("x/a", True), ("x/b", True), ("x/c", False)):
            fields = {"jpg": rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)}
            if with_map:
                fields["seg.png"] = rng.integers(0, 8, (16, 20), dtype=np.uint8)
            for ext, arr in fields.items():
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG" if ext == "jpg" else "PNG")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(EncodeUsageError, match="`n_labels`"):
        encode_dataset(opts(toks, tmp_path / "o", data=str(src), cond="labels"), progress=False)
    r = encode_dataset(opts(toks, tmp_path / "o", data=str(src), cond="labels", n_labels=8, missing="skip"),
                       progress=False)
    assert (r.samples, r.skipped) == (2, 1)
    m = read_manifest(tmp_path / "o")
    assert m.raw["skipped"][0]["reason"] == "no paired conditioning map" and m.cond_vocab == 8
    assert [s.key for s in read_shard(m.shard_paths()[0])] == ["x/a", "x/b"]


def test_benchmark_reports_its_settings_and_the_ratio_it_defines(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # its sibling imports
    spec = importlib.util.spec_from_file_location(
        "bench_encode", Path(__file__).resolve().parents[2] / "benchmarks" / "encode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--images", "4", "--workers", "0"])
    # --quick: one encode-dataset round between two bare-encoder baselines, batch min(32, 8)
    assert (out["images"], out["batch"], out["workers"], out["preset"]) == (4, 8, 0, "quickstart")
    assert len(out["ratios"]) == 1 and out["ratio"] == out["ratios"][0]
    # the round's ratio is its rate over the mean of the two baselines, whose median is that mean
    assert out["ratio"] == pytest.approx(out["encode_dataset_img_s"] / out["bare_encoder_img_s"], rel=1e-9)


def test_depth_cond_tokens(toks, tmp_path):
    from vqgan_cli.data.maps import depth_to_rgba, normalize_depth

    src, maps = tmp_path / "imgs", tmp_path / "depth"
    write_images(src, ["a.png"], sizes=[(16, 16)])
    maps.mkdir()
    depth = np.linspace(100, 6000, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(depth_to_rgba(depth), "RGBA").save(maps / "a.png")
    with pytest.raises(EncodeUsageError, match="depth tokenizer"):
        encode_dataset(opts(toks, tmp_path / "o", data=str(src), cond="depth",
                            cond_tokenizer=str(toks["seg"]), cond_data=str(maps)), progress=False)
    encode_dataset(opts(toks, tmp_path / "o", data=str(src), cond="depth", cond_tokenizer=str(toks["depth"]),
                        cond_data=str(maps)), progress=False)
    (s,) = read_shard(tmp_path / "o" / shard_name(0))
    with torch.inference_mode():
        want = load_tokenizer(toks["depth"]).encode(torch.from_numpy(normalize_depth(depth))[None, None])
    np.testing.assert_array_equal(s.cond, want.indices[0].numpy())


def test_workers_auto_is_the_default_and_fits_the_cores(toks, tmp_path, monkeypatch):
    from vqgan_cli import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert EncodeOptions(tokenizer="t", data="d", out="o").workers == "auto"
    encode_dataset(opts(toks, tmp_path / "a", workers="auto", limit=4), progress=False)
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["run"]["workers"] == 1  # what auto gave on two cores: recorded
    with pytest.raises(EncodeUsageError, match="`workers` must be a number or auto, got 'many'"):
        encode_dataset(opts(toks, tmp_path / "b", workers="many"), progress=False)
    res = CliRunner().invoke(app, ["encode-dataset", "--tokenizer", str(toks["a"]), "--data", "builtin:landscapes",
                                   "--out", str(tmp_path / "c"), "--limit", "4", "--size", str(SIZE),
                                   "--workers", "-1"])
    assert res.exit_code == 2 and "--workers must be >= 0, got -1" in " ".join(res.output.split())
