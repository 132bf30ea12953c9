"""Read PyTorch/Lightning ``.ckpt`` pickles without running any code from them.

Design. A pickle can call any importable function while it loads; the only way a stdlib
unpickler obtains a callable is ``find_class``. We hand ``torch.load`` (``weights_only=False``)
a pickle module whose ``Unpickler.find_class`` is a strict gate, so torch still does what it
is good at (zip and legacy layouts, storages, byte order, ``map_location``) while we decide
what every global may be:

* allowed: torch's tensor/parameter rebuild functions, dtypes/layouts/devices/sizes,
  ``collections.OrderedDict`` and plain builtin containers and scalars;
* refused with :class:`UnsafeCheckpointError` (naming the file and the global): anything that
  can run commands, import, open files, evaluate code or reach arbitrary attributes (``os``,
  ``subprocess``, ``builtins.eval``/``getattr``/``__import__``, ``functools.partial``, ...);
* everything else (Lightning callbacks, omegaconf containers, ``argparse.Namespace``, numpy
  scalars, classes of packages that are not even installed) becomes an inert
  :class:`ForeignObject` subclass that only records its module, name, arguments and state.
  Nothing is ever imported by name, so a foreign module's import-time code never runs either.

Why not ``torch.load(weights_only=True)`` with ``torch.serialization.safe_globals``: torch 2.14
offers an allow-list for known, importable globals, but Lightning checkpoints reference classes
of packages that may not be installed and whose names we cannot know in advance. Registering
placeholders for them needs a pre-scan (``get_unsafe_globals_in_checkpoint`` reads zip files
only), the registry is process-global, and its error cannot tell "foreign but inert" from
"would run a command". One gate that sees every global covers both file layouts and both cases.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vqgan_cli.checkpoints.format import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint references a global that could run code; nothing from it was executed."""


class ForeignObject:
    """Inert stand-in for an object of a class we do not trust (or do not have).

    It accepts any construction arguments and pickled state and keeps them for inspection;
    it has no behaviour, so loading it cannot do anything.
    """

    foreign_module: str = ""
    foreign_name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.listitems = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (SETITEMS)
        self.items[key] = value

    def append(self, value: Any) -> None:  # list subclasses (APPENDS)
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values)

    def __repr__(self) -> str:
        return f"<foreign {self.foreign_module}.{self.foreign_name}>"


_PLACEHOLDERS: dict[tuple[str, str], type[ForeignObject]] = {}


def placeholder_class(module: str, name: str) -> type[ForeignObject]:
    """The (cached) inert class standing in for ``module.name``; same name -> same class."""
    key = (module, name)
    if key not in _PLACEHOLDERS:
        safe_name = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "Foreign"
        _PLACEHOLDERS[key] = type(safe_name, (ForeignObject,), {
            "__module__": __name__, "foreign_module": module, "foreign_name": name,
            "__doc__": f"Inert placeholder for {module}.{name}"})
    return _PLACEHOLDERS[key]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Safe ``copyreg._reconstructor`` (protocol 0/1 objects): placeholders or builtins only."""
    if isinstance(cls, type) and issubclass(cls, ForeignObject):
        return cls(state) if state is not None else cls()
    if cls in _SAFE_BUILTIN_TYPES:
        return cls(state) if state is not None else cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch's tensor-subclass rebuild, limited to plain tensors and parameters."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"tensor subclass {new_type!r} is not allowed")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


_SAFE_BUILTIN_TYPES = (dict, list, tuple, set, frozenset, int, float, complex, bool, str,
                       bytes, bytearray, slice, range, object)

_ALLOWED: dict[str, Any] = {
    **{f"builtins.{t.__name__}": t for t in _SAFE_BUILTIN_TYPES},
    "builtins.Ellipsis": Ellipsis,
    "builtins.NotImplemented": NotImplemented,
    "collections.OrderedDict": __import__("collections").OrderedDict,
    "_codecs.encode": __import__("_codecs").encode,  # bytes in protocol-2 pickles
    "copyreg._reconstructor": _reconstructor,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": torch.Tensor,
    "torch._tensor.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "torch.serialization._get_layout": torch.serialization._get_layout,
    **{f"torch._utils.{n}": getattr(torch._utils, n) for n in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage")
       if hasattr(torch._utils, n)},
}

# Python 2 / old-protocol module names that the stdlib would otherwise remap for us.
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "_codecs": "_codecs"}

# Modules whose globals can run commands, import code, touch files or the network, or reach
# arbitrary attributes. Refused outright: a model checkpoint has no reason to name them.
_DENIED_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "builtins", "importlib",
    "runpy", "shutil", "socket", "pickle", "_pickle", "pickletools", "marshal", "types", "ctypes",
    "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal", "io", "_io", "codecs",
    "_codecs", "tempfile", "asyncio", "threading", "_thread", "pdb", "bdb", "timeit", "platform",
    "glob", "http", "urllib", "requests", "inspect", "gc", "functools", "_functools", "operator",
    "_operator", "pathlib", "zipimport", "pkgutil", "site", "sysconfig", "distutils", "setuptools",
    "pip", "dill", "cloudpickle", "joblib", "copyreg", "shlex", "ftplib", "smtplib",
    "telnetlib", "xmlrpc", "sqlite3", "dbm", "shelve", "atexit", "trace", "cProfile", "profile",
    "imp", "eval", "exec", "commands", "popen2", "_posixsubprocess", "selectors", "select",
})
# Names refused in any module: the usual spellings of "run this".
_DENIED_NAMES = frozenset({
    "system", "popen", "Popen", "eval", "exec", "execfile", "compile", "__import__",
    "import_module", "getattr", "setattr", "delattr", "globals", "locals", "vars", "open",
    "spawn", "spawnl", "spawnv", "execv", "execve", "fork", "call", "check_call", "check_output",
    "run", "apply", "partial", "attrgetter", "methodcaller", "breakpoint", "input", "load",
    "loads", "remove", "unlink", "rmtree", "rmdir", "kill",
})


def _find_global(path: str, module: str, name: str) -> Any:
    module = _RENAMED_MODULES.get(module, module)
    full = f"{module}.{name}"
    if full in _ALLOWED:
        return _ALLOWED[full]
    if module == "torch" and isinstance(getattr(torch, name, None),
                                        (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    top = module.split(".", 1)[0]
    torch_function = top == "torch" and not name.split(".")[-1][:1].isupper()
    if (top in _DENIED_MODULES or torch_function or name in _DENIED_NAMES
            or name.split(".")[-1] in _DENIED_NAMES):
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the pickle references {full}, which could run code "
            f"(a model checkpoint never needs it); nothing from the file was executed")
    return placeholder_class(module, name)


def _pickle_module(path: str) -> types.ModuleType:
    """A pickle-module look-alike for ``torch.load`` whose unpickler is gated per file."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _find_global(path, module, name)

    mod = types.ModuleType("vqgan_cli_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return mod


class RawCheckpoint(NamedTuple):
    """What an official checkpoint holds that we use; ``extra`` keeps the rest (inert)."""

    state_dict: dict[str, torch.Tensor]
    global_step: int | None
    extra: dict[str, Any]


def _check_container(path: Path) -> None:
    """Reject what torch.load would hand to other loaders (TorchScript runs code on use)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04":
        return
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint archive ({e})") from None
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise UnsafeCheckpointError(f"{path}: a TorchScript archive, not a weights checkpoint; "
                                    "refused (TorchScript carries code)")
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(f"{path}: a zip file without data.pkl, not a PyTorch checkpoint")


def safe_load(path: str | Path) -> Any:
    """Unpickle a torch.save/Lightning file through the restricted gate (tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    _check_container(path)
    try:
        return torch.load(path, map_location="cpu", pickle_module=_pickle_module(str(path)),
                          weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or not a checkpoint at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {e})") from None


def load_official_checkpoint(path: str | Path) -> RawCheckpoint:
    """The weights (and step) of an official ``.ckpt``; a bare state dict is accepted too."""
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: the checkpoint has no state_dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry {bad[0]!r} is not a named tensor")
    step = obj.get("global_step") if state is not obj else None
    extra = {k: v for k, v in obj.items() if k not in ("state_dict", "global_step")} \
        if state is not obj else {}
    return RawCheckpoint(dict(state), int(step) if isinstance(step, int) else None, extra)
