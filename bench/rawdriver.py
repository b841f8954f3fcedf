"""The driver's limit: the same UPDATEs through psycopg2 directly, one
connection per thread, no SQLAlchemy; a commit per item, or per --per items."""

import argparse
import json
import threading
import time

import psycopg2
from sqlalchemy.engine import make_url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--per", type=int, default=1, help="statements per commit")
    args = parser.parse_args()
    url = make_url(args.url)
    dsn = dict(host=url.host, port=url.port, user=url.username, dbname=url.database)
    if url.password:
        dsn["password"] = url.password
    counter = iter(range(1, args.items + 1))
    lock = threading.Lock()

    def worker(conn) -> None:
        cur = conn.cursor()
        while True:
            with lock:
                chunk = [item for item in (next(counter, None) for _ in range(args.per)) if item is not None]
            if not chunk:
                break
            for item in chunk:
                cur.execute("UPDATE bench_rows SET n = n + 1 WHERE id = %s", (item,))
            conn.commit()
        conn.close()

    connections = [psycopg2.connect(**dsn) for _ in range(args.workers)]
    threads = [threading.Thread(target=worker, args=(conn,)) for conn in connections]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"items": args.items, "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
