"""Turn SIGINT/SIGTERM into a flag the loop checks between steps, so it can save and exit.

Work between steps that can take long (validation) calls :func:`check_stop` between its batches:
it raises ``faults.Stopped`` once a signal came, and the engine saves as it does between steps."""

from __future__ import annotations

import signal
from types import FrameType

from vqgan_cli.faults import Stopped


class StopRequest:
    """Installed for the duration of a run; restores the previous handlers on ``close``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        _active.append(self)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """Shell convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or 0)

    def close(self) -> None:
        if self in _active:
            _active.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


_active: list[StopRequest] = []  # the requests of the runs in progress (innermost last)


def check_stop() -> None:
    """Raise ``Stopped`` when a signal asked the running loop to stop; a no-op outside a run."""
    if _active and _active[-1].signum is not None:
        raise Stopped(_active[-1].signum)
