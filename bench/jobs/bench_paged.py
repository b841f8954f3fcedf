"""Benchmark: items read from a table with jobrunner.paged() or one streaming
cursor (--param source=stream), each a short sleep: what pins VACUUM."""

import time

from sqlalchemy import Column, Integer, MetaData, Table, select

import jobrunner

metadata = MetaData()
source = Table("bench_source", metadata, Column("id", Integer, primary_key=True))


def setup(ctx, session):
    metadata.create_all(session.connection())
    if not session.execute(select(source.c.id).limit(1)).first():
        session.execute(source.insert(), [{"id": i} for i in range(int(ctx.params.get("n", 100000)))])


def items(ctx, session):
    if ctx.params.get("source") == "stream":
        return session.scalars(select(source.c.id).order_by(source.c.id).execution_options(yield_per=1000))
    return jobrunner.paged(session, select(source.c.id), key=source.c.id, size=1000)


def process(ctx, session, item):
    time.sleep(0.001)
