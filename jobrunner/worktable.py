"""The feed of a distributed run: a work table that every process claims from.

The leader feeds ``items()`` into ``jobrunner_work``, a few hundred rows per
committed INSERT, and waits while the table holds ``bound`` unclaimed rows
(back-pressure: memory stays flat for any number of items). Every process,
the leader included, claims a chunk with ``DELETE ... WHERE (run_id, seq) IN
(SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`` as the first statement of the
chunk's own transaction: the claim commits with the chunk's work, or rolls
back with it and the rows are there again for anyone. No lease, no timeout,
no clock: a process that dies returns its rows by the database's rollback.

Items travel as JSON. Only plain data survives the trip unchanged, so only
plain data is accepted: None, booleans, numbers, strings, and lists, tuples
and dicts of these (a tuple stays a tuple, dict keys keep their types).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Integer, bindparam, delete, func, insert, literal_column, select, text, tuple_, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from jobrunner import tables
from jobrunner.db import Database
from jobrunner.exceptions import DatabaseUnavailable, ItemNotPortable, first_line
from jobrunner.executor import in_this_thread
from jobrunner.feed import Entry
from jobrunner.outage import Kind, Outage, classify
from jobrunner.result import Status

log = logging.getLogger("jobrunner")
FEED_BATCH = 1000
POLL_S = 0.05
# Claims spread over lanes (seq modulo LANES), each worker starting on a lane
# of its own. Were they all to claim the lowest free rows, each claim would
# walk over the rows that every other worker holds or took since its
# snapshot (before FREE below, a claim failed on the latter: measured at
# 1.7 ms of wasted round trips per no-op item at batch 1).
LANES = 64
# Under the default row lock the guard's transaction holds back PostgreSQL's
# xmin horizon for the whole run, so the rows claims delete stay in the table's
# indexes, dead, until the run ends. Any scan that starts at a run's first seq
# walks over all of them: measured, a run of 10^5 no-op items took 16 s and one
# of 10^6 had not finished after 9 minutes. So each worker claims a lane from
# where it left it, and the leader counts only its recent rows.
#
# The leader numbers items so that each run of --batch-size consecutive items
# shares a lane (``block_seq``): numbered one by one, 64 lanes split every fed
# row 64 ways, and a claim found about bound/64 rows in its lane, whatever the
# batch size (measured at batch 100: 50 items per commit; at 1000: 79).
_SCALARS = (type(None), bool, int, float, str)


# -- items as JSON ---------------------------------------------------------------------
def encode(item: Any) -> str:
    return json.dumps(_wrap(item), separators=(",", ":"))


def decode(text: str) -> Any:
    return _unwrap(json.loads(text))


def _wrap(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list:
        return [_wrap(v) for v in value]
    if kind is tuple:
        return {"t": [_wrap(v) for v in value]}
    if kind is dict:
        return {"d": [[_wrap(k), _wrap(v)] for k, v in value.items()]}
    raise ItemNotPortable(
        f"items() yielded {_describe(value)}, which cannot travel to the other processes of a "
        "distributed run: yield None, booleans, numbers, strings, and lists, tuples and dicts of these"
    )


def _unwrap(value: Any) -> Any:
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, dict):
        if "t" in value:
            return tuple(_unwrap(v) for v in value["t"])
        return {_unwrap(k): _unwrap(v) for k, v in value["d"]}
    return value


def _describe(value: Any) -> str:
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    hint = " (convert it with tuple(row))" if name.endswith(".Row") else ""
    return f"a {name}{hint}"


# -- the statements ----------------------------------------------------------------------
work = tables.work


# A claim at REPEATABLE READ still sees, in its snapshot, rows that another
# claim deleted and committed since; FOR UPDATE on such a row fails (40001,
# an ERROR line in the server's log) even with SKIP LOCKED, which skips only
# rows locked now. Every transaction that locks a work row deletes it, so a
# row's xmax (the system column: the id of the last transaction to lock or
# delete it) tells a claim which rows are taken: 0, or a transaction that
# rolled back, is free; one in progress or committed is someone else's. The
# 32-bit xmax is widened to a full id beside this transaction's own
# (txid_current(), already assigned by the BEGIN), so txid_status can say;
# an id not before ours (a later transaction) counts as taken, and a claim
# with a newer snapshot takes the row if it was given back. Measured with
# python bench/claims.py (docs/distributed.md, "Claims that meet").
_FULL_XMAX = (
    "(txid_current() + ((xmax::text::bigint - txid_current()) % 4294967296 + 6442450944) % 4294967296"
    " - 2147483648)"
)
FREE = text(
    f"(xmax = '0'::xid OR CASE WHEN {_FULL_XMAX} BETWEEN 3 AND txid_current() - 1"
    f" THEN coalesce(txid_status({_FULL_XMAX}), '') NOT IN ('committed', 'in progress') ELSE false END)"
)


def _claiming(*, lane: bool) -> Any:
    """``DELETE`` up to ``:limit`` free rows of run ``:run_id`` (of lane ``:lane``),
    returning them. Built once: SQLAlchemy then reuses the compiled form."""
    chosen = select(work.c.run_id, work.c.seq).where(work.c.run_id == bindparam("run_id"), FREE)
    if lane:
        chosen = chosen.where(
            work.c.seq % literal_column(str(LANES)) == bindparam("lane"), work.c.seq > bindparam("after")
        )
    chosen = chosen.order_by(work.c.seq).limit(bindparam("limit")).with_for_update(skip_locked=True)
    return (
        delete(work).where(tuple_(work.c.run_id, work.c.seq).in_(chosen)).returning(work.c.seq, work.c.item)
    )


def _reclaiming() -> Any:
    return (
        delete(work)
        .where(
            tuple_(work.c.run_id, work.c.seq).in_(
                select(work.c.run_id, work.c.seq)
                .where(
                    work.c.run_id == bindparam("run_id"), work.c.seq.in_(bindparam("seqs", expanding=True))
                )
                .where(FREE)
                .with_for_update(skip_locked=True)
            )
        )
        .returning(work.c.seq)
    )


def _counting(claim: Any) -> Any:
    """``claim`` that also counts one commit for this connection when it
    claims anything (tables.chunk_commits): the count commits with the chunk
    or rolls back with it, in the same statement, so no round trip is added."""
    claimed = claim.cte("claimed")
    counts = tables.chunk_commits
    one = select(bindparam("run_id", type_=Integer), func.pg_backend_pid(), literal_column("1")).where(
        select(literal_column("1")).select_from(claimed).exists()
    )
    counted = (
        postgresql.insert(counts)
        .from_select(["run_id", "backend", "commits"], one)
        .on_conflict_do_update(
            index_elements=[counts.c.run_id, counts.c.backend], set_={"commits": counts.c.commits + 1}
        )
        .cte("counted")
    )
    return select(*claimed.c).add_cte(counted)


CLAIM_LANE = _counting(_claiming(lane=True))
CLAIM_ANY = _counting(_claiming(lane=False))
RECLAIM = _reclaiming()  # a failed item's settling, in a transaction of its own
RECLAIM_COUNTED = _counting(_reclaiming())  # a chunk's retry, which commits the chunk
# A chunk whose every item failed alone commits their failures, none of the
# job's work: it is not one of the run's commits.
UNCOUNT = (
    update(tables.chunk_commits)
    .where(tables.chunk_commits.c.run_id == bindparam("run_id"))
    .where(tables.chunk_commits.c.backend == func.pg_backend_pid())
    .values(commits=tables.chunk_commits.c.commits - 1)
)


def retry_gone(outage: Outage, action: Callable[[], Any]) -> Any:
    """Run a bookkeeping ``action``, waiting out an outage (within the bound)."""
    while True:
        try:
            return action()
        except Exception as error:
            if classify(error) is Kind.GONE and outage.wait(error):
                continue
            raise


# -- the workers' side ---------------------------------------------------------------------
class WorkTableFeed:
    """Chunks claimed from the work table, inside the worker's transaction."""

    claims_in_transaction = True

    def __init__(
        self,
        database: Database,
        run_id: int,
        *,
        stop: threading.Event,
        outage: Outage,
        leader: bool,
        feeder: Callable[[], Feeder] | None = None,
        fed_all: Callable[[], None] | None = None,
    ) -> None:
        self.database = database
        self.run_id = run_id
        self.stop = stop
        self.outage = outage
        self.leader = leader
        self._feeder = feeder  # the leader's: helpers feed nothing
        self._mark_fed_all = fed_all
        self._lanes = threading.local()
        self._all_fed = False  # once True, for good: no need to ask again
        # How take() waits (for rows, for the database): in this thread, or,
        # from an async run's loop, in a thread while the loop runs on.
        self.blocking: Callable[..., Any] = in_this_thread
        # Claims that failed on a concurrent claim and were made again: the
        # run counts them in ``retried``.
        self.count_retry: Callable[[int], None] = lambda _claims: None

    # -- the leader's side
    def feed_in(self, items: Iterable[Any], accept: Callable[[Any], bool], alive: Callable[[], bool]) -> None:
        if self._feeder is None:
            raise RuntimeError("only the leader feeds the work table")
        self._feeder().feed(items, accept)

    def finish(self, consumers: int) -> None:
        """Fed or not: the helpers finish what was fed, then leave. With the
        database gone past the outage bound there is no one to tell: the run
        is ending with 69 already, and its helpers leave with their fence."""
        if self._mark_fed_all is None:
            return
        try:
            self._mark_fed_all()
        except Exception as error:
            if classify(error) is not Kind.GONE:
                raise
            log.info("cannot mark the work table fed: %s", first_line(error))

    def take(self, session: Session, limit: int) -> list[Entry] | None:
        while not self.stop.is_set():
            try:
                rows = self._claim(session, limit)
            except Exception as error:
                _rollback(session)
                kind = classify(error)
                if kind is Kind.TRANSIENT:
                    self.count_retry(1)
                    continue  # refused all the same (see FREE): claim again
                if kind is Kind.GONE:
                    if self.blocking(self.outage.wait, error):
                        continue
                    return None
                raise
            if rows:
                # The chunk's transaction is open: the unit of work carries on in it.
                return [(decode(item), seq) for seq, item in sorted(rows)]
            session.rollback()
            if self.blocking(self._gone_or, self._finished, True):
                return None
            self.blocking(self.stop.wait, POLL_S)
        return None

    def _claim(self, session: Session, limit: int) -> list[Any]:
        """One lane after another, each from this thread's last claim in it.
        Rows behind the cursors come back only when a process dies with its
        chunk: once everything is fed, one look from the start finds them."""
        state = self._lanes.__dict__
        if "lane" not in state:
            state["lane"], state["after"] = random.randrange(LANES), [-1] * LANES
        after = state["after"]
        for _ in range(LANES):
            lane = state["lane"]
            params = {"run_id": self.run_id, "limit": limit, "lane": lane, "after": after[lane]}
            rows = session.execute(CLAIM_LANE, params).all()
            if rows:
                # This lane's next batch is a round of lanes away: start the
                # next claim on the next lane, not on this one, now drained.
                after[lane], state["lane"] = max(seq for seq, _ in rows), (lane + 1) % LANES
                return list(rows)
            session.rollback()  # the next lane with a fresh snapshot: rows fed meanwhile count
            state["lane"] = (lane + 1) % LANES
        if not retry_gone(self.outage, self._fed_all):
            return []
        if not state.get("swept_after_fed_all"):
            # This sweep may have passed a lane before the leader's last COPY
            # committed. Sweep once more, now that everything fed is visible:
            # CLAIM_ANY takes the lowest seqs of every lane at once, and would
            # mix batches in one chunk.
            state["swept_after_fed_all"] = True
            return self._claim(session, limit)
        return list(session.execute(CLAIM_ANY, {"run_id": self.run_id, "limit": limit}).all())

    def _fed_all(self) -> bool:
        if not self._all_fed:
            with self.database.bookkeeping() as session:
                query = select(tables.runs.c.fed_all).where(tables.runs.c.id == self.run_id)
                self._all_fed = bool(session.scalar(query))
        return self._all_fed

    def reclaim(self, session: Session, chunk: list[Entry]) -> list[Entry]:
        seqs = [seq for _, seq in chunk]
        ours = set(session.execute(RECLAIM_COUNTED, {"run_id": self.run_id, "seqs": seqs}).scalars())
        return [entry for entry in chunk if entry[1] in ours]

    def record_failures(
        self, session: Session, failures: list[tuple[Any, Any, str, str]], *, whole: bool = False
    ) -> None:
        """In the chunk's transaction, whose claim deleted their rows already
        (and counted the chunk a commit: not one if ``whole``, every item failed)."""
        if whole:
            session.execute(UNCOUNT, {"run_id": self.run_id})
        host, pid = socket.gethostname(), os.getpid()
        rows = [
            {
                "run_id": self.run_id,
                "seq": token,
                "item": shown,
                "payload": encode(item),
                "error": line,
                "host": host,
                "pid": pid,
            }
            for token, item, shown, line in failures
        ]
        session.execute(insert(tables.failures), rows)

    def settle_failure(self, token: Any, item: Any, item_repr: str, error_line: str) -> bool:
        """An item failed alone: remove its row and record why, in one transaction.
        False if another process holds the row now: it is theirs to settle."""

        def settle() -> bool:
            with self.database.bookkeeping() as session, session.begin():
                gone = session.execute(RECLAIM, {"run_id": self.run_id, "seqs": [token]}).first()
                if gone is None:
                    return False
                session.execute(
                    insert(tables.failures).values(
                        run_id=self.run_id,
                        seq=token,
                        item=item_repr,
                        payload=encode(item),
                        error=error_line,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                    )
                )
                return True

        # With the database gone past the bound the row stays in the table:
        # the run ends with 69, and a resume takes the item over.
        return self._gone_or(settle, gone=False)

    def _gone_or(self, action: Callable[[], bool], gone: bool) -> bool:
        """``action()``, waiting out an outage; ``gone`` once the database
        stayed away past the bound (the run is ending with 69)."""
        try:
            return retry_gone(self.outage, action)
        except Exception as error:
            if classify(error) is not Kind.GONE:
                raise
            return gone

    def _finished(self) -> bool:
        """No more work for this process? Helpers leave once everything is fed
        and nothing is free; the leader stays until the table is empty, since
        a helper that dies puts its rows back."""
        runs = tables.runs
        with self.database.bookkeeping() as session:
            state = session.execute(
                select(runs.c.status, runs.c.fed_all, runs.c.stop_requested).where(runs.c.id == self.run_id)
            ).first()
            if state is None or state.status != Status.RUNNING.value or state.stop_requested:
                return True
            if not state.fed_all:
                return False
            if not self.leader:
                return True
            left = session.scalar(select(func.count()).select_from(work).where(work.c.run_id == self.run_id))
        return left == 0


# -- the leader's side ------------------------------------------------------------------------
def block_seq(index: int, batch_size: int) -> int:
    """The seq of the ``index``-th item fed: blocks of ``batch_size`` items go
    to lanes 0, 1, ... LANES - 1 in turn, and within a lane seqs grow with
    ``index`` (the order claims follow). Batch 1 numbers items one by one."""
    block, position = divmod(index, batch_size)
    rounds, lane = divmod(block, LANES)
    return LANES * (rounds * batch_size + position) + lane


class Feeder:
    """The leader's producer: ``items()`` into the work table, with back-pressure."""

    def __init__(
        self,
        database: Database,
        run_id: int,
        *,
        bound: int,
        batch_size: int,
        item_key: Callable[[Any], Any] | None,
        stop: threading.Event,
        outage: Outage,
        first_seq: int = 0,
    ) -> None:
        self.database = database
        self.run_id = run_id
        self.bound = bound
        self.batch_size = batch_size
        self.item_key = item_key
        self.stop = stop
        self.outage = outage
        self.first_seq = first_seq  # above every row a resumed run took over
        self.fed = 0
        self.top = first_seq  # above every seq fed so far
        # Whole blocks per COPY: a claim never finds half a block in its lane.
        self.flush_at = -(-FEED_BATCH // batch_size) * batch_size

    def feed(self, items: Iterable[Any], accept: Callable[[Any], bool]) -> None:
        rows: list[dict[str, Any]] = []
        for item in items:
            if not accept(item):
                continue
            key = str(self.item_key(item)) if self.item_key is not None else None
            seq = self.first_seq + block_seq(self.fed, self.batch_size)
            rows.append({"run_id": self.run_id, "seq": seq, "item": encode(item), "key": key})
            self.fed += 1
            self.top = max(self.top, seq + 1)
            if len(rows) >= self.flush_at:
                if not self._flush(rows):
                    return
                rows = []
        self._flush(rows)

    def _flush(self, rows: list[dict[str, Any]]) -> bool:
        if not rows:
            return not self.stop.is_set()
        try:
            while retry_gone(self.outage, self._unclaimed) >= self.bound:
                if self.stop.wait(POLL_S):
                    return False
            if self.stop.is_set():
                return False
            retry_gone(self.outage, lambda: self._write(rows))
        except Exception as error:
            if classify(error) is not Kind.GONE:
                raise
            # The feeder's own statements, not items(): say so.
            raise DatabaseUnavailable(
                f"the database went away while the leader fed the work table: {first_line(error)}"
            ) from error
        return True

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with self.database.bookkeeping() as session, session.begin():
            _copy_rows(session, rows)
            fed = tables.runs.c.fed + len(rows)
            session.execute(update(tables.runs).where(tables.runs.c.id == self.run_id).values(fed=fed))

    def _unclaimed(self) -> int:
        """Unclaimed rows among the recent ones: claims go in seq order lane by
        lane, so what is left further back is a few stragglers, and counting
        them would walk over every row the run has deleted (see LANES)."""
        # A round of lanes spans LANES * batch_size seqs, fed in any order.
        recent = work.c.seq >= self.top - 4 * self.bound - LANES * self.batch_size
        with self.database.bookkeeping() as session:
            return (
                session.scalar(
                    select(func.count()).select_from(work).where(work.c.run_id == self.run_id, recent)
                )
                or 0
            )


def _copy_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """COPY, not INSERT: measured, a multi-row INSERT of 500 rows took most of the
    leader's feeding time, and feeding capped a run of cheap items."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow((row["run_id"], row["seq"], row["item"], "" if row["key"] is None else row["key"]))
    buffer.seek(0)
    cursor = session.connection().connection.cursor()
    try:
        cursor.copy_expert(
            "COPY jobrunner_work (run_id, seq, item, key) FROM STDIN WITH (FORMAT csv, NULL '')", buffer
        )
    finally:
        cursor.close()


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception:
        log.debug("rollback failed", exc_info=True)


def first_free_seq(database: Database, run_id: int) -> int:
    with database.bookkeeping() as session:
        top = session.scalar(select(func.max(work.c.seq)).where(work.c.run_id == run_id))
    return 0 if top is None else top + 1
