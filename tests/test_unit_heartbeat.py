"""The fence's timing on its own: a heartbeat whose checks are scripted, no
database. What a frozen process (SIGSTOP, a paused VM) may and may not
commit when it wakes."""

from __future__ import annotations

import threading
import time
from typing import Any

from jobrunner.attempt import Verdict
from jobrunner.locking import _Heartbeat

HEARTBEAT = 0.05


class Scripted(_Heartbeat):
    """Each beat takes the next (delay, answer) of ``script``: the delay comes
    after the database answered, as when the process is frozen just then."""

    def __init__(self, script: list[tuple[float, str | None]]) -> None:
        super().__init__(
            None,  # type: ignore[arg-type]  # never used: nothing here talks to a database
            "job",
            heartbeat=HEARTBEAT,
            on_lost=None,
            may_retake=None,
            retake_within=0.0,
            notice=None,
        )
        self.script = list(script)
        self.answered = threading.Event()  # the frozen beat's reply has arrived

    def _take(self, *, initial: bool) -> tuple[Any, Any]:
        return _Nothing(), None

    def _beat(self, session: Any, backend: Any) -> str | None:
        if not self.script:
            return None
        delay, answer = self.script.pop(0)
        if delay:
            self.answered.set()
            time.sleep(delay)
        return answer


class _Nothing:
    def close(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def test_a_beat_answered_before_a_freeze_does_not_count_as_fresh_after_it():
    """The reply says "held", then the process sleeps longer than the fence's
    freshness; meanwhile the lock is taken elsewhere, which the next beat
    finds. A worker asking as the process wakes must not be told COMMIT on the
    strength of the old reply: it waits for the next beat and hears ABANDON."""
    stale_after = 2 * HEARTBEAT + 0.5
    fence = Scripted([(stale_after + 0.5, None), (0.0, "the lock's connection failed")])
    with fence:
        assert fence.answered.wait(5)
        # Woken: the frozen beat returns "held" at about this moment.
        time.sleep(stale_after + 0.5)
        verdict = fence.verdict(fence.epoch())
    assert verdict is Verdict.ABANDON
    assert fence.lost_reason == "the lock's connection failed"


def test_fresh_beats_let_workers_commit_without_waiting():
    fence = Scripted([])
    with fence:
        time.sleep(3 * HEARTBEAT)
        began = time.monotonic()
        verdict = fence.verdict(fence.epoch())
        waited = time.monotonic() - began
    assert verdict is Verdict.COMMIT
    assert waited < HEARTBEAT


def test_a_retake_counts_as_a_new_epoch():
    fence = Scripted([])
    with fence:
        epoch = fence.epoch()
        fence.retakes += 1  # what _retake does once the lock is taken again
        assert fence.verdict(epoch) is Verdict.REDO
        assert fence.verdict(fence.epoch()) is Verdict.COMMIT


class RetakeFails(Scripted):
    """The connection fails; taking the lock again raises what no branch of
    the retake expects (seen: psycopg2's own error, outside SQLAlchemy's
    wrapping, from a connection that died in a restart)."""

    def __init__(self) -> None:
        super().__init__([(0.0, "the lock's connection failed")])
        self.may_retake = lambda: True
        self.retake_within = 5.0

    def _take(self, *, initial: bool) -> tuple[Any, Any]:
        if initial:
            return _Nothing(), None
        raise RuntimeError("server closed the connection unexpectedly")


def test_a_lock_thread_that_fails_unforeseen_loses_the_lock_rather_than_leave_workers_waiting():
    """Workers wait for the lock's thread before they commit; were it to die,
    they would wait for good (a run that never exits)."""
    fence = RetakeFails()
    answers: list[Verdict | None] = []
    with fence:
        time.sleep(3 * HEARTBEAT)  # the beat has failed, and the retake with it
        asking = threading.Thread(target=lambda: answers.append(fence.verdict(fence.epoch())))
        asking.start()
        asking.join(3)
        waiting = asking.is_alive()
    asking.join(5)
    assert not waiting, "a worker waited on a lock that nobody looks after"
    assert answers == [Verdict.ABANDON]
    assert fence.lost_reason == "the lock's thread failed: server closed the connection unexpectedly"
