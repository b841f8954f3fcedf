"""Job modules the tests write into a temporary jobs folder."""

# Records, for each item, the worker thread and the session that processed it.
# Items listed in --param fail=1,2,3 insert a row and then raise: the row must
# not survive. --param n=N sets the number of items.
RECORD = '''
"""Record which thread and session processed each item."""
import threading
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text(
        "CREATE TABLE IF NOT EXISTS seen (item INTEGER NOT NULL, thread BIGINT NOT NULL, "
        "session_id BIGINT NOT NULL)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 500)))

def process(ctx, session, item):
    session.execute(text("INSERT INTO seen VALUES (:i, :t, :s)"),
                    {"i": item, "t": threading.get_ident() % 2**62, "s": id(session) % 2**62})
    fail = ctx.params.get("fail", "")
    if fail == "all" or str(item) in fail.split(","):
        raise ValueError(f"item {item} is broken")
'''

# A slow job whose items each write two rows in one transaction, with a pause
# between them, and log when each item ran (start and end in the same row).
TWO_ROWS = '''
"""Each item writes two rows in one transaction, slowly."""
import os, time
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text(
        "CREATE TABLE IF NOT EXISTS pairs (item INTEGER NOT NULL, part INTEGER NOT NULL, "
        "pid INTEGER NOT NULL, t0 DOUBLE PRECISION NOT NULL, t1 DOUBLE PRECISION NOT NULL)"))

def items(ctx, session):
    n, gate = int(ctx.params.get("n", 20)), ctx.params.get("gate")
    return _gated(n, gate) if gate else range(n)

def _gated(n, gate):
    yield from range(n)
    deadline = time.time() + 60  # the run keeps its lock until the test creates the gate
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.05)

def process(ctx, session, item):
    t0 = time.time()
    session.execute(text("INSERT INTO pairs VALUES (:i, 1, :p, :t0, :t0)"),
                    {"i": item, "p": os.getpid(), "t0": t0})
    time.sleep(float(ctx.params.get("sleep", 0.1)))
    t1 = time.time()
    session.execute(text("INSERT INTO pairs VALUES (:i, 2, :p, :t0, :t1)"),
                    {"i": item, "p": os.getpid(), "t0": t0, "t1": t1})
'''

# A generator of many items; item 0 records how many had been produced when
# it was processed.
LAZY = '''
"""A generator of many no-op items."""
from sqlalchemy import text

produced = 0

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS probe (produced INTEGER NOT NULL)"))

def items(ctx, session):
    global produced
    for i in range(int(ctx.params.get("n", 1_000_000))):
        produced += 1
        yield i

def process(ctx, session, item):
    if item == 0:
        session.execute(text("INSERT INTO probe VALUES (:p)"), {"p": produced})
    elif ctx.params.get("stop_after_first"):
        raise RuntimeError("enough")  # with --max-failures 0: the run stops here
'''

# Read-modify-write of one shared counter by every item, the well-written way
# for a hot row: lock it, then read committed is safe (and never retries).
COUNTER = '''
"""Increment one counter per item, reading it first."""
from sqlalchemy import text

ISOLATION = "read_committed"

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    if session.execute(text("SELECT count(*) FROM counter")).scalar() == 0:
        session.execute(text("INSERT INTO counter VALUES (1, 0)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 200)))

def process(ctx, session, item):
    if session.get_bind().dialect.name != "sqlite":  # SQLite's BEGIN IMMEDIATE locks already
        n = session.execute(text("SELECT n FROM counter WHERE id = 1 FOR UPDATE")).scalar()
    else:
        n = session.execute(text("SELECT n FROM counter WHERE id = 1")).scalar()
    session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
'''

# Measures how many workers hold a database connection at once.
CONCURRENCY = '''
"""Hold a connection while sleeping; record the peak of concurrent holders."""
import threading
from sqlalchemy import text

lock = threading.Lock()
active = 0

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS conc (item INTEGER, active INTEGER)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 64)))

def process(ctx, session, item):
    global active
    session.connection()  # checks a connection out of the pool
    with lock:
        active += 1
        seen = active
    try:
        session.execute(text("SELECT pg_sleep(0.5)"))
        session.execute(text("INSERT INTO conc VALUES (:i, :a)"), {"i": item, "a": seen})
    finally:
        with lock:
            active -= 1
'''

# Fails the first attempt of every item in the way --param mode=... says:
# terminate (kills its own backend), 40P01, 40001, or value (every attempt
# raises ValueError). Each attempt appends the item to the file --param log=.
RETRY = '''
"""Fail each item's first attempt."""
import threading
from sqlalchemy import text

attempts = {}
lock = threading.Lock()

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS done (item INTEGER NOT NULL)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 20)))

def process(ctx, session, item):
    with lock:
        attempts[item] = attempts.get(item, 0) + 1
        first = attempts[item] == 1
    with open(ctx.params["log"], "a") as fh:
        fh.write(f"{item}\\n")
    session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
    mode = ctx.params["mode"]
    if mode == "value":
        raise ValueError(f"item {item} is not transient")
    if first and mode == "terminate":
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    if first and mode in ("40P01", "40001"):
        session.execute(text(
            f"DO $$ BEGIN RAISE EXCEPTION 'injected {mode}' USING ERRCODE = '{mode}'; END $$"))
'''

# ORM and Core changes of every kind, for the dry-run report. Item 9 fails
# (a duplicate key), so its changes must not be counted.
DRY = '''
"""Change rows through the ORM and through Core statements."""
from sqlalchemy import Column, Integer, MetaData, Table, delete, insert, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase):
    pass

class A(Base):
    __tablename__ = "dry_a"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    v: Mapped[int]

b = Table("dry_b", Base.metadata, Column("id", Integer, primary_key=True, autoincrement=False),
          Column("v", Integer, nullable=False))

def setup(ctx, session):
    Base.metadata.create_all(session.connection())
    if session.query(A).count() == 0:
        session.add_all([A(id=i, v=0) for i in range(10)])
        session.execute(insert(b), [{"id": i, "v": 0} for i in range(10)])

def items(ctx, session):
    return range(10)

def process(ctx, session, item):
    session.add(A(id=100 + item, v=1))                            # ORM insert
    session.get(A, item).v += 1                                   # ORM update
    if item < 2:
        session.delete(session.get(A, 50 + item) or session.get(A, item))  # ORM delete
    session.execute(insert(b).values(id=100 + item, v=1))         # Core insert
    session.execute(update(b).where(b.c.id == item).values(v=9))  # Core update
    if item < 3:
        session.execute(delete(b).where(b.c.id == item))          # Core delete
    session.execute(text("INSERT INTO dry_b (id, v) VALUES (:i, 2)"), {"i": 200 + item})  # text
    if item == 9:
        session.add(A(id=5, v=0))                                 # duplicate key: fails
        session.flush()
'''

# Resumable: each item writes one effect row; items listed in the table
# `broken` fail until the row is deleted (the cause is "fixed").
# --param sleep=S slows each item; --param broken=1,2 fills `broken` in setup.
RESUMABLE = '''
"""A resumable job: item_key makes --resume skip committed items."""
import time
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))
    session.execute(text("CREATE TABLE IF NOT EXISTS broken (item INTEGER NOT NULL)"))
    for item in filter(None, ctx.params.get("broken", "").split(",")):
        session.execute(text("INSERT INTO broken VALUES (:i)"), {"i": int(item)})

def items(ctx, session):
    return range(int(ctx.params.get("n", 50)))

def process(ctx, session, item):
    session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})
    if session.execute(text("SELECT count(*) FROM broken WHERE item = :i"), {"i": item}).scalar():
        raise RuntimeError(f"item {item} is broken")
    time.sleep(float(ctx.params.get("sleep", 0)))

def item_key(item):
    return f"item-{item}"
'''

# The naive read-modify-write of one hot row (no lock): under READ COMMITTED
# it loses updates; jobrunner's default isolation must make that impossible.
NAIVE_COUNTER = '''
"""Increment one counter per item: read, add one, write back, no lock."""
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    if session.execute(text("SELECT count(*) FROM counter")).scalar() == 0:
        session.execute(text("INSERT INTO counter VALUES (1, 0)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 2000)))

def process(ctx, session, item):
    n = session.execute(text("SELECT n FROM counter WHERE id = 1")).scalar()
    session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
'''

# Resumable items read from a table: --param source=paged (jobrunner.paged, in
# short transactions) or source=stream (one server-side cursor, yield_per).
# Each item inserts its effect row, then sleeps --param sleep=S.
PAGED = '''
"""Items from a table, paged or streamed; each writes one effect row."""
import time
import jobrunner
from sqlalchemy import Column, Integer, MetaData, Table, select, text

metadata = MetaData()
source = Table("source", metadata, Column("id", Integer, primary_key=True))

def setup(ctx, session):
    metadata.create_all(session.connection())
    session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))
    if not session.execute(text("SELECT count(*) FROM source")).scalar():
        n = int(ctx.params.get("n", 300))
        session.execute(source.insert(), [{"id": i} for i in range(n)])

def items(ctx, session):
    if ctx.params.get("source", "paged") == "stream":
        return session.scalars(select(source.c.id).order_by(source.c.id).execution_options(yield_per=50))
    return jobrunner.paged(session, select(source.c.id), key=source.c.id, size=50)

def process(ctx, session, item):
    session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})
    time.sleep(float(ctx.params.get("sleep", 0.01)))

def item_key(item):
    return str(item)
'''

# Items in chunks (--batch-size): each writes one row with its transaction's id
# and the times it began and ended; items listed in --param poison=1,2 raise.
BATCH = '''
"""Each item writes a row recording its transaction; poisoned items raise."""
import os, time
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text(
        "CREATE TABLE IF NOT EXISTS batch_rows (item INTEGER PRIMARY KEY, tx TEXT NOT NULL, "
        "pid INTEGER NOT NULL, t0 DOUBLE PRECISION NOT NULL, t1 DOUBLE PRECISION NOT NULL)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 500)))

def transaction_id(session):
    if session.get_bind().dialect.name == "postgresql":
        return str(session.execute(text("SELECT txid_current()")).scalar())
    return "sqlite"

def process(ctx, session, item):
    t0 = time.time()
    if str(item) in ctx.params.get("poison", "").split(","):
        raise ValueError(f"item {item} is poisoned")
    time.sleep(float(ctx.params.get("sleep", 0)))
    session.execute(text("INSERT INTO batch_rows VALUES (:i, :tx, :p, :t0, :t1)"),
                    {"i": item, "tx": transaction_id(session), "p": os.getpid(), "t0": t0, "t1": time.time()})

def item_key(item):
    return str(item)
'''

# Set-based: one executemany per chunk. setup() plants a row for each item in
# --param taken=..., so inserting that item violates the primary key.
SET_BASED = '''
"""process_batch: one INSERT for the whole chunk."""
from sqlalchemy import Column, Integer, MetaData, Table, insert

metadata = MetaData()
done = Table("done_set", metadata, Column("item", Integer, primary_key=True, autoincrement=False))
BATCH_SIZE = 50

def setup(ctx, session):
    metadata.create_all(session.connection())
    for item in filter(None, ctx.params.get("taken", "").split(",")):
        session.execute(insert(done).values(item=-int(item) - 1000))  # marker rows, out of range

def items(ctx, session):
    return range(int(ctx.params.get("n", 200)))

def process_batch(ctx, session, items):
    taken = {int(i) for i in filter(None, ctx.params.get("taken", "").split(","))}
    rows = [{"item": -item - 1000 if item in taken else item} for item in items]
    session.execute(insert(done), rows)
'''

# -- async jobs -------------------------------------------------------------------
# Each item records its task and its session; prepare() awaits, and counts the
# items in flight (prepare to commit) at its start.
ASYNC_RECORD = '''
"""An async job: every item says which task and which session did it, and when."""
import asyncio, time, uuid
from sqlalchemy import text

state = {"in_flight": 0}

async def setup(ctx, session):
    await session.execute(text(
        "CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL, task VARCHAR(40) NOT NULL, "
        "sess VARCHAR(40) NOT NULL, peak INTEGER NOT NULL, t0 DOUBLE PRECISION NOT NULL, "
        "t1 DOUBLE PRECISION NOT NULL)"))

async def items(ctx, session):
    for i in range(int(ctx.params.get("n", 200))):
        yield i

def item_key(item):
    return str(item)

async def prepare(ctx, item):
    if str(item) in ctx.params.get("unprepared", "").split(","):
        raise ValueError(f"item {item} cannot be prepared")
    state["in_flight"] += 1
    peak = state["in_flight"]
    await asyncio.sleep(float(ctx.params.get("wait", 0.01)))
    return item, peak

async def process(ctx, session, value):
    item, peak = value
    try:
        if str(item) in ctx.params.get("bad", "").split(","):
            raise ValueError(f"item {item} is bad")
        tag = session.info.setdefault("tag", uuid.uuid4().hex)
        t0 = time.monotonic()
        await asyncio.sleep(float(ctx.params.get("sleep", 0)))
        await session.execute(text("INSERT INTO effects VALUES (:i, :t, :s, :p, :t0, :t1)"),
            {"i": item, "t": asyncio.current_task().get_name(), "s": tag, "p": peak, "t0": t0,
             "t1": time.monotonic()})
    finally:
        state["in_flight"] -= 1
'''

ASYNC_PAIRS = '''
"""An async job whose items each write two rows, awaiting between them."""
import asyncio, os, time
from sqlalchemy import text

async def setup(ctx, session):
    await session.execute(text(
        "CREATE TABLE IF NOT EXISTS pairs (item INTEGER NOT NULL, part INTEGER NOT NULL, "
        "pid INTEGER NOT NULL, t0 DOUBLE PRECISION NOT NULL, t1 DOUBLE PRECISION NOT NULL)"))

async def items(ctx, session):
    return (i for i in range(int(ctx.params.get("n", 20))))  # no len(): count() says

async def count(ctx, session):
    n = int(ctx.params.get("n", 20))
    return (await session.execute(text("SELECT CAST(:n AS INTEGER)"), {"n": n})).scalar()

def item_key(item):
    return str(item)

async def process(ctx, session, item):
    t0 = time.time()
    await session.execute(text("INSERT INTO pairs VALUES (:i, 1, :p, :t0, :t0)"),
                          {"i": item, "p": os.getpid(), "t0": t0})
    if ctx.params.get("block") == str(item):
        time.sleep(1.5)  # the mistake the run must name: a blocking call in async def
    await asyncio.sleep(float(ctx.params.get("sleep", 0.1)))
    t1 = time.time()
    await session.execute(text("INSERT INTO pairs VALUES (:i, 2, :p, :t0, :t1)"),
                          {"i": item, "p": os.getpid(), "t0": t0, "t1": t1})
'''

ASYNC_PAGED = '''
"""An async job reading its items with jobrunner.paged; each writes one effect row."""
import asyncio
import jobrunner
from sqlalchemy import Column, Integer, MetaData, Table, select, text

metadata = MetaData()
source = Table("source", metadata, Column("id", Integer, primary_key=True))

async def setup(ctx, session):
    await session.run_sync(lambda s: metadata.create_all(s.connection()))
    await session.execute(text("CREATE TABLE IF NOT EXISTS effects (item INTEGER NOT NULL)"))
    if not (await session.execute(text("SELECT count(*) FROM source"))).scalar():
        n = int(ctx.params.get("n", 300))
        await session.execute(source.insert(), [{"id": i} for i in range(n)])

async def items(ctx, session):
    async for key in jobrunner.paged(session, select(source.c.id), key=source.c.id, size=50):
        yield key

async def process(ctx, session, item):
    await session.execute(text("INSERT INTO effects VALUES (:i)"), {"i": item})
    await asyncio.sleep(float(ctx.params.get("sleep", 0.01)))

def item_key(item):
    return str(item)
'''

# Read-modify-write of one hot row at the database's safe default isolation:
# the losers of each race get a serialization failure or a deadlock, retried.
ASYNC_COUNTER = '''
"""Increment one counter per item, reading it first (async)."""
import asyncio
from sqlalchemy import text

async def setup(ctx, session):
    await session.execute(
        text("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    if (await session.execute(text("SELECT count(*) FROM counter"))).scalar() == 0:
        await session.execute(text("INSERT INTO counter VALUES (1, 0)"))

async def items(ctx, session):
    return range(int(ctx.params.get("n", 200)))

async def process(ctx, session, item):
    n = (await session.execute(text("SELECT n FROM counter WHERE id = 1"))).scalar()
    await asyncio.sleep(0.002)  # let the others read the same value
    await session.execute(text("UPDATE counter SET n = :n WHERE id = 1"), {"n": n + 1})
'''
