"""Faults are named, never silent: a full disk, a read-only folder, failing writes and altered
shards each end in one message (path, cause, what was kept, what to do) with exit 1 and no
traceback; nothing finished is lost, and the resumed run equals an uninterrupted one.

Full and read-only disks are real where the machine allows it (a small tmpfs, mounted as root);
elsewhere the operating system's error is injected with its errno.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from factory import PRIOR_RECIPE as PRIOR_TINY
from factory import TOKENIZER_RECIPE as TOKENIZER_TINY
from factory import prior, saved_prior, saved_tokenizer, shard_hashes, token_shards, tokenizer
from typer.testing import CliRunner

from vqgan_cli.checkpoints.format import read_weights
from vqgan_cli.cli import app
from vqgan_cli.cli.guard import _without_worker_traceback
from vqgan_cli.shards.format import MANIFEST, ShardError, TokenShardDataset, shard_name

runner = CliRunner()
SIZE = 16  # encode-dataset at 16 px with an f = 4 tokenizer: 4x4 tokens per image


@pytest.fixture
def disk(tmp_path):
    """mount(name, size) -> a fresh tmpfs folder of ``size`` bytes; remount(path, options)."""
    mounted: list[Path] = []

    def mount(name: str, size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full/read-only disk needs a tmpfs mount, which needs root")
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    def remount(path: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    yield SimpleNamespace(mount=mount, remount=remount)
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], check=False)


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_named(res, code: int, *parts: str) -> None:
    """Exit code, every expected part of the message, and no traceback."""
    assert res.exit_code == code, res.output
    for p in parts:
        assert p in res.output, (p, res.output)
    assert "Traceback" not in res.output


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_weights(a).state_dict, read_weights(b).state_dict
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def dot_files(folder: Path) -> list[str]:
    """Temporary and partial files (atomic-write temps, shard partials) left behind."""
    return sorted(p.name for p in folder.rglob(".*"))


# ---- encode-dataset: the disk fills while the second shard is written ---------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return saved_tokenizer(tmp_path_factory.mktemp("tok") / "tok.safetensors", resolution=SIZE, ch_mult=(1, 2, 2),
                           attn_resolutions=(), n_embed=64, spread=True)


def encode_args(tok: Path, out: Path, limit: int = 120, shard_size: int = 40) -> list[str]:
    return ["encode-dataset", "--tokenizer", str(tok), "--data", "builtin:landscapes", "--out", str(out),
            "--size", str(SIZE), "--limit", str(limit), "--shard-size", str(shard_size), "--batch-size", "8",
            "--workers", "0"]


def test_encode_disk_full_keeps_finished_shards_and_resumes_identically(tok, tmp_path, disk):
    ref = tmp_path / "ref"
    assert cli(*encode_args(tok, ref)).exit_code == 0
    shard_bytes = (ref / shard_name(0)).stat().st_size  # 40 samples of 4x4 uint8 tokens
    small = disk.mount("small", shard_bytes + 16384)  # shard 0 and the manifest fit, shard 1 does not
    out = small / "o"
    res = cli(*encode_args(tok, out))
    # the warning after shard 0: 80 more inputs at shard 0's bytes per input
    need = 80 * shard_bytes / 40
    assert f"this run will write about {need / 1000:.1f} kB (80 more input(s)" in res.output
    free = shutil.disk_usage(small).free
    assert_named(res, 1, f"{out}/.shard-000001.tar.partial: no space left on the device (ENOSPC); "
                 f"{free / 1000:.1f} kB free in {out}",
                 f"kept: 1 of 3 shard(s) and manifest.json in {out} are intact",
                 f"to do: free about {(need - free) / 1000:.1f} kB more in {out} (the rest of the run writes "
                 f"about {need / 1000:.1f} kB) or choose another --out; then re-run the same command: it "
                 "resumes at the first missing shard")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, shard_name(0)]  # no partial, no temp
    assert (out / shard_name(0)).read_bytes() == (ref / shard_name(0)).read_bytes()
    assert json.loads((out / MANIFEST).read_text())["complete"] is False

    disk.remount(small, "size=1m")  # space freed: the same command finishes the job
    res = cli(*encode_args(tok, out))
    assert res.exit_code == 0, res.output
    assert shard_hashes(out) == shard_hashes(ref)
    for i in range(3):
        assert (out / shard_name(i)).read_bytes() == (ref / shard_name(i)).read_bytes()
    assert dot_files(out) == []


def test_unwritable_encode_folder_is_a_usage_error_naming_the_cause(tok, tmp_path, disk):
    ro = disk.mount("ro", 1 << 20)
    disk.remount(ro, "ro")
    res = cli(*encode_args(tok, ro / "o", limit=4, shard_size=4))
    assert_named(res, 2, f"{ro}/o: output folder is not writable (Read-only file system); choose another --out")
    assert list(ro.iterdir()) == []


# ---- train-tokenizer: the disk fills while a checkpoint is written -----------------------------


def write_recipe(path: Path, recipe: dict, **sections) -> Path:
    data = json.loads(json.dumps(recipe))
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_disk_full_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path, disk):
    train = {"max_steps": 4, "ckpt_every": 2, "keep_last": 1, "val_every": 4, "image_every": 4}
    ref = tmp_path / "ref"
    recipe = write_recipe(tmp_path / "ref.yaml", TOKENIZER_TINY, train={**train, "out_dir": str(ref)})
    assert cli("train-tokenizer", recipe).exit_code == 0
    ckpt = sum(p.stat().st_size for p in (ref / "checkpoints").iterdir())  # one weights + state pair
    final = (ref / "tokenizer.safetensors").stat().st_size

    small = disk.mount("small", int(ckpt * 1.5))  # one checkpoint fits, a second one does not
    run = small / "run"
    recipe = write_recipe(tmp_path / "run.yaml", TOKENIZER_TINY, train={**train, "out_dir": str(run)})
    res = cli("train-tokenizer", recipe)
    # the start-of-run warning: keep_last 1 + 1 in flight + the final weights, against real sizes
    warned = re.search(r"this run will write about ([\d.]+) MB \(2 checkpoints of ([\d.]+) MB", res.output)
    assert warned, res.output
    assert float(warned.group(1)) * 1e6 == pytest.approx(2 * ckpt + final, rel=0.05)
    assert float(warned.group(2)) * 1e6 == pytest.approx(ckpt, rel=0.05)
    ckdir = run / "checkpoints"
    assert_named(res, 1, f"{ckdir}/step_0000004.state.pt: no space left on the device (ENOSPC)",
                 f"kept: checkpoint step 2 ({ckdir}/step_0000002.safetensors) is intact",
                 "or choose another train.out_dir; then re-run the same command to resume from step 2")
    # what is left to write: step 4's checkpoint (step 2's is pruned after it) and the final weights
    todo = re.search(rf"free about ([\d.]+) MB more in {ckdir} \(the rest of the run writes about ([\d.]+) MB\)",
                     res.output)
    assert todo, res.output
    free = shutil.disk_usage(small).free
    assert float(todo.group(2)) * 1e6 == pytest.approx(ckpt + final, rel=0.05)
    assert float(todo.group(1)) * 1e6 == pytest.approx(ckpt + final - free, rel=0.05)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_0000002.safetensors", "step_0000002.state.pt"]
    assert not (run / "tokenizer.safetensors").exists() and dot_files(run) == []

    disk.remount(small, "size=64m")
    res = cli("train-tokenizer", recipe)
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    assert same_weights(ref / "tokenizer.safetensors", run / "tokenizer.safetensors")


# ---- train-prior: injected write failures of every kind -----------------------------------------


def prior_recipe(tmp_path: Path, shards: Path, out: Path, name: str = "p", **train) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", PRIOR_TINY,
                        model={"cond": "unconditional"}, data={"shards": str(shards)},
                        train={"max_steps": 4, "ckpt_every": 2, "keep_last": 2, "out_dir": str(out), **train})


def fail_step4_torch_save(monkeypatch, code: int) -> None:
    """torch.save of step 4's state as it fails on a sick disk: a RuntimeError wrapping the OSError."""
    real = torch.save

    def save(obj, f, *a, **kw):
        if "step_0000004" in getattr(f, "name", str(f)):
            try:
                raise OSError(code, os.strerror(code))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("code, cause, remedy", [
    (errno.ENOSPC, "no space left on the device (ENOSPC)", "free about"),
    (errno.EACCES, "permission denied (EACCES)", "give this user access to"),
    (errno.EIO, "input/output error: the disk or network mount failed to read or write (EIO)",
     "check the device holding"),
    (errno.EMFILE, "too many open files in this process (EMFILE)", "raise the open-file limit (ulimit -n 4096)"),
])
def test_injected_write_failures_are_named_and_resume_exactly(tmp_path, monkeypatch, code, cause, remedy):
    shards = token_shards(tmp_path / "shards")
    run = tmp_path / "run"
    recipe = prior_recipe(tmp_path, shards, run)
    fail_step4_torch_save(monkeypatch, code)
    res = cli("train-prior", recipe)
    ckdir = run / "checkpoints"
    assert_named(res, 1, f"{ckdir}/step_0000004.state.pt: {cause}",
                 f"kept: checkpoint step 2 ({ckdir}/step_0000002.safetensors) is intact", f"to do: {remedy}",
                 "then re-run the same command to resume from step 2")
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_0000002.safetensors", "step_0000002.state.pt"]
    assert dot_files(run) == [] and not (run / "prior.safetensors").exists()
    if code != errno.EIO:
        return
    monkeypatch.undo()
    assert cli("train-prior", recipe).exit_code == 0
    ref = tmp_path / "ref"
    assert cli("train-prior", prior_recipe(tmp_path, shards, ref, "ref")).exit_code == 0
    assert same_weights(ref / "prior.safetensors", run / "prior.safetensors")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    shards = token_shards(tmp_path / "shards")
    recipe = prior_recipe(tmp_path, shards, tmp_path / "run")
    fail_step4_torch_save(monkeypatch, errno.EIO)
    plain = cli("train-prior", recipe)
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    debug = cli("--debug", "train-prior", recipe)
    assert debug.exit_code == 1 and "Traceback" in debug.output and "unexpected pos" in debug.output
    assert "input/output error" in debug.output  # the message still comes last
    monkeypatch.setenv("VQGAN_DEBUG", "1")
    assert "Traceback" in cli("train-prior", recipe).output


def test_start_warning_states_what_training_will_write(tmp_path, monkeypatch):
    """With too little room (disk_usage faked), the warning's numbers match the files written."""
    shards = token_shards(tmp_path / "shards")
    run = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**6, used=10**6 - 1000, free=1000))
    res = cli("train-prior", prior_recipe(tmp_path, shards, run, keep_last=2))
    assert res.exit_code == 0, res.output
    pair = sum(p.stat().st_size for p in (run / "checkpoints").glob("step_0000004.*"))
    final = (run / "prior.safetensors").stat().st_size
    size = r"([\d.]+ [kM]B)"
    m = re.search(rf"has 1\.0 kB free, but this run will write about {size} \(3 checkpoints of {size}: "
                  rf"keep_last 2 plus one being written, and final weights of {size}\)", res.output)
    assert m, res.output
    total, per, weights = (float(x.split()[0]) * {"kB": 1e3, "MB": 1e6}[x.split()[1]] for x in m.groups())
    assert per == pytest.approx(pair, rel=0.1) and weights == pytest.approx(final, rel=0.1)
    assert total == pytest.approx(3 * pair + final, rel=0.1)


# ---- read-only output folders -------------------------------------------------------------------


def test_reconstruct_into_a_read_only_folder(tok, tmp_path, disk):
    ro = disk.mount("ro", 1 << 20)
    disk.remount(ro, "ro")
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    res = cli("reconstruct", "--tokenizer", tok, img, "--out", ro / "rec", "--device", "cpu")
    assert_named(res, 1, f"{ro}/rec: the file system is read-only (EROFS)",
                 "to do: choose another --out on a writable disk")
    assert list(ro.iterdir()) == []


# ---- altered shards: refused by train-prior, repaired by encode-dataset -------------------------


def token_offset(shard: Path) -> int:
    """Byte offset of the first token of the first sample (tar member data + npy header)."""
    import tarfile

    with tarfile.open(shard) as tf:
        member = tf.next()
        start = member.offset_data
    raw = shard.read_bytes()
    header_len = int.from_bytes(raw[start + 8:start + 10], "little")  # npy format 1.0
    return start + 10 + header_len


def alter_one_token(shard: Path, vocab: int) -> None:
    raw = bytearray(shard.read_bytes())
    i = token_offset(shard)
    raw[i] = (raw[i] + 1) % vocab  # still a valid token: only the checksum can tell
    shard.write_bytes(bytes(raw))


def test_altered_shard_is_refused_then_repaired_and_the_run_resumes_exactly(tok, tmp_path):
    shards = tmp_path / "shards"
    args = encode_args(tok, shards, limit=24, shard_size=8)
    assert cli(*args).exit_code == 0
    original = {p.name: p.read_bytes() for p in shards.glob("shard-*.tar")}
    run = tmp_path / "run"
    first = prior_recipe(tmp_path, shards, run, "first", max_steps=2, batch_size=2)
    assert cli("train-prior", first).exit_code == 0

    alter_one_token(shards / shard_name(1), 64)
    recipe = prior_recipe(tmp_path, shards, run, "p", batch_size=2)
    res = cli("train-prior", recipe)
    assert_named(res, 1, f"{shards}/shard-000001.tar: sha256 ", "differs from the manifest's",
                 "Re-run `vqgan encode-dataset --tokenizer", "re-encodes the shards that fail verification",
                 f"kept: checkpoint step 2 ({run}/checkpoints/step_0000002.safetensors) is intact")
    assert not list((run / "checkpoints").glob("step_0000004.*"))

    # data.verify: never trains on it without a word (the documented opt-out)
    other = prior_recipe(tmp_path, shards, tmp_path / "never", "never", batch_size=2)
    assert cli("train-prior", other, "--set", "data.verify=never").exit_code == 0

    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("shard-*.tar")}
    res = cli(*args)
    assert res.exit_code == 0 and "shard-000001.tar differs from the sha256 in manifest.json" in res.output
    assert re.search(r"encoded now\s*│\s*8\b", res.output), res.output  # one shard of 8 inputs, no more
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("shard-*.tar")}
    assert [n for n in before if before[n] != after[n]] == [shard_name(1)]
    assert {p.name: p.read_bytes() for p in shards.glob("shard-*.tar")} == original
    assert json.loads((shards / MANIFEST).read_text())["complete"] is True

    assert cli("train-prior", recipe).exit_code == 0
    ref = tmp_path / "ref"
    assert cli("train-prior", prior_recipe(tmp_path, shards, ref, "ref", batch_size=2)).exit_code == 0
    assert same_weights(ref / "prior.safetensors", run / "prior.safetensors")


def test_shards_are_checked_the_first_time_a_reader_opens_them(tmp_path):
    root = token_shards(tmp_path / "s", n=8, per_shard=4, cond_vocab=None)
    ds = TokenShardDataset(root, shuffle=False)
    assert len(list(ds)) == 8  # both shards checked and read
    alter_one_token(root / shard_name(1), 32)
    assert len(list(ds)) == 8  # this reader checked them already in this run: not hashed again
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sha256 .* differs from the manifest's"):
        list(TokenShardDataset(root, shuffle=False))  # a new run's reader sees the change
    unchecked = list(TokenShardDataset(root, shuffle=False, verify=False))
    assert len(unchecked) == 8
    # from a loader worker the error arrives wrapped in the worker's traceback; the CLI shows the message
    loader = torch.utils.data.DataLoader(TokenShardDataset(root, shuffle=False), batch_size=2, num_workers=1,
                                         collate_fn=list)
    with pytest.raises(ShardError) as caught:
        list(loader)
    assert "Original Traceback" in str(caught.value)
    assert _without_worker_traceback(caught.value).startswith(f"{root}/shard-000001.tar: sha256 ")


# ---- reconstruct: nothing reconstructed is an error ----------------------------------------------


def test_reconstruct_with_every_input_skipped_is_an_error(tok, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = cli("reconstruct", "--tokenizer", tok, bad, "--out", tmp_path / "rec", "--device", "cpu")
    assert_named(res, 1, "nothing was reconstructed: none of the 1 input(s) could be read", str(bad))
    assert "mean" not in res.output and not (tmp_path / "rec").exists()


def test_shard_check_benchmark_runs(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "shard_check.py"
    out = subprocess.run([sys.executable, str(bench), "--synthetic", "2", "--samples", "5", "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert "2 shard(s), 20 samples read (flip variants included)" in out  # 2 x 5 samples x 2 variants
    for row in ("read without check", "read with sha256 check", "check costs", "sha256 of the files alone"):
        assert re.search(rf"{row}\s+-?[\d.]+ ms", out), (row, out)


# ---- sample: interrupted runs keep what they finished; --skip-existing completes them ------------


@pytest.fixture(scope="module")
def sos_prior(tmp_path_factory) -> Path:
    """A tiny unconditional prior (4x4 tokens) over a tiny f2 tokenizer, random weights."""
    d = tmp_path_factory.mktemp("sampler")
    tok = tokenizer(resolution=8, attn_resolutions=())
    saved_tokenizer(d / "tok.safetensors", tok)
    return saved_prior(d / "sos.safetensors", prior("sos", image_vocab=16, seed=1, spread=0.3), tokenizer_model=tok,
                       tokenizer_path=str(d / "tok.safetensors"))


def sample_args(prior: Path, out: Path, *extra: str) -> list[str]:
    from vqgan_cli.sample.window import WINDOW_MODES  # the grid is the crop: no window runs, any mode will do

    return ["sample", "--prior", str(prior), "--n", "6", "--batch-size", "2", "--top-k", "8", "--grid",
            "--window", WINDOW_MODES[0], "--out", str(out), *extra]


def folder_contents(folder: Path) -> dict[str, object]:
    """PNG bytes, and sidecars but for the folder they name."""
    def sidecar(p: Path) -> dict:
        data = json.loads(p.read_text())
        assert data["settings"].pop("out") == str(folder)
        return data

    return {p.name: sidecar(p) if p.suffix == ".json" else p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("how, code, said", [("sigint", 130, "interrupted (Ctrl-C)"),
                                             ("sigterm", 143, "stopped by SIGTERM")])
def test_interrupted_sampling_keeps_finished_images_and_skip_existing_completes_them(
        sos_prior, tmp_path, monkeypatch, how, code, said):
    ref = tmp_path / "ref"
    assert cli(*sample_args(sos_prior, ref)).exit_code == 0
    assert len(list(ref.glob("0*.png"))) == 6

    import signal

    import vqgan_cli.sample.run as G

    real, calls = G.decode_grid, []

    def decode_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # while image 3 is decoded: images 0-2 are written, 3-5 are not
            if how == "sigint":
                raise KeyboardInterrupt  # what Python's SIGINT handler raises
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, through the installed handler
        return real(*a, **kw)

    monkeypatch.setattr(G, "decode_grid", decode_then_signal)
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    res = cli(*sample_args(sos_prior, out))
    assert_named(res, code, said, f"kept: 3 of 6 image(s) in {out}, each with its JSON sidecar",
                 "to continue: re-run the same command with --skip-existing to draw the other 3")
    names = ["0000_seed0", "0001_seed1", "0002_seed2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{x}" for n in names for x in ("png", "json"))
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the run
    kept = {p.name: p.stat().st_ino for p in out.iterdir()}

    monkeypatch.undo()
    drawn = []
    real_batch = G.sample_batch
    monkeypatch.setattr(G, "sample_batch", lambda m, plan, opts, idx, *a: drawn.append(list(idx)) or
                        real_batch(m, plan, opts, idx, *a))
    res = cli(*sample_args(sos_prior, out, "--skip-existing"))
    assert res.exit_code == 0, res.output
    assert "3 of 6 image(s) were already in" in res.output and drawn == [[3, 4], [5]]
    assert all((out / name).stat().st_ino == ino for name, ino in kept.items())  # not rewritten
    assert folder_contents(out) == folder_contents(ref)  # images, sidecars and grid as one run writes them


def test_skip_existing_refuses_images_of_other_settings(sos_prior, tmp_path):
    out = tmp_path / "out"
    assert cli(*sample_args(sos_prior, out)).exit_code == 0
    res = cli(*sample_args(sos_prior, out, "--skip-existing", "--temperature", "0.5"))
    assert_named(res, 2, f"{out}/0000_seed0.json: drawn with other settings (temperature 1.0 there, 0.5 now)",
                 "choose another --out")


@pytest.mark.parametrize("fault", ["tmpfs", "injected"])
def test_sample_into_a_read_only_folder(sos_prior, tmp_path, disk, monkeypatch, fault):
    if fault == "tmpfs":
        ro = disk.mount("ro", 1 << 20)
        disk.remount(ro, "ro")
    else:  # the error a read-only file system gives, where no tmpfs can be mounted
        ro = tmp_path / "ro"
        ro.mkdir()
        real = Path.mkdir

        def mkdir(self, *a, **kw):
            if self.is_relative_to(ro):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real(self, *a, **kw)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    res = cli(*sample_args(sos_prior, ro / "samples"))
    assert_named(res, 1, f"{ro}/samples: the file system is read-only (EROFS)", "kept: nothing was written",
                 f"to do: choose another --out on a writable disk (or remount {ro} read-write)")
    assert list(ro.iterdir()) == []
