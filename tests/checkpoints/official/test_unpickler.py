"""Reading official pickles never runs code from them; broken files fail clearly."""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from vqgan_cli.checkpoints.format import CheckpointError
from vqgan_cli.checkpoints.official.unpickler import (
    ForeignObject,
    UnsafeCheckpointError,
    load_official_checkpoint,
    safe_load,
)


class _Reduces:
    """An object that pickles as ``func(*args)``: what an attacker's payload looks like."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    cmd = f"touch {marker}"
    return {
        "os.system": _Reduces(os.system, cmd),
        "subprocess.Popen": _Reduces(subprocess.Popen, ["touch", str(marker)]),
        "subprocess.call": _Reduces(subprocess.call, ["touch", str(marker)]),
        "builtins.open": _Reduces(open, str(marker), "w"),
        "builtins.eval": _Reduces(eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": _Reduces(exec, f"open({str(marker)!r}, 'w')"),
        "builtins.getattr": _Reduces(getattr, _Reduces(__import__, "os"), "system"),
        "builtins.__import__": _Reduces(__import__, "os"),
        "functools.partial": _Reduces(functools.partial(os.system, cmd)),
    }


PAYLOADS = sorted(_payloads(Path("x")))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_code_running_pickles_are_refused_and_nothing_runs(tmp_path, name, legacy):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": payload}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_official_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg
    # the offending global is named (os.system pickles as posix.system on Linux)
    top, _, attr = name.partition(".")
    assert attr.split(".")[-1] in msg
    assert not marker.exists()


def test_raw_opcode_pickle_is_refused(tmp_path):
    """A hand-written protocol-0 pickle: GLOBAL 'os system', args, REDUCE."""
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.ckpt"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafeCheckpointError, match=r"raw\.ckpt.*os\.system"):
        safe_load(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.ckpt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsafeCheckpointError, match=r"scripted\.ckpt.*TorchScript"):
        safe_load(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_foreign_classes_become_inert_placeholders(tmp_path, legacy):
    """Classes of a module that does not exist at load time, argparse and numpy objects."""
    import numpy as np

    mod = types.ModuleType("not_installed_pkg")
    sub = types.ModuleType("not_installed_pkg.callbacks")
    mod.callbacks = sub

    class EarlyStopping:
        def __init__(self):
            self.patience, self.best = 3, torch.tensor(0.25)

    class AttributeDict(dict):
        pass

    for cls in (EarlyStopping, AttributeDict):
        cls.__module__, cls.__qualname__ = sub.__name__, cls.__name__
        setattr(sub, cls.__name__, cls)
    sys.modules.update({mod.__name__: mod, sub.__name__: sub})
    try:
        hp = AttributeDict(lr=4.5e-6)
        obj = {"state_dict": {"encoder.w": torch.arange(4.0)}, "global_step": 7,
               "callbacks": {EarlyStopping: EarlyStopping()}, "hyper_parameters": hp,
               "namespace": argparse.Namespace(a=1), "np": np.float64(2.5),
               "np_array": np.arange(3)}
        path = tmp_path / "foreign.ckpt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        del sys.modules[mod.__name__], sys.modules[sub.__name__]

    raw = load_official_checkpoint(path)
    assert torch.equal(raw.state_dict["encoder.w"], torch.arange(4.0))
    assert raw.global_step == 7
    (key, cb), = raw.extra["callbacks"].items()
    assert issubclass(key, ForeignObject) and (key.foreign_module, key.foreign_name) == (
        "not_installed_pkg.callbacks", "EarlyStopping")
    assert isinstance(cb, key) and cb.state["patience"] == 3
    assert torch.equal(cb.state["best"], torch.tensor(0.25))
    assert raw.extra["hyper_parameters"].items == {"lr": 4.5e-6}
    ns = raw.extra["namespace"]
    assert (ns.foreign_module, ns.foreign_name) == ("argparse", "Namespace") and ns.state == {"a": 1}
    assert isinstance(raw.extra["np"], ForeignObject)
    assert isinstance(raw.extra["np_array"], ForeignObject)
    assert "not_installed_pkg" not in sys.modules  # nothing was imported to load it


def test_bare_state_dict_is_accepted(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"a.weight": torch.ones(2, 2)}, path)
    raw = load_official_checkpoint(path)
    assert list(raw.state_dict) == ["a.weight"] and raw.global_step is None


def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}, "global_step": 1}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "random", "text", "empty", "zeroed-middle"])
def test_broken_files_raise_checkpoint_error_naming_the_file(tmp_path, damage):
    data = _good_file(tmp_path).read_bytes()
    path = tmp_path / f"{damage}.ckpt"
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif damage == "text":
        path.write_text("model:\n  target: taming.models.vqgan.VQModel\n")
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # the pickle record of a zip archive overwritten
        i = data.find(b"data.pkl") + 60
        path.write_bytes(data[:i] + bytes(200) + data[i + 200:])
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        load_official_checkpoint(path)


def test_missing_file_and_non_checkpoint_pickles(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: checkpoint file not found"):
        load_official_checkpoint(tmp_path / "nope.ckpt")
    lst = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(CheckpointError, match=r"list\.ckpt: expected a checkpoint dict"):
        load_official_checkpoint(lst)
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"w": "not a tensor"}}, odd)
    with pytest.raises(CheckpointError, match=r"odd\.ckpt: state_dict entry 'w'"):
        load_official_checkpoint(odd)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_plain_data_round_trips(tmp_path, legacy):
    """Bytes (``_codecs.encode`` in protocol 2), sets, tuples, OrderedDict, dtypes, sizes."""
    from collections import OrderedDict

    obj = {"state_dict": OrderedDict(w=torch.ones(2, dtype=torch.float16)), "x": b"\x00\xff",
           "y": (1, 2.5, None), "s": {1}, "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
           "p": torch.nn.Parameter(torch.zeros(3))}
    path = tmp_path / "plain.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got = safe_load(path)
    assert got["x"] == b"\x00\xff" and got["y"] == (1, 2.5, None) and got["s"] == {1}
    assert got["dtype"] is torch.bfloat16 and got["size"] == torch.Size([2, 3])
    assert got["state_dict"]["w"].dtype == torch.float16 and isinstance(got["p"], torch.nn.Parameter)
