"""Why a run stops early: one record, set once, read everywhere.

A signal, the failure limit, a lost lock, an outage past its bound: each
sets the same :class:`Stop`. The first reason wins, except that a lost lock
or an unreachable database replaces a milder one (an operator must learn
that the run could no longer commit, not merely that it was interrupted).
"""

from __future__ import annotations

import threading

from jobrunner.result import Status

# Reasons that mean "nothing may commit any more"; they override the others.
FATAL = (Status.LOCK_LOST, Status.UNAVAILABLE)


class Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self.reason: Status | None = None
        self.message: str | None = None
        self.signal: int | None = None

    def set(self, reason: Status, message: str, *, signum: int | None = None) -> bool:
        """Record why the run stops; True if this call decided the reason."""
        with self._lock:
            decided = self.reason is None or (reason in FATAL and self.reason not in FATAL)
            if decided:
                self.reason, self.message = reason, message
                if signum is not None:
                    self.signal = signum
            self.event.set()
            return decided

    def is_set(self) -> bool:
        return self.event.is_set()

    @property
    def fatal(self) -> bool:
        """True once the run may no longer commit anything."""
        return self.reason in FATAL
