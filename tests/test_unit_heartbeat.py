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
