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
    if str(item) in ctx.params.get("fail", "").split(","):
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
    return range(int(ctx.params.get("n", 20)))

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
'''

# Read-modify-write of one shared counter by every item: lost updates show.
COUNTER = '''
"""Increment one counter per item, reading it first."""
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    if session.execute(text("SELECT count(*) FROM counter")).scalar() == 0:
        session.execute(text("INSERT INTO counter VALUES (1, 0)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 200)))

def process(ctx, session, item):
    if session.bind.dialect.name == "postgresql":
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
