"""Streaming millions of keys without one long snapshot.

``session.scalars(select(...).execution_options(yield_per=1000))`` streams
through a server-side cursor, which lives in one transaction: PostgreSQL
keeps that transaction's snapshot, and VACUUM cannot remove any row that
died after it, for as long as the stream runs (measured: 49,708 rows "dead
but not yet removable" during one run). :func:`paged` reads one page at a
time instead, ordered by a unique key, each page in a transaction that ends
before the page is handed out, and resumes after the last key it returned.
A page that finds the database gone waits for it (within the run's outage
bound) and is read again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from jobrunner.outage import Kind, classify

OUTAGE_INFO = "jobrunner_outage"


def paged(session: Any, query: Select[Any], *, key: Any, size: int = 1000) -> Any:
    """Yield the rows of ``query`` in order of ``key``, ``size`` rows per short
    transaction: a scalar per row when ``query`` selects one column, else a tuple.

    ``key`` must be a column (or expression) that is unique and never NULL
    across the rows, such as the primary key; ``query`` may have its own
    WHERE but no ORDER BY or LIMIT of its own (paging sets both)::

        def items(ctx, session):
            return jobrunner.paged(session, select(Product.id), key=Product.id)

    An async job hands it its AsyncSession and gets an async iterator::

        async def items(ctx, session):
            async for product_id in jobrunner.paged(session, select(Product.id), key=Product.id):
                yield product_id
    """
    if size < 1:
        raise ValueError("paged(): size must be at least 1")
    if hasattr(session, "sync_session"):  # an AsyncSession
        return _paged_async(session, query, key=key, size=size)
    return _paged(session, query, key=key, size=size)


def _pages(query: Select[Any], key: Any, size: int) -> tuple[int, Select[Any]]:
    """(columns per row, the query for one page)."""
    return len(query.selected_columns), query.add_columns(key).order_by(None).order_by(key).limit(size)


def _paged(session: Session, query: Select[Any], *, key: Any, size: int) -> Iterator[Any]:
    width, page_query = _pages(query, key, size)
    outage = session.info.get(OUTAGE_INFO)
    last: Any = None
    while True:
        statement = page_query if last is None else page_query.where(key > last)
        try:
            rows = session.execute(statement).all()
            session.rollback()  # the page's transaction ends before any row is handed out
        except Exception as error:
            session.rollback()
            if outage is not None and classify(error) is Kind.GONE and outage.wait(error):
                continue
            raise
        yield from (row[0] if width == 1 else tuple(row[:width]) for row in rows)
        if len(rows) < size:
            return
        last = rows[-1][width]


async def _paged_async(session: Any, query: Select[Any], *, key: Any, size: int) -> AsyncIterator[Any]:
    """:func:`paged` on an AsyncSession: the same pages, awaited."""
    width, page_query = _pages(query, key, size)
    outage = session.info.get(OUTAGE_INFO)
    last: Any = None
    while True:
        statement = page_query if last is None else page_query.where(key > last)
        try:
            rows = (await session.execute(statement)).all()
            await session.rollback()
        except Exception as error:
            await session.rollback()
            gone = outage is not None and classify(error) is Kind.GONE
            if gone and await asyncio.to_thread(outage.wait, error):
                continue
            raise
        for row in rows:
            yield row[0] if width == 1 else tuple(row[:width])
        if len(rows) < size:
            return
        last = rows[-1][width]
