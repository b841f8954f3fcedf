"""The driver's limit: the same UPDATEs through psycopg2 directly, one
connection per thread, no SQLAlchemy."""

import argparse
import threading

import psycopg2
from sqlalchemy.engine import make_url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=20000)
    args = parser.parse_args()
    url = make_url(args.url)
    dsn = dict(host=url.host, port=url.port, user=url.username, dbname=url.database)
    if url.password:
        dsn["password"] = url.password
    counter = iter(range(1, args.items + 1))
    lock = threading.Lock()

    def worker() -> None:
        conn = psycopg2.connect(**dsn)
        cur = conn.cursor()
        while True:
            with lock:
                item = next(counter, None)
            if item is None:
                break
            cur.execute("UPDATE bench_rows SET n = n + 1 WHERE id = %s", (item,))
            conn.commit()
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
