"""The script users would write by hand instead of jobrunner: a
ThreadPoolExecutor, one sessionmaker, a session per worker thread, a commit
per item. The contender jobrunner is measured against."""

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import sessionmaker

STATEMENT = text("UPDATE bench_rows SET n = n + 1 WHERE id = :id")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()

    sqlite = args.url.startswith("sqlite")
    engine = create_engine(
        args.url, pool_size=args.workers + 1, max_overflow=0, connect_args={"timeout": 30} if sqlite else {}
    )
    if sqlite:  # the same safe SQLite discipline jobrunner uses

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA journal_mode = WAL")

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    factory = sessionmaker(bind=engine)
    local = threading.local()

    def work(item: int) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = factory()
        if args.sleep:
            time.sleep(args.sleep)
        try:
            session.execute(STATEMENT, {"id": item})
            session.commit()
        except Exception:
            session.rollback()
            raise

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        for future in [pool.submit(work, i) for i in range(1, args.items + 1)]:
            future.result()
    seconds = time.perf_counter() - t0
    engine.dispose()
    print(json.dumps({"items": args.items, "seconds": seconds}))


if __name__ == "__main__":
    main()
