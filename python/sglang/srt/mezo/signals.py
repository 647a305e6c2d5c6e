"""Signals, handled in one place: `StopRequests` (Ctrl-C or SIGTERM during training asks the
loop to stop after the step in flight, so the run can checkpoint and exit) and
`DeferredInterrupts` (Ctrl-C held until an update's writes are done, so weights end
pre-step or post-step, never in between). Outside the main thread signals cannot be
caught: both then change nothing.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequests:
    """Within the block, SIGINT and SIGTERM set `requested` (the signal's name) instead of
    killing the process; a second SIGINT raises KeyboardInterrupt at once. Handlers are
    restored on exit. Outside the main thread signals cannot be caught: nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = signal.Signals(signum).name, signum

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class DeferredInterrupts:
    """Holds SIGINT until the block ends, so an update is never cut in half by Ctrl-C."""

    def __enter__(self):
        self.received = None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self.received = (signum, frame)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.received is not None and callable(self.previous):
                self.previous(*self.received)
        return False
