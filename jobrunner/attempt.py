"""What to do after an attempt at a chunk's transaction: the decisions alone.

A transaction driver (``transaction.py`` for threads) runs a chunk, reports
what happened, and carries out what this module says: it does the waiting
(backoff, the outage, the fence), never the deciding. Every function here is
pure: (what happened, the counters so far, the run's stop state) in, one
:class:`Do` out. So every branch is tested in milliseconds without a
database, and a second driver reuses the same rules instead of copying them.

What happened is one of: the fence refused the commit (:func:`after_refusal`),
the attempt raised (:func:`after_error`, the error classified once by
:func:`jobrunner.outage.classify`), an outage wait ended
(:func:`after_outage`), or a commit cut by a lost connection was looked up
(:func:`after_settle`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TypeVar

from jobrunner.outage import Kind

# A database that keeps vanishing while the same chunk runs is not waited
# for forever: after this many redos the chunk counts as failed.
MAX_REDOS_AFTER_OUTAGE = 5
T = TypeVar("T")


class Verdict(enum.Enum):
    """The fence's answer to "may this transaction commit?"."""

    COMMIT = "commit"
    REDO = "redo"  # the lock was retaken since this transaction began: redo it
    ABANDON = "abandon"  # the run may no longer commit: roll back and stop


class Do(enum.Enum):
    REDO = "redo"  # again at once; nothing spent (the lock was taken again, or the database is back)
    RETRY = "retry"  # again after a backoff, one retry spent
    WAIT = "wait"  # wait out the outage, then see (after_outage)
    SETTLE = "settle"  # the connection died in COMMIT: look up whether it committed
    ISOLATE = "isolate"  # the chunk failed: find its bad items (see isolate())
    FAIL = "fail"  # the item failed: record it
    ROLL_BACK = "roll_back"  # the run may not commit this: roll back, count it rolled back
    DONE = "done"  # it committed (a settled commit): count it


@dataclasses.dataclass(frozen=True)
class Policy:
    """The run's limits for one chunk."""

    retries: int  # --retries: transient conflicts retried per chunk
    max_redos: int = MAX_REDOS_AFTER_OUTAGE


@dataclasses.dataclass
class Tally:
    """What one chunk has spent so far (one per chunk, owned by its driver)."""

    retries: int = 0
    redos: int = 0


def after_refusal(verdict: Verdict) -> Do:
    """The fence said no to a commit: redo under the retaken lock, or give up."""
    if verdict is Verdict.REDO:
        return Do.REDO
    if verdict is Verdict.ABANDON:
        return Do.ROLL_BACK
    raise ValueError(f"{verdict} is not a refusal")


def after_error(
    kind: Kind,
    *,
    committing: bool,
    items: int,
    tally: Tally,
    policy: Policy,
    stopping: bool,
    fatal_stop: bool,
) -> Do:
    """The attempt raised an error of ``kind`` (after its rollback).

    ``committing``: it was raised by COMMIT itself. ``stopping``: the run is
    stopping for any reason; ``fatal_stop``: for one that forbids commits (a
    lost lock, an outage past its bound).
    """
    if kind is Kind.GONE:
        if committing:
            return Do.SETTLE  # it may have committed: never simply redone
        if tally.redos < policy.max_redos:
            return Do.WAIT
        return Do.ROLL_BACK if stopping else _failed(items)
    if kind is Kind.TRANSIENT and tally.retries < policy.retries and not fatal_stop:
        return Do.RETRY
    return _failed(items)


def after_outage(*, back: bool, gave_up: bool, stopping: bool, items: int) -> Do:
    """An outage wait ended: redo once the database is back (not counted
    against --retries: it is not the items' fault); else the run is ending."""
    if back:
        return Do.REDO
    if gave_up or stopping:
        return Do.ROLL_BACK
    return _failed(items)


def before_settle(*, can_look: bool) -> Do:
    """A commit was cut: it can be looked up (resume keys, or PostgreSQL's
    transaction status) once the database is back, or it is in doubt."""
    return Do.WAIT if can_look else Do.FAIL


def after_settle(committed: bool | None) -> Do:
    """The lookup answered: it committed, it did not (redo it), or nobody
    can say (the item fails as in doubt rather than risk doing it twice)."""
    if committed is None:
        return Do.FAIL
    return Do.DONE if committed else Do.REDO


def _failed(items: int) -> Do:
    return Do.ISOLATE if items > 1 else Do.FAIL


def halves(part: list[T]) -> list[list[T]]:
    """How a part of a failed chunk is tried again inside its transaction: in
    two halves, recursively, so the good items stay in parts that succeed.
    One bad item among n costs about 2*log2(n) tries instead of n."""
    middle = (len(part) + 1) // 2
    return [half for half in (part[:middle], part[middle:]) if half]


def split(part: list[T], culprit: int | None) -> list[list[T]]:
    """How a failed part of a chunk is tried again inside its transaction.

    ``culprit``: the position of the item whose own ``process()`` raised,
    when that is known. The items before it ran well: they are tried again
    together, the culprit alone (to see that it fails alone), and the rest
    as the next part; so a trickle of bad items costs each stretch of good
    items one more run, not a binary search. When nothing says which item
    failed (``process_batch``, an error at flush), :func:`halves`.
    """
    if culprit is None or not 0 <= culprit < len(part):
        return halves(part)
    return [piece for piece in (part[:culprit], part[culprit : culprit + 1], part[culprit + 1 :]) if piece]


def isolate(items: int) -> list[int]:
    """When a chunk's own transaction could not isolate its bad items (its
    conflicts outlasted --retries, or COMMIT itself failed): the sizes of the
    parts tried again, each in a transaction of its own. One item per
    transaction (Spring Batch's scan), so only the items that fail alone fail."""
    return [1] * items


# Chunks in a row without a bad item before a chunk runs whole again.
SAVEPOINTS_CLEAN_CHUNKS = 2
# While bad items keep coming, a chunk runs in groups of this many items, a
# savepoint each (see ItemSavepoints).
SAVEPOINT_EVERY = 16


class ItemSavepoints:
    """Whether a chunk runs in groups of SAVEPOINT_EVERY items, each in a
    savepoint of its own: shared by a run's workers, since how often items
    are bad is the data's, not one worker's. A chunk run whole costs nothing
    extra, and a bad item in it costs its stretch of good items one more run
    (see :func:`split`); a trickle of bad items (1% puts five in every chunk
    of 500) runs most items twice. In groups, a bad item costs only its own
    group's items before it one more run (about 8 of 16), for a SAVEPOINT
    and a RELEASE per group. (A savepoint per item costs more than it saves:
    two more statements for each item, measured 3.2x the run without bad
    items at 1% bad, against 2.0x for the whole chunk.) So: groups after a
    chunk that held a bad item, the whole chunk again after
    SAVEPOINTS_CLEAN_CHUNKS chunks that held none. Plain attribute updates:
    a race between workers only moves the switch by a chunk."""

    def __init__(self) -> None:
        self.on = False
        self._clean = 0

    def chunk(self, *, bad: bool) -> None:
        """A chunk's items ran: ``bad`` if one of them failed because of itself."""
        if bad:
            self.on, self._clean = True, 0
        elif self.on:
            self._clean += 1
            if self._clean >= SAVEPOINTS_CLEAN_CHUNKS:
                self.on, self._clean = False, 0


# Clean commits at one chunk size before a worker lets it grow.
GROW_AFTER = 4
GROW_AFTER_MAX = 1024  # clean commits before a probe, after probes that kept failing
GROW_AFTER_DEADLOCK = 256  # and at least this many after a deadlock
# How long a chunk of two or more items waits for a lock (PostgreSQL's
# lock_timeout; see ChunkSize.bounded_wait).
BOUNDED_LOCK_WAIT_MS = 100


class Pace:
    """How many clean commits a worker waits before it tries a larger chunk:
    shared by the workers of a run, so that what one learns (a larger chunk
    keeps conflicting) spares the others the same lesson. Plain attribute
    updates: a race between workers only moves a probe by a commit."""

    def __init__(self) -> None:
        self.grow_after = GROW_AFTER


class ChunkSize:
    """One worker's chunk size under contention, as TCP sizes its window: a
    conflict halves it (down to 1) and remembers the half as a threshold;
    after GROW_AFTER clean commits it doubles up to the threshold, then grows
    by one item at a time, never above the ceiling (--batch-size). A chunk of
    hot-row items holds every item's locks until its commit, and one conflict
    throws all of it away: smaller chunks hold fewer locks for less time, so
    they conflict less, and lose less when they do; growing slowly past the
    size that last conflicted keeps the worker from finding that size again
    at once. Fixed (``adapt=False``) it stays at the ceiling.

    A deadlock sends it to 1 at once, and the next larger chunk waits for at
    least GROW_AFTER_DEADLOCK clean commits: a deadlock says the chunk's lock
    order crossed another transaction's, which any chunk of two or more
    hot-row items can do again, and each costs the server's deadlock_timeout
    (a second by default) for this chunk, the transaction it met, and every
    transaction queued behind their locks. A size grown to that conflicts before it has
    grown again was a failed probe: the next probe, by any worker of the run
    (they share ``pace``), waits for twice as many clean commits, up to
    GROW_AFTER_MAX. A probe that holds brings the usual pace back.

    A chunk of two or more items waits for a lock at most
    BOUNDED_LOCK_WAIT_MS (``bounded_wait``): one that would wait longer
    holds its other items' locks meanwhile, and every transaction queued
    behind them, and on hot rows it is a deadlock in the making, which the
    server finds only after its deadlock_timeout. It gives up instead, as a
    deadlock would (transaction.Unit), and is retried in single items,
    which wait as long as they must. Bounded only once a run had met a
    deadlock, the first chunk of every worker waited as long as the server
    let it, and beside pgbench -b 100 ran at 0.94x batch 1's items/s, where
    it ran at 1.07x with the bound in the same run, and at 0.91x in another
    (BENCHMARKS.md, section 17)."""

    def __init__(self, ceiling: int, *, adapt: bool = True, pace: Pace | None = None) -> None:
        self.ceiling = ceiling
        self.adapt = adapt
        self.size = ceiling
        self.threshold = ceiling
        self.pace = pace if pace is not None else Pace()
        self._clean = 0
        self._probing = False  # the size was grown to, and has not grown again since

    @property
    def grow_after(self) -> int:
        return self.pace.grow_after

    @property
    def bounded_wait(self) -> bool:
        """Whether a chunk of two or more items waits for a lock at most
        BOUNDED_LOCK_WAIT_MS."""
        return self.adapt

    def conflict(self, *, deadlock: bool = False) -> int:
        """A chunk failed on a conflict: the size to go on with."""
        if self.adapt:
            if self._probing:
                self.pace.grow_after = min(GROW_AFTER_MAX, self.pace.grow_after * 2)
            if deadlock:
                self.pace.grow_after = max(self.pace.grow_after, GROW_AFTER_DEADLOCK)
            self.size = self.threshold = 1 if deadlock else max(1, self.size // 2)
            self._clean = 0
            self._probing = False
        return self.size

    def committed(self, items: int) -> None:
        """A chunk of ``items`` committed at the first try."""
        if not self.adapt or self.size >= self.ceiling or items < self.size:
            return
        self._clean += 1
        if self._clean >= self.pace.grow_after:
            if self._probing:
                self.pace.grow_after = GROW_AFTER  # the size grown to held
            grown = min(self.size * 2, self.threshold) if self.size < self.threshold else self.size + 1
            self.size = min(self.ceiling, max(grown, self.size + 1))
            self._clean = 0
            self._probing = True


def parts(work: list[T], size: int) -> list[list[T]]:
    """``work`` cut into parts of at most ``size``, in order."""
    return [work[start : start + size] for start in range(0, len(work), max(1, size))]
