"""What each way of beginning a PostgreSQL transaction costs an item, on
psycopg2 alone (no SQLAlchemy, no jobrunner): one connection, one
primary-key UPDATE per transaction, on a durable server (fsync on) that
the script starts. The variants alternate in each round; medians of the
rounds, wall time and this process's CPU time per item.

    python bench/begin_cost.py                  # 3,000 items, 7 rounds
    python bench/begin_cost.py --items 5000 --rounds 9

- psycopg2, read committed: psycopg2's own BEGIN and commit() (what the
  hand-written script gets)
- psycopg2, repeatable read: the same, at jobrunner's default level
- psycopg2, repeatable read + id before COMMIT: the id read in a round trip
  of its own (jobrunner before db.own_transactions)
- BEGIN sent, repeatable read: BEGIN and COMMIT sent as statements
  (jobrunner's, when it does not ask for the id: a job with item_key)
- BEGIN sent with the id: ``BEGIN ...; SELECT txid_current()`` in one
  message (jobrunner's, for every other job)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from pgserver import PostgresServer, find_bindir  # noqa: E402
from run import reset_rows  # noqa: E402

UPDATE = "UPDATE bench_rows SET n = n + 1 WHERE id = %s"


def variants(conn: Any, items: int) -> dict[str, Callable[[], None]]:
    import psycopg2.extensions as ext

    def native(level: int, read_id: bool = False) -> Callable[[], None]:
        def run() -> None:
            conn.autocommit, conn.isolation_level = False, level
            cursor = conn.cursor()
            for i in range(1, items + 1):
                cursor.execute(UPDATE, (i,))
                if read_id:
                    cursor.execute("SELECT txid_current_if_assigned()")
                    cursor.fetchone()
                conn.commit()

        return run

    def sent(begin: str) -> Callable[[], None]:
        def run() -> None:
            conn.autocommit = True
            cursor = conn.cursor()
            for i in range(1, items + 1):
                cursor.execute(begin)
                if cursor.description:
                    cursor.fetchone()
                cursor.execute(UPDATE, (i,))
                cursor.execute("COMMIT")

        return run

    return {
        "psycopg2, read committed": native(ext.ISOLATION_LEVEL_READ_COMMITTED),
        "psycopg2, repeatable read": native(ext.ISOLATION_LEVEL_REPEATABLE_READ),
        "psycopg2, repeatable read + id before COMMIT": native(ext.ISOLATION_LEVEL_REPEATABLE_READ, True),
        "BEGIN sent, repeatable read": sent("BEGIN ISOLATION LEVEL REPEATABLE READ"),
        "BEGIN sent with the id": sent("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current()"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    import psycopg2

    server = PostgresServer(find_bindir(), durable=True)
    server.start()
    try:
        url = server.admin_url
        reset_rows(url, options.items)
        conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
        cases = variants(conn, options.items)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(options.rounds):
            for name, run in cases.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                per = 1e6 / options.items
                times[name].append(((time.perf_counter() - wall) * per, (time.process_time() - cpu) * per))
        conn.close()
    finally:
        server.stop()
    base = statistics.median(wall for wall, _ in times["psycopg2, read committed"])
    print(f"{options.items} items, median of {options.rounds} rounds, durable PostgreSQL over loopback\n")
    print("| how the transaction begins | wall us per item | x psycopg2 | client CPU us per item |")
    print("|---|---|---|---|")
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"| {name} | {wall:.0f} | {wall / base:.2f}x | {cpu:.0f} |")


if __name__ == "__main__":
    main()
