"""encode-dataset split over 2 torchrun (gloo) ranks: the same samples and bytes as one process,
resume after a rank is killed (with the same or another world size), ranks that disagree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from factory import shard_hashes, tokenizer

from vqgan_cli.checkpoints.load import save_tokenizer
from vqgan_cli.encode import EncodeOptions, EncodeResult, encode_dataset
from vqgan_cli.shards.format import RANK_RECORD_RE, TokenSample, rank_record_name, read_manifest, read_shard
from vqgan_cli.shards.verify import verify_folder

SETTINGS = {"size": 16, "batch_size": 2, "workers": 0, "shard_size": 4, "cond": "labels", "flip_copies": True}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    model = tokenizer(seed=0, spread=True, resolution=16, ch_mult=(1, 2, 2), attn_resolutions=(), n_embed=64)
    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tok.safetensors", model)


def cli_args(tok: Path, out: Path, limit: int) -> list[str]:
    args = ["encode-dataset", "--tokenizer", str(tok), "--data", "builtin:landscapes", "--out", str(out)]
    for k, v in SETTINGS.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return [*args, "--limit", str(limit)]


def launch(args: list[str]) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m vqgan_cli encode-dataset ...`` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([*TORCHRUN, "-m", "vqgan_cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def reference(tok: Path, out: Path, limit: int) -> EncodeResult:
    """The same command in this one process (the in-process API)."""
    return encode_dataset(EncodeOptions(tokenizer=str(tok), data="builtin:landscapes", out=str(out), limit=limit,
                                        **SETTINGS), progress=False)  # type: ignore[arg-type]


def samples(root: Path) -> dict[str, TokenSample]:
    return {s.key: s for p in read_manifest(root).shard_paths() for s in read_shard(p)}


def assert_same_samples(got: Path, want: Path) -> None:
    """Sample by sample: keys, tokens, conditioning, flips; then the shards' bytes."""
    a, b = samples(got), samples(want)
    assert sorted(a) == sorted(b)
    for key, s in b.items():
        for field in ("tokens", "cond", "tokens_flip", "cond_flip"):
            np.testing.assert_array_equal(getattr(a[key], field), getattr(s, field), err_msg=f"{key} {field}")
        assert a[key].label == s.label
    assert shard_hashes(got) == shard_hashes(want)  # same layout and bytes: shards are the unit of work
    report = verify_folder(got)
    assert report.ok, report.problems
    assert not [p.name for p in got.iterdir() if p.name.startswith(".")]  # no records, partials, temps


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(tok, tmp_path):
    code, out = finish(launch(cli_args(tok, tmp_path / "two", 21)))  # odd: 6 shards, the last of 1 input
    assert code == 0, out
    assert out.count("encode-dataset summary") == 1 and out.count("precision:") == 1  # rank 0 speaks
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["complete"] and m["run"]["world_size"] == 2 and m["counts"]["samples"] == 21
    assert_same_samples(tmp_path / "two", reference(tok, tmp_path / "one", 21).out)
    code, out = finish(launch([*cli_args(tok, tmp_path / "two", 21), "--shard-size", "8"]))
    assert code != 0  # rank 0 refuses the folder of other settings, and rank 1 stops with it
    assert "shard_size: manifest has 4, this command 8" in out and "rank 1 stopped: rank 0 could not open" in out
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one")


def test_records_of_a_killed_launch_are_merged_by_one_process(tok, tmp_path):
    """What a killed 2-rank launch leaves (no manifest entries, two rank records, an interrupted
    commit, a shard never finished), finished in this one process: no torchrun needed."""
    ref, out = reference(tok, tmp_path / "ref", 21).out, tmp_path / "o"
    shutil.copytree(ref, out)
    m = json.loads((out / "manifest.json").read_text())
    entries, m["shards"], m["complete"] = m["shards"], [], False
    (out / "manifest.json").write_text(json.dumps(m))
    for rank in (0, 1):  # shard 5 (rank 1's last) was never recorded; shard 4's rename never happened
        mine = [e for e in entries if e["index"] % 2 == rank and e["index"] != 5]
        (out / rank_record_name(rank)).write_text(json.dumps({"rank": rank, "shards": mine}))
    (out / "shard-000005.tar").rename(out / ".shard-000005.tar.partial")
    (out / "shard-000004.tar").rename(out / ".shard-000004.tar.partial")
    r = reference(tok, out, 21)
    assert r.encoded_now == 1 and r.shards == 6
    assert_same_samples(out, ref)
    (out / rank_record_name(3)).write_text("{}")
    reference(tok, out, 21)  # a stray record of no use: dropped, nothing encoded
    assert_same_samples(out, ref)
    (out / rank_record_name(1)).write_text(json.dumps({"rank": 1, "shards": entries}))
    encode_dataset(EncodeOptions(tokenizer=str(tok), data="builtin:landscapes", out=str(out), limit=3,
                                 overwrite=True, **SETTINGS), progress=False)  # type: ignore[arg-type]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]


def _rank_pid(torchrun: int, rank: int) -> int | None:
    """The worker process of ``rank`` among torchrun's children (from /proc)."""
    for task in Path(f"/proc/{torchrun}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def _committed(out: Path, rank: int) -> int:
    try:
        return len(json.loads((out / rank_record_name(rank)).read_text())["shards"])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_resume_after_a_rank_is_killed_with_the_same_or_another_world_size(tok, tmp_path):
    out, limit = tmp_path / "killed", 121  # 31 shards: 16 for rank 0, 15 for rank 1
    proc = launch(cli_args(tok, out, limit))
    deadline = time.time() + 120
    while _committed(out, 1) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None and proc.poll() is None, finish(proc)[1]
    os.kill(victim, signal.SIGKILL)  # torchrun then stops rank 0 too
    code, log = finish(proc)
    assert code != 0, log
    left = sorted(p.name for p in out.iterdir() if RANK_RECORD_RE.match(p.name))
    assert rank_record_name(1) in left and not json.loads((out / "manifest.json").read_text())["complete"]
    done_before = {e["name"] for r in left for e in json.loads((out / r).read_text())["shards"]}
    assert 2 <= len(done_before) < 31
    assert any("recorded by the ranks of a torchrun launch that did not finish" in x
               for x in verify_folder(out).problems)
    before = {n: (out / n).stat().st_ino for n in done_before if (out / n).exists()}
    shutil.copytree(out, tmp_path / "killed-1proc")

    code, log = finish(launch(cli_args(tok, out, limit)))  # the same command: each rank finishes its part
    assert code == 0, log
    ref = reference(tok, tmp_path / "ref", limit).out
    assert_same_samples(out, ref)
    assert all((out / n).stat().st_ino == ino for n, ino in before.items())  # kept, not encoded again
    r = reference(tok, tmp_path / "killed-1proc", limit)  # resumed by one process: also allowed
    assert r.encoded_now == limit - sum(4 if n != "shard-000030.tar" else 1 for n in done_before)
    assert_same_samples(tmp_path / "killed-1proc", ref)


MISMATCH = """
import os, sys
from vqgan_cli.cli import main
sys.argv = ["vqgan", *sys.argv[1:], "--limit", str(5 + int(os.environ["RANK"]))]
main()
"""


@pytest.mark.slow
def test_ranks_with_other_arguments_stop_before_writing(tok, tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    args = cli_args(tok, tmp_path / "o", 5)[:-2]  # --limit comes from the script, per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*TORCHRUN, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "rank(s) 1 were started with other arguments than rank 0" in proc.stdout + proc.stderr
    assert not (tmp_path / "o").exists()  # checked before the output folder is touched
