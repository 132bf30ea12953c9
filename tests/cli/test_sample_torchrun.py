"""`vqgan sample` split over 2 gloo ranks under torchrun: the files of one process, one grid,
`--skip-existing` across ranks, and ranks started with other arguments refused (exit 2);
`vqgan upscale`'s variants split likewise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factory import cond_config, prior, saved_prior, saved_tokenizer, tokenizer, tokenizer_config
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


TOK = {"resolution": 8, "attn_resolutions": ()}  # f = 2, 16 codes: the priors read 4x4 crops of 8x8 px


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """4x4-crop priors over a tiny tokenizer's 16 codes (as in test_sample_cli) and a small image."""
    d = tmp_path_factory.mktemp("ckpts")
    tok = tokenizer(seed=0, **TOK)
    saved_tokenizer(d / "tok.safetensors", tok)
    saved_prior(d / "sos.safetensors", prior("sos", seed=2, spread=0.3, image_vocab=16), tokenizer_model=tok)
    lowres = cond_config("lowres", tokenizer=tokenizer_config(**TOK))
    saved_prior(d / "sr.safetensors", prior(lowres, seed=5, spread=0.3, image_vocab=16), tokenizer_model=tok)
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "small.png")
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def sos_prior(ckpts) -> Path:
    return ckpts["sos"]


def _env() -> dict[str, str]:
    """This checkout first on the path (the installed package may be another), one thread a rank."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _torchrun(cwd: Path, *args: str, command: str = "sample") -> str:
    """``vqgan COMMAND ARGS`` as 2 CPU ranks; its console output (rank 0's speaks for both)."""
    proc = subprocess.run([*TORCHRUN, "-m", "vqgan_cli", command, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; sidecars without the command line (none is recorded in-process)."""
    found = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.suffix == ".json":
            side = json.loads(data)
            side["settings"].pop("command")
            data = json.dumps(side, sort_keys=True).encode()
        found[p.name] = data
    return found


@pytest.mark.slow
def test_two_ranks_write_the_files_of_one_process_and_skip_existing_across_ranks(
        sos_prior, tmp_path, monkeypatch) -> None:
    args = ["--prior", str(sos_prior), "--seed", "3", "--top-k", "8", "--batch-size", "2",
            "--save-tokens", "--grid", "--out", "samples"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.chdir(one)  # the same relative --out: the sidecars record it
    r = CliRunner().invoke(app, ["sample", "--n", "5", *args])
    assert r.exit_code == 0, r.output
    text = _torchrun(two, "--num-images", "5", *args)  # 5: rank 0 draws 3 images, rank 1 two
    expected = _files(one / "samples")
    assert len(expected) == 5 * 3 + 1  # PNG, sidecar, tokens each; the grid
    assert _files(two / "samples") == expected
    assert text.count("samples in samples") == 1 and "sample (all ranks)" in text and "5/5" in text
    side = json.loads((two / "samples" / "0001_seed4.json").read_text())
    assert side["settings"]["command"].startswith("vqgan sample --num-images 5 ")

    # rank 1's image 3 is gone: only it is drawn again, by rank 1, and the grid is the same
    out = two / "samples"
    (out / "0003_seed6.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if not p.name.startswith("grid")}
    text = _torchrun(two, "--num-images", "5", *args, "--skip-existing")
    assert "4 of 5 image(s) were already in samples; drew the other 1" in text
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before
    assert _files(out) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_started_with_other_arguments_exit_2_naming_the_rank(sos_prior, tmp_path) -> None:
    port = str(_free_port())
    procs = []
    for rank in (0, 1):  # what torchrun would start, but rank 1 with another seed
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vqgan_cli", "sample", "--prior", str(sos_prior), "--n", "2",
             "--seed", str(rank), "--out", str(tmp_path / "out"), "--device", "cpu"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 2, text
        assert "rank(s) 1 were started with other arguments than rank 0" in " ".join(text.split()), text
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
def test_two_ranks_draw_the_upscale_variants_of_one_process(ckpts, tmp_path, monkeypatch) -> None:
    args = [str(ckpts["small"]), "--prior", str(ckpts["sr"]), "--scale", "1", "--out", "up.png"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.chdir(one)
    r = CliRunner().invoke(app, ["upscale", "--n", "3", *args])
    assert r.exit_code == 0, r.output
    text = _torchrun(two, "--num-images", "3", *args, command="upscale")
    assert text.count("upscaled ") == 1 and "drew variant i on rank i % 2" in text
    assert _files(two) == _files(one) and len(_files(one)) == 6


@pytest.mark.slow
def test_an_output_folder_the_ranks_cannot_write_names_each_rank_and_the_path(sos_prior, tmp_path) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    proc = subprocess.run([*TORCHRUN, "-m", "vqgan_cli", "sample", "--prior", str(sos_prior), "--out",
                           str(blocked / "samples")], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for rank in (0, 1):  # each rank's message says which rank it is and which path failed
        line = next((ln for ln in text.splitlines() if f"error: rank {rank} of 2: " in ln), None)
        assert line is not None and "a_file" in line, text[-3000:]
    assert "Traceback" not in proc.stdout
