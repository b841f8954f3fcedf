"""The threading model and the in-memory feed on their own: no database,
sessions are plain tokens."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from jobrunner.executor import Workers
from jobrunner.feed import MIN_CAPACITY, MemoryFeed, produce


class Token:
    """Stands for a session: records which threads opened, used and closed it."""

    ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(self.ids)
        self.opened_in = threading.get_ident()
        self.used_in: set[int] = set()
        self.closed_in: int | None = None


def run_items(workers: int, work, items, *, stop: threading.Event | None = None, batch: int = 1):
    """Feed ``items`` to ``workers`` threads the way the runner does; return the
    tokens opened and the Workers (finished)."""
    stop = stop or threading.Event()
    opened: list[Token] = []
    lock = threading.Lock()

    def open_session() -> Token:
        token = Token()
        with lock:
            opened.append(token)
        return token

    def close(token: Token) -> None:
        token.closed_in = threading.get_ident()

    feed = MemoryFeed(workers * batch, stop)
    pool = Workers(
        workers=workers,
        open_session=open_session,
        close_session=close,
        take=lambda token: feed.take(token, batch),
        work=lambda token, chunk: work(token, [item for item, _ in chunk]),
    )
    pool.start()
    error = None
    try:
        produce(feed, items, accept=lambda _item: True, alive=pool.alive)
    except ValueError as failure:
        error = failure
    finally:
        feed.close(workers)
    while not pool.wait(0.1):
        pass
    return opened, error


def test_each_worker_thread_owns_one_session_from_open_to_close():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(token: Token, chunk: list[int]) -> None:
        token.used_in.add(threading.get_ident())
        with lock:
            seen.extend((item, token.id) for item in chunk)
        time.sleep(0.001)

    opened, _ = run_items(4, work, range(200))
    assert sorted(item for item, _ in seen) == list(range(200))
    assert len(opened) == 4
    for token in opened:
        assert token.used_in <= {token.opened_in} and token.closed_in == token.opened_in


@pytest.mark.parametrize(("workers", "batch"), [(1, 1), (3, 1), (8, 1), (3, 10)])
def test_items_in_flight_stay_bounded(workers, batch):
    state = {"produced": 0, "done": 0, "peak": 0}
    lock = threading.Lock()

    def produce_items():
        for i in range(500):
            with lock:
                state["produced"] += 1
                state["peak"] = max(state["peak"], state["produced"] - state["done"])
            yield i

    def work(_token, chunk):
        assert 1 <= len(chunk) <= batch
        time.sleep(0.0005)
        with lock:
            state["done"] += len(chunk)

    run_items(workers, work, produce_items(), batch=batch)
    assert state["done"] == 500
    assert state["peak"] <= 2 * max(workers * batch, MIN_CAPACITY) + 1


def test_chunks_take_what_is_ready_without_waiting_to_fill():
    sizes = []

    def slow_items():
        for i in range(6):
            time.sleep(0.05)  # one at a time: a worker must not wait for 100
            yield i

    run_items(1, lambda _t, chunk: sizes.append(len(chunk)), slow_items(), batch=100)
    assert sum(sizes) == 6 and max(sizes) < 6


def test_a_failing_producer_keeps_what_it_fed():
    done = []

    def produce_items():
        yield from range(10)
        raise ValueError("broken generator")

    _, error = run_items(2, lambda _t, chunk: done.extend(chunk), produce_items())
    assert sorted(done) == list(range(10))
    assert isinstance(error, ValueError)


def test_stop_drops_queued_items_and_starts_nothing_new():
    stop = threading.Event()
    started = []

    def work(_token, chunk):
        started.extend(chunk)
        if 5 in chunk:
            stop.set()
        time.sleep(0.01)

    run_items(2, work, range(10_000), stop=stop)
    assert max(started) < 5 + 2 * 2 + 2
    assert len(started) < 20


def test_stuck_workers_do_not_block_the_producer():
    stop = threading.Event()
    release = threading.Event()
    feed = MemoryFeed(2, stop)
    pool = Workers(
        workers=2,
        open_session=object,
        close_session=lambda _s: None,
        take=lambda s: feed.take(s, 1),
        work=lambda _s, _chunk: (stop.set(), release.wait(30)),
    )
    pool.start()
    t0 = time.monotonic()
    produce(feed, range(100), accept=lambda _i: True, alive=pool.alive)
    feed.close(2)
    assert time.monotonic() - t0 < 2, "the producer waited on stuck workers"
    assert pool.wait(0.3) is False
    release.set()
    assert pool.wait(5) is True


def test_workers_that_cannot_all_start_say_so_and_the_started_ones_can_end(monkeypatch):
    """`--workers 100000` once left ~22,000 threads waiting forever on their feed."""
    import concurrent.futures

    from jobrunner.exceptions import WorkerCrashed

    real_submit = concurrent.futures.ThreadPoolExecutor.submit
    calls = itertools.count()

    def submit(self, fn, *args, **kwargs):
        if next(calls) >= 2:
            raise RuntimeError("can't start new thread")
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", submit)
    stop = threading.Event()
    feed = MemoryFeed(4, stop)
    pool = Workers(
        workers=5,
        open_session=Token,
        close_session=lambda token: None,
        take=lambda token: feed.take(token, 1),
        work=lambda token, chunk: None,
    )
    with pytest.raises(WorkerCrashed, match="only 2 of 5 worker threads"):
        pool.start()
    assert pool.count == 2
    feed.finish(pool.count)
    assert pool.wait(5.0), "a started worker never ended"
