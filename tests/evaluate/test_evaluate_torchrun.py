"""`vqgan evaluate samples|tokenizer` under torchrun (2 gloo ranks on the CPU): the report equals a
one-process run's, is written once, and ranks started with other arguments stop before any work.

Odd item counts make the ranks' shares differ; batch size 2 makes their batches differ from the
one-process run's, so equality also shows the numbers do not depend on how items were batched."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_evaluate import F4_32PX, _random_inception_file, _scenes, _write_images
from typer.testing import CliRunner

from vqgan_cli.cli import app
from vqgan_cli.evaluate import INCEPTION_FILE

pytestmark = pytest.mark.slow
runner = CliRunner()

# Every rank runs the CLI as `vqgan` would; the label-agreement classifier is the small one the
# one-process run below uses too (the default one takes ~20 s to fit).
SCRIPT = """
import os, sys
from vqgan_cli.evaluate import map_agreement
fit = map_agreement.fit_cell_classifier
map_agreement.fit_cell_classifier = lambda: fit(range(3), [(64, 64)], factor=8, steps=50)
from vqgan_cli.cli import app
args = {args!r}
if os.environ["RANK"] == "1":
    args = [a.replace("@RANK1@", "1") for a in args]
app([a.replace("@RANK1@", "0") for a in args], prog_name="vqgan")
"""


def _torchrun(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``args`` through the CLI in 2 CPU ranks (``@RANK1@`` reads 1 on rank 1, 0 on rank 0)."""
    script = tmp_path / "evaluate_ranks.py"
    script.write_text(SCRIPT.format(args=args))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=600)


def _small_classifier(monkeypatch) -> None:
    from vqgan_cli.evaluate import map_agreement

    fit = map_agreement.fit_cell_classifier
    monkeypatch.setattr(map_agreement, "fit_cell_classifier",
                        lambda: fit(range(3), [(64, 64)], factor=8, steps=50))


def _same_report(one: dict, two: dict) -> None:
    assert one["metrics"].keys() == two["metrics"].keys()
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
    assert (one["skipped"], one["settings"]) == (two["skipped"], two["settings"])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return _random_inception_file(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


def test_samples_two_ranks_report_the_one_process_numbers_once(weights, tmp_path, monkeypatch):
    gen = tmp_path / "gen"
    paths = _write_images(gen, _scenes([5, 6, 7], 32) + _scenes([8], 40))  # 2 sizes: batches split
    (gen / "0002b_broken.png").write_bytes(b"\x89PNG garbage")  # 5 files, 4 readable
    for p, seed in ((paths[0], 5), (paths[3], 8)):
        p.with_suffix(".json").write_text(json.dumps({"settings": {"cond": f"builtin:landscapes:{seed}"}}))

    def args(out: Path, stats: Path) -> list[str]:
        return ["evaluate", "samples", str(gen), "--reference", "builtin:landscapes", "--size", "32",
                "--limit", "5", "--save-stats", str(stats), "--kid-subsets", "3", "--is-splits", "2",
                "--batch-size", "2", "--inception-weights", str(weights), "--device", "cpu", "--out", str(out)]

    _small_classifier(monkeypatch)
    r = runner.invoke(app, args(tmp_path / "one", tmp_path / "one.npz"))
    assert r.exit_code == 0, r.output
    (tmp_path / "two_stats").mkdir()
    p = _torchrun(tmp_path, args(tmp_path / "two", tmp_path / "two_stats" / "ref.npz"))
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]

    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    _same_report(one, two)
    assert two["metrics"]["samples"] == 4 and two["metrics"]["reference_images"] == 5
    assert two["metrics"]["label_agreement_samples"] == 2 and len(two["skipped"]) == 1
    assert [n for n in one["notes"] if "saved to" not in n] == [n for n in two["notes"] if "saved to" not in n]
    # written once, by rank 0: no other files, no rank-suffixed copies; shown once
    assert sorted(os.listdir(tmp_path / "two")) == ["metrics.json"]
    assert os.listdir(tmp_path / "two_stats") == ["ref.npz"]
    assert p.stderr.count("│ fid ") == 1 and p.stderr.count("wrote ") == 1, p.stderr  # the console: stderr
    assert p.stdout.count("inception features") == 1, p.stdout  # progress: rank 0 only
    import numpy as np

    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two_stats" / "ref.npz") as b:
        assert np.allclose(a["pool"], b["pool"], rtol=1e-6, atol=1e-9)


def _tar_shard(path: Path, arrays) -> Path:
    with tarfile.open(path, "w") as tf:
        for i, a in enumerate(arrays):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG")
            data = buf.getvalue() if i != 2 else b"\x89PNG not really"  # item 2 unreadable
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tokenizer_two_ranks_report_the_one_process_numbers_once(weights, tmp_path):
    from factory import tokenizer

    from vqgan_cli.checkpoints.load import save_tokenizer

    ckpt = save_tokenizer(tmp_path / "tok.safetensors", tokenizer(**F4_32PX))
    shard = _tar_shard(tmp_path / "shard-000.tar", _scenes(range(7), 40))  # a stream: 7 items, 6 readable

    def args(out: Path) -> list[str]:
        return ["evaluate", "tokenizer", "--tokenizer", str(ckpt), "--data", str(shard), "--size", "32",
                "--batch-size", "2", "--lpips", "none", "--inception-weights", str(weights), "--device", "cpu",
                "--out", str(out)]

    r = runner.invoke(app, args(tmp_path / "one"))
    assert r.exit_code == 0, r.output
    p = _torchrun(tmp_path, args(tmp_path / "two"))
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]

    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    _same_report(one, two)
    assert two["metrics"]["images"] == 6 and "rfid" in two["metrics"]
    rows1 = list(csv.DictReader(open(tmp_path / "one" / "per_image.csv")))
    rows2 = list(csv.DictReader(open(tmp_path / "two" / "per_image.csv")))
    assert [r["key"] for r in rows2] == [r["key"] for r in rows1] == ["0000", "0001", "0003", "0004", "0005",
                                                                      "0006"]
    for a, b in zip(rows1, rows2, strict=True):
        assert {k: float(v) for k, v in b.items() if k != "key"} == pytest.approx(
            {k: float(v) for k, v in a.items() if k != "key"}, rel=1e-6)
    assert sorted(os.listdir(tmp_path / "two")) == ["metrics.json", "per_image.csv"]
    assert p.stderr.count("wrote ") == 1 and p.stderr.count("precision: ") == 1, p.stderr
    assert p.stdout.count("evaluating") == 1, p.stdout


def test_ranks_given_other_arguments_stop_before_any_work(weights, tmp_path):
    gen = tmp_path / "gen"
    _write_images(gen, _scenes([1, 2, 3], 32))
    p = _torchrun(tmp_path, ["evaluate", "samples", str(gen), "--reference", str(gen), "--kid-subsets",
                             "@RANK1@", "--inception-weights", str(weights), "--device", "cpu",
                             "--out", str(tmp_path / "out")])
    text = p.stdout + p.stderr
    assert p.returncode != 0 and "started with other arguments than rank 0" in text, text[-3000:]
    assert "terminate called" not in text and "exitcode  : 2" in text, text[-3000:]
    assert not (tmp_path / "out").exists()
