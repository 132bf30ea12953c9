"""Turn SIGINT/SIGTERM into a flag the loop checks between steps, so it can save and exit."""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Installed for the duration of a run; restores the previous handlers on ``close``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
