"""Faults in words: operating-system errors named with their path, what a command has kept so
far, and free space checked against what a run will write.

Library code records what is safe as it goes (``ledger.record``); the CLI's one error boundary
(``cli.run_guarded``) turns an ``OSError`` into one message: the path, the cause in words, what
was kept and what to do. Writers attach the path to errors that lack one (``naming``), and
errors that arrive wrapped (torch.save's ``RuntimeError``, safetensors' ``SafetensorError``)
are unwrapped to the ``OSError`` underneath (``os_error_in``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error: the disk or network mount failed to read or write",
    errno.EMFILE: "too many open files in this process",
    errno.ENFILE: "too many open files on this system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder is in the way of a file",
}


@dataclass
class Ledger:
    """What the running command has kept, how to continue it, and what it still needs."""

    kept: str = "nothing was written"
    resume: str = "re-run the same command"
    need: int | None = None  # bytes the rest of the run is expected to write

    def record(self, kept: str, resume: str | None = None) -> None:
        self.kept = kept
        if resume is not None:
            self.resume = resume


ledger = Ledger()


def reset_ledger() -> None:
    """A fresh ledger at the start of each command (tests run many commands in one process)."""
    ledger.kept, ledger.resume, ledger.need = Ledger.kept, Ledger.resume, None


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns at GB


def existing_folder(path: str | Path) -> Path:
    """The nearest folder of ``path`` that exists (where its bytes would go)."""
    p = Path(path)
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(existing_folder(path)).free


def space_shortfall(folder: str | Path, need: int, what: str, setting: str) -> str | None:
    """A warning when ``folder`` has less free space than ``need`` bytes (``what`` says how the
    estimate was made, ``setting`` chooses the folder); None when there is room. Records the
    need for a later ENOSPC message."""
    ledger.need = need
    free = free_bytes(folder)
    if free >= need:
        return None
    return (f"{folder} has {human_bytes(free)} free, but this run will write about {human_bytes(need)} "
            f"({what}); it will stop when the disk is full. Free about {human_bytes(need - free)} more "
            f"or choose another {setting}")


_RUST_OS_ERROR = re.compile(r"os error (\d+)")


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, one in its cause/context chain, or the errno that a
    wrapped message states ("os error 28" from safetensors)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if m := _RUST_OS_ERROR.search(str(exc)):
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Attach ``path`` to an OSError raised without one (a write on an open file)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _remedy(e: OSError, path: str | None, setting: str) -> str:
    where = existing_folder(path) if path else None
    then = f"then {ledger.resume}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        if ledger.need and where:
            return (f"free about {human_bytes(max(ledger.need - free_bytes(where), 0))} more in {where} (the "
                    f"rest of the run writes about {human_bytes(ledger.need)}) or choose another {setting}; {then}")
        return f"free space in {where or 'the output folder'} or choose another {setting}; {then}"
    if e.errno == errno.EROFS:
        return f"choose another {setting} on a writable disk (or remount {where} read-write); {then}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"give this user access to {where} (ls -ld, chmod, chown) or choose another "
                f"{setting}; {then}")
    if e.errno == errno.EIO:
        return f"check the device holding {where} (dmesg, fsck) or move the files to a healthy disk; {then}"
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return f"raise the open-file limit (ulimit -n 4096) or use fewer loader workers; {then}"
    return f"fix the cause above; {then}"


def explain(e: OSError, setting: str) -> str:
    """One message for an operating-system error: path, cause in words, what was kept, what to do.

    ``setting`` is the option that chooses the command's output folder (``--out``,
    ``train.out_dir``): the usual way out of a full or read-only disk is another folder.
    """
    path = e.filename
    cause = CAUSES.get(e.errno, e.strerror or str(e))  # type: ignore[arg-type]
    name = errno.errorcode.get(e.errno, "?") if e.errno is not None else "?"
    detail = f"{cause} ({name})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and path:
        detail += f"; {human_bytes(free_bytes(path))} free in {existing_folder(path)}"
    head = f"{path}: {detail}" if path else f"{detail} (the system did not say which file)"
    return f"{head}\n  kept: {ledger.kept}\n  to do: {_remedy(e, path, setting)}"


class Stopped(Exception):
    """SIGTERM arrived (raised where the command was, so it stops at once and cleans up)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``Stopped`` (like Ctrl-C raises KeyboardInterrupt) for the block's duration."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
