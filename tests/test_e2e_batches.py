"""Several items per transaction (--batch-size), with failure isolation, and the
set-based process_batch hook: every guarantee of a batch-1 run, per chunk."""

from __future__ import annotations

import json
import signal
import time

import pytest
from helpers import finish, kill_lock_connection, query, wait_for_rows
from jobkit import BATCH, SET_BASED


def run_json(cli, *args):
    out = cli(*args, "--json")
    assert out.stdout, out.stderr
    return out, json.loads(out.stdout)


def items_once(url: str, expected: list[int]) -> None:
    rows = sorted(item for (item,) in query(url, "SELECT item FROM batch_rows"))
    assert rows == expected, f"{len(rows)} rows for {len(expected)} items"


def test_chunks_of_50_commit_each_item_once_in_few_transactions(cli, write_job, db_url):
    write_job("batch", BATCH)
    out, summary = run_json(cli, "run", "batch", "--database-url", db_url, "-w", "4", "-b", "50")
    assert out.returncode == 0, out.stderr
    assert (summary["succeeded"], summary["failed"], summary["batch_size"]) == (500, 0, 50)
    items_once(db_url, list(range(500)))
    assert 10 <= summary["commits"] <= 10 + 2 * 4
    if db_url.startswith("postgresql"):
        [(transactions,)] = query(db_url, "SELECT count(DISTINCT tx) FROM batch_rows")
        assert 10 <= transactions <= 10 + 2 * 4, f"{transactions} transactions wrote 500 items"
        assert transactions == summary["commits"]
    [row] = json.loads(cli("history", "batch", "--database-url", db_url, "--json").stdout)
    assert (row["commits"], row["batch_size"]) == (summary["commits"], 50)


def test_poisoned_items_fail_alone_and_the_rest_of_their_chunks_commit(cli, write_job, db_url):
    write_job("batch", BATCH)
    out, summary = run_json(
        cli,
        "run",
        "batch",
        "--database-url",
        db_url,
        "-b",
        "50",
        "--param",
        "poison=17,333",
        "--max-failures",
        "5",
    )
    assert out.returncode == 1
    assert (summary["succeeded"], summary["failed"]) == (498, 2)
    assert sorted(f["item"] for f in summary["failures"]) == ["17", "333"]
    assert all("ValueError: item" in f["error"] for f in summary["failures"])
    assert summary["replayed"] >= 2 and summary["replayed"] <= 2 * 50
    items_once(db_url, sorted(set(range(500)) - {17, 333}))


def test_process_batch_replays_a_failed_chunk_one_item_at_a_time(cli, write_job, db_url):
    write_job("set_based", SET_BASED)
    out, summary = run_json(cli, "run", "set_based", "--database-url", db_url, "--param", "taken=7")
    assert out.returncode == 1, out.stderr
    assert (summary["succeeded"], summary["failed"], summary["batch_size"]) == (199, 1, 50)
    failure = summary["failures"][0]
    assert failure["item"] == "7" and (
        "IntegrityError" in failure["error"] or "UniqueViolation" in failure["error"]
    )
    rows = [item for (item,) in query(db_url, "SELECT item FROM done_set WHERE item >= 0 ORDER BY item")]
    assert rows == [i for i in range(200) if i != 7], "the other 49 items of item 7's chunk must commit"


def test_max_failures_counts_items_not_chunks(cli, write_job, sqlite_url):
    write_job("batch", BATCH)
    poison = ",".join(str(i) for i in range(0, 500, 5))
    out, summary = run_json(
        cli,
        "run",
        "batch",
        "--database-url",
        sqlite_url,
        "-b",
        "50",
        "-w",
        "1",
        "--param",
        f"poison={poison}",
        "--max-failures",
        "3",
    )
    assert out.returncode == 1 and summary["status"] == "aborted"
    assert 4 <= summary["failed"] <= 10, "the limit is in items"


def test_sigkill_mid_run_then_resume_does_every_item_once(cli, spawn, write_job, db_url):
    write_job("batch", BATCH)
    victim = spawn(
        "run", "batch", "--database-url", db_url, "-b", "100", "--param", "n=3000", "--param", "sleep=0.002"
    )
    wait_for_rows(db_url, "batch_rows", minimum=300)
    victim.send_signal(signal.SIGKILL)
    finish(victim)
    out, summary = run_json(
        cli, "run", "batch", "--database-url", db_url, "-b", "100", "--param", "n=3000", "--resume"
    )
    assert out.returncode == 0, out.stderr
    assert summary["skipped"] + summary["succeeded"] == 3000
    assert summary["skipped"] % 100 == 0, "a chunk commits whole or not at all"
    items_once(db_url, list(range(3000)))


def test_sigterm_lets_the_chunk_in_flight_finish_whole(spawn, write_job, db_url):
    write_job("batch", BATCH)
    proc = spawn(
        "run",
        "batch",
        "--database-url",
        db_url,
        "-b",
        "20",
        "-w",
        "2",
        "--param",
        "n=2000",
        "--param",
        "sleep=0.01",
        "--json",
    )
    wait_for_rows(db_url, "batch_rows", minimum=40)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143, err
    summary = json.loads(out)
    [(committed,)] = query(db_url, "SELECT count(*) FROM batch_rows")
    assert committed == summary["succeeded"] and committed % 20 == 0


def test_shutdown_timeout_rolls_back_whole_chunks_and_says_how_many(spawn, write_job, db_url):
    write_job("batch", BATCH)
    proc = spawn(
        "run",
        "batch",
        "--database-url",
        db_url,
        "-b",
        "10",
        "-w",
        "2",
        "--param",
        "n=200",
        "--param",
        "sleep=1",
        "--shutdown-timeout",
        "1",
        "--json",
    )
    wait_for_rows(db_url, "jobrunner_runs")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143, err
    # Two workers, each a chunk of 10 in flight: all of it rolled back, and counted.
    assert json.loads(out)["rolled_back"] == 20
    assert query(db_url, "SELECT count(*) FROM batch_rows") == [(0,)]
    assert "rolled back" in err


@pytest.mark.postgres
def test_no_chunk_begun_before_a_lost_lock_commits(spawn, write_job, pg_url):
    write_job("batch", BATCH)
    proc = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "-b",
        "100",
        "-w",
        "2",
        "--param",
        "n=600",
        "--param",
        "sleep=0.02",
        "--heartbeat",
        "0.2",
        "--json",
    )
    wait_for_rows(pg_url, "jobrunner_runs")
    time.sleep(1.0)  # two chunks in flight, each about 2 s long
    killed_at = time.time()
    kill_lock_connection(pg_url, "batch")
    code, _out, err = finish(proc, timeout=120)
    assert code == 0, err
    stale = query(pg_url, f"SELECT count(*) FROM batch_rows WHERE t0 < {killed_at} AND t1 > {killed_at}")
    assert stale == [(0,)], "a chunk in flight when the lock was lost committed"
    items_once(pg_url, list(range(600)))


def test_dry_run_with_chunks_commits_nothing_and_counts_exactly(cli, write_job, db_url):
    write_job("batch", BATCH)
    assert cli("run", "batch", "--database-url", db_url, "--param", "n=0").returncode == 0  # the table
    out, summary = run_json(
        cli, "run", "batch", "--database-url", db_url, "-b", "100", "--dry-run", "--param", "poison=5"
    )
    assert out.returncode == 1
    assert (summary["succeeded"], summary["failed"], summary["commits"]) == (499, 1, 0)
    assert summary["changes"] == {"batch_rows": {"insert": 499, "update": 0, "delete": 0}}
    assert query(db_url, "SELECT count(*) FROM batch_rows") == [(0,)]


COUNTED = """
\"\"\"process_batch says how many items each try had; poisoned items raise.\"\"\"
from sqlalchemy import text

BATCH_SIZE = 64

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS batch_rows (item INTEGER PRIMARY KEY)"))

def items(ctx, session):
    return range(64)

def process_batch(ctx, session, items):
    with open("tries.log", "a") as log:
        log.write(f"{len(items)}\\n")
    poison = {int(i) for i in filter(None, ctx.params.get("poison", "").split(","))}
    session.execute(text("INSERT INTO batch_rows VALUES (:i)"), [{"i": i} for i in items])
    bad = poison.intersection(items)
    if bad:
        raise ValueError(f"items {sorted(bad)} are poisoned")
"""


@pytest.mark.parametrize(
    ("poison", "tries"),
    [
        ((), 1),
        ((40,), 1 + 2 * 6),  # one bad item in 64: two halves a level, six levels
        ((5, 40), 1 + 2 + 2 * 2 * 5),  # its own half each, then five levels each
        (tuple(range(64)), 127),  # every part fails: the whole binary tree
    ],
    ids=["none", "one", "two", "all"],
)
def test_a_failed_chunk_is_split_in_halves_down_to_its_bad_items(
    cli, write_job, db_url, tmp_path, poison, tries
):
    write_job("counted", COUNTED)
    out, summary = run_json(
        cli,
        "run",
        "counted",
        "--database-url",
        db_url,
        "-w",
        "1",
        "--param",
        f"poison={','.join(map(str, poison))}",
    )
    assert out.returncode == (1 if poison else 0), out.stderr
    assert (summary["succeeded"], summary["failed"]) == (64 - len(poison), len(poison))
    assert sorted(int(f["item"]) for f in summary["failures"]) == list(poison)
    items_once(db_url, [i for i in range(64) if i not in poison])
    sizes = [int(line) for line in (tmp_path / "tries.log").read_text().split()]
    assert len(sizes) == tries, sizes
    assert summary["replayed"] == (64 if poison else 0)
    assert summary["commits"] == (1 if len(poison) < 64 else 0), (
        "the good items commit in the chunk's transaction"
    )


HOT = """
\"\"\"Each item adds one to one of 64 hot counters and records itself: a chunk of 50
touches most of them, a single item one.\"\"\"
import random
import time
from sqlalchemy import text

BATCH_SIZE = 50

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS hot (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    session.execute(text("CREATE TABLE IF NOT EXISTS hot_items (item INTEGER PRIMARY KEY)"))
    for i in range(64):
        session.execute(text("INSERT INTO hot VALUES (:i, 0) ON CONFLICT DO NOTHING"), {"i": i})

def items(ctx, session):
    return range(int(ctx.params.get("n", 2000)))

def process(ctx, session, item):
    row = random.Random(item).randrange(64)  # scattered, the same in every run
    session.execute(text("UPDATE hot SET n = n + 1 WHERE id = :i"), {"i": row})
    session.execute(text("INSERT INTO hot_items VALUES (:i)"), {"i": item})
    time.sleep(0.001)
"""


@pytest.mark.postgres
def test_chunks_shrink_under_conflict_and_every_item_commits_once(cli, write_job, pg_url):
    write_job("hot", HOT)
    # Eight workers on 64 hot rows conflict at batch 1 too (about 130 retries):
    # enough retries that no single item runs out of them on a busy machine.
    out, summary = run_json(
        cli, "run", "hot", "--database-url", pg_url, "-w", "8", "--retries", "10", "--param", "n=2000"
    )
    assert out.returncode == 0, out.stderr
    assert (summary["succeeded"], summary["failed"]) == (2000, 0)
    [(total,)] = query(pg_url, "SELECT sum(n) FROM hot")
    assert total == 2000, "an update was lost or doubled"
    [(rows,)] = query(pg_url, "SELECT count(*) FROM hot_items")
    assert rows == 2000
    sizes = summary["chunk_sizes"]
    assert sizes["min"] < 50, sizes
    # A conflict halves the worker's chunk at once, so each of the 8 workers
    # spends a few chunks' worth on conflicts, not every chunk (measured: about
    # 1,450 items retried; with --fixed-batch-size about 6,000, and 2,000 replayed).
    assert summary["retried"] <= 8 * 50 * 5, summary["retried"]
    assert summary["replayed"] == 0


CROSSING = """
\"\"\"The first two chunks (items 1-4 and 5-8, one per worker) take rows 0 and 1 in
crossing orders (at -w 2): a deadlock, if each waited for the other. Each try
says which lock_timeout it ran under.\"\"\"
import time
from sqlalchemy import text

BATCH_SIZE = 4

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS crossing (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    session.execute(text("INSERT INTO crossing VALUES (0, 0), (1, 0) ON CONFLICT DO NOTHING"))

def items(ctx, session):
    return range(1, 17)

def process(ctx, session, item):
    timeout = session.execute(text("SELECT current_setting('lock_timeout')")).scalar()
    with open("tries.log", "a") as log:
        log.write(f"{item} {timeout}\\n")
    row = item % 2 if item <= 4 else (item + 1) % 2
    session.execute(text("UPDATE crossing SET n = n + 1 WHERE id = :row"), {"row": row})
    time.sleep(0.3)  # the row stays locked: the other worker's chunk meets it
"""


def deadlocks(url: str) -> int:
    [(count,)] = query(url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    return count


@pytest.mark.postgres
def test_a_chunk_waits_for_a_lock_a_bounded_time_so_that_crossing_chunks_never_deadlock(
    cli, write_job, pg_url, tmp_path
):
    """A deadlock costs the server's deadlock_timeout (a second) for the chunks
    in it and every transaction queued behind their locks, and on hot rows the
    first chunk of each worker is where it happens: a chunk of two or more
    items gives up waiting after 100 ms from the first, and is retried as a
    conflict, never failed. Single items wait as the server lets them."""
    write_job("crossing", CROSSING)
    before = deadlocks(pg_url)
    out, summary = run_json(
        cli, "run", "crossing", "--database-url", pg_url, "-w", "2", "--isolation", "read_committed"
    )
    assert out.returncode == 0, out.stderr
    assert (summary["succeeded"], summary["failed"]) == (16, 0)
    [(total,)] = query(pg_url, "SELECT sum(n) FROM crossing")
    assert total == 16, "an update was lost or doubled"
    tries = [line.split() for line in (tmp_path / "tries.log").read_text().splitlines()]
    first = {item: timeout for item, timeout in reversed(tries)}  # each item's first try
    assert first["1"] == first["5"] == "100ms", "the first chunks bound their waits"
    assert "0" in {timeout for _, timeout in tries}, (
        "the loser's items, one by one, wait as the server lets them"
    )
    assert summary["retried"] >= 4, summary  # the loser's chunk
    # The server's count is written when a backend reports its statistics:
    # by the end of the run, each of the run's connections has closed.
    time.sleep(1.0)
    assert deadlocks(pg_url) == before, "a chunk waited for the other until the server found a deadlock"


PER_ITEM_COUNTED = """
\"\"\"process() says when it runs; poisoned items raise after their insert.\"\"\"
from sqlalchemy import text

BATCH_SIZE = 64

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS batch_rows (item INTEGER PRIMARY KEY)"))

def items(ctx, session):
    return range(64)

def process(ctx, session, item):
    with open("tries.log", "a") as log:
        log.write(f"{item}\\n")
    session.execute(text("INSERT INTO batch_rows VALUES (:i)"), {"i": item})
    if str(item) in ctx.params.get("poison", "").split(","):
        raise ValueError(f"item {item} is poisoned")
"""


def test_a_chunk_whose_bad_item_is_known_is_split_around_it(cli, write_job, db_url, tmp_path):
    """process() raised for item 40: items 0-39 ran well. They run once more,
    item 40 alone, and 41-63 as the rest: no binary search over good items."""
    write_job("per_item", PER_ITEM_COUNTED)
    out, summary = run_json(
        cli, "run", "per_item", "--database-url", db_url, "-w", "1", "--param", "poison=40"
    )
    assert out.returncode == 1, out.stderr
    assert (summary["succeeded"], summary["failed"], summary["commits"]) == (63, 1, 1)
    items_once(db_url, [i for i in range(64) if i != 40])
    tries = [int(line) for line in (tmp_path / "tries.log").read_text().split()]
    assert tries == [*range(41), *range(40), 40, *range(41, 64)], tries


def test_after_a_chunk_with_a_bad_item_the_next_run_in_savepointed_groups(cli, write_job, db_url, tmp_path):
    """A trickle of bad items. The first chunk of 32 is split around its bad
    item 5 (items 0-4 run twice); from then on a chunk runs in groups of 16,
    each in a savepoint of its own, so bad item 40 costs a rerun of 32-39 (not
    of 32-39 and, for bad item 50, of 41-49 again)."""
    write_job("per_item", PER_ITEM_COUNTED)
    out, summary = run_json(
        cli, "run", "per_item", "--database-url", db_url, "-w", "1", "-b", "32",
        "--param", "poison=5,40,50", "--max-failures", "10",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert (summary["succeeded"], summary["failed"], summary["commits"]) == (61, 3, 2)
    assert sorted(int(f["item"]) for f in summary["failures"]) == [5, 40, 50]
    assert summary["replayed"] == 32 + 16 + 16, "the failed chunk, then each failed group"
    items_once(db_url, [i for i in range(64) if i not in (5, 40, 50)])
    tries = [int(line) for line in (tmp_path / "tries.log").read_text().split()]
    assert tries == [
        *range(6), *range(5), 5, *range(6, 32),  # the first chunk, whole: split around 5
        *range(32, 41), *range(32, 40), 40, *range(41, 48),  # its first group: split around 40
        *range(48, 51), 48, 49, 50, *range(51, 64),  # its second group: around 50
    ], tries  # fmt: skip
