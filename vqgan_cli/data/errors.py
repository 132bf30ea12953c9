"""The data layer's exceptions and warning.

A module of their own, below every data module that raises them, so that none has to import the
package ``__init__`` (which imports those modules back)."""

from __future__ import annotations


class DataError(Exception):
    """A data problem that must stop the run; the message names the file or source at fault."""


class BadFile(DataError):
    """One unreadable or invalid file; skipped (with a DataWarning) or raised per ``bad_files``."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DataWarning(UserWarning):
    """A bad file was skipped (``bad_files: skip``); the message names the file and why."""
