"""Why a run stops early: one record, set once, read everywhere.

A signal, the failure limit, a lost lock, an outage past its bound: each
sets the same :class:`Stop`. The first reason wins, except that a lost lock
or an unreachable database replaces a milder one (an operator must learn
that the run could no longer commit, not merely that it was interrupted).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

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


# How long leaving at once may take to record why (a second signal).
LEAVING_S = 1.0


@contextlib.contextmanager
def catch_signals(
    stop: Stop,
    notice: Callable[[str], None],
    shutdown_timeout: float,
    leaving: Callable[[], None] | None = None,
) -> Iterator[None]:
    """SIGTERM/SIGINT stop the run gracefully; a second one leaves at once
    (the database rolls back whatever was in flight), after ``leaving()``
    if it is done within LEAVING_S (the run's history says interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.signal is not None:
            if leaving is not None:
                recorder = threading.Thread(target=leaving, name="jobrunner-leaving", daemon=True)
                recorder.start()
                recorder.join(LEAVING_S)
            os._exit(128 + signum)
        name = signal.Signals(signum).name
        stop.set(Status.INTERRUPTED, f"interrupted by {name}", signum=signum)
        stop.signal = signum
        notice(
            f"{name} received: finishing in-flight items (up to {shutdown_timeout:g}s); "
            "send it again to exit at once"
        )

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
