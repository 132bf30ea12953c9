"""Our checkpoint format: self-describing safetensors weights plus a separate resume state.

A checkpoint is ``NAME.safetensors`` whose metadata carries ``format`` (``vqgan-tokenizer`` or
``vqgan-prior``), ``config`` (the model's dataclass as JSON) and free-form ``info`` (step,
recipe, hashes). Training state for exact resume (optimisers, RNG, data position) lives in
``NAME.state.pt`` and is read with ``weights_only=True``. Every write is atomic: a temp file in
the same folder, fsync, then rename, so a crash never replaces a good file with half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqgan_cli.faults import naming, os_error_in


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit; the message names the file and key."""


class Weights(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    format: str
    config: dict
    info: dict


def is_safetensors(path: str | Path) -> bool:
    """Whether a file starts like safetensors (u64 header length, then a JSON object).

    Lives here, below both the loaders and the name resolver, which both ask it."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
        size = p.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; the old file survives any failure."""
    path = Path(path)
    with naming(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # clean-up never hides the first error
            tmp_path.unlink(missing_ok=True)
        # a full or failing disk reaches us wrapped by torch/safetensors: name it as what it is
        err = os_error_in(exc) if isinstance(exc, Exception) else None
        if err is None or (exc is err and err.filename not in (None, tmp)):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from exc
    return path


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], fmt: str,
                 config: dict, info: dict | None = None) -> Path:
    """Write weights as safetensors with the config in its metadata (atomically)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {"format": fmt, "config": json.dumps(config), "info": json.dumps(info or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_weights(path: str | Path) -> Weights:
    """Read one of our safetensors checkpoints; a clear CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "format" not in meta or "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without vqgan metadata (format/config)")
    try:
        config = json.loads(meta["config"])
        info = json.loads(meta.get("info", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e})") from None
    return Weights(state, meta["format"], config, info)


def state_path(weights_path: str | Path) -> Path:
    """Where the resume state of a weights file lives."""
    p = Path(weights_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".state.pt")


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write resume state (tensors and plain Python values only) atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # through a Python file, a full disk surfaces as its OSError
            torch.save(state, fh)

    return atomic_write(path, write)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read resume state without running pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise CheckpointError(f"{path}: unreadable resume state ({e})") from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hash of a file's bytes, used to pin which tokenizer a shard or prior depends on."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of tensor contents independent of the file format (same weights -> same hash)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
