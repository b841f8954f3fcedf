"""The threading model on its own: no database, sessions are plain tokens."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from jobrunner.executor import FanOut


class Token:
    """Stands for a session: records which threads opened, used and closed it."""

    ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(self.ids)
        self.opened_in = threading.get_ident()
        self.used_in: set[int] = set()
        self.closed_in: int | None = None


def fan_out(workers: int, work, stop: threading.Event | None = None):
    opened: list[Token] = []
    lock = threading.Lock()

    def open_session() -> Token:
        token = Token()
        with lock:
            opened.append(token)
        return token

    def close(token: Token) -> None:
        token.closed_in = threading.get_ident()

    runner = FanOut(
        workers=workers,
        open_session=open_session,
        close_session=close,
        work=work,
        stop=stop or threading.Event(),
    )
    return runner, opened


def test_each_worker_thread_owns_one_session_from_open_to_close():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(token: Token, item: int) -> None:
        token.used_in.add(threading.get_ident())
        with lock:
            seen.append((item, token.id))
        time.sleep(0.001)

    runner, opened = fan_out(4, work)
    assert runner.run(range(200)) is True
    assert sorted(item for item, _ in seen) == list(range(200))
    assert len(opened) == 4
    for token in opened:
        assert token.used_in <= {token.opened_in} and token.closed_in == token.opened_in


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_items_in_flight_stay_bounded(workers):
    state = {"produced": 0, "done": 0, "peak": 0}
    lock = threading.Lock()

    def produce():
        for i in range(500):
            with lock:
                state["produced"] += 1
                state["peak"] = max(state["peak"], state["produced"] - state["done"])
            yield i

    def work(_token, _item):
        time.sleep(0.0005)
        with lock:
            state["done"] += 1

    runner, _ = fan_out(workers, work)
    runner.run(produce())
    assert state["done"] == 500
    assert state["peak"] <= 2 * workers + 1


def test_a_failing_producer_keeps_what_it_fed():
    done = []

    def produce():
        yield from range(10)
        raise ValueError("broken generator")

    runner, _ = fan_out(2, lambda _t, item: done.append(item))
    assert runner.run(produce()) is True
    assert sorted(done) == list(range(10))
    assert isinstance(runner.producer_error, ValueError)


def test_stop_drops_queued_items_and_starts_nothing_new():
    stop = threading.Event()
    started = []

    def work(_token, item):
        started.append(item)
        if item == 5:
            stop.set()
        time.sleep(0.01)

    runner, _ = fan_out(2, work, stop)
    assert runner.run(range(10_000)) is True
    assert max(started) < 5 + 2 * 2 + 2
    assert len(started) < 20


def test_stuck_workers_are_abandoned_after_the_drain_timeout():
    stop = threading.Event()
    release = threading.Event()

    def work(_token, item):
        stop.set()
        release.wait(30)

    runner, _ = fan_out(2, work, stop)
    t0 = time.monotonic()
    assert runner.run(range(100), drain_timeout=0.3) is False
    assert time.monotonic() - t0 < 5
    release.set()
