"""One run over several processes (and hosts), through PostgreSQL's work table:
every item exactly once, whoever dies."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers import finish, query, wait_for_rows
from jobkit import BATCH

pytestmark = pytest.mark.postgres


def kill_a_join_leader_mid_run(spawn, url: str, *, items: int, after: int) -> None:
    """A --join leader of ``items`` slow items of the BATCH job, SIGKILLed once
    ``after`` of them have committed: it leaves rows in its work table."""
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        url,
        "--join",
        "-b",
        "5",
        "--param",
        f"n={items}",
        "--param",
        "sleep=0.01",
    )
    wait_for_rows(url, "batch_rows", minimum=after)
    leader.send_signal(signal.SIGKILL)
    finish(leader)


def items_once(url: str, n: int) -> list[tuple]:
    rows = query(url, "SELECT item, pid FROM batch_rows ORDER BY item")
    assert [item for item, _ in rows] == list(range(n)), f"{len(rows)} rows for {n} items"
    return rows


PREPARED = (
    BATCH
    + """
def prepare(ctx, item):
    if str(item) in ctx.params.get("unprepared", "").split(","):
        raise ValueError(f"item {item} cannot be prepared")
    return item
"""
)


@pytest.mark.parametrize("batch", ["1", "7"])
def test_an_item_whose_prepare_raises_fails_alone_in_a_distributed_run(cli, write_job, pg_url, batch):
    """prepare() runs once its chunk is claimed, in the open transaction that
    holds the claim. An item whose prepare raised used to be settled apart:
    that found its row held (by the chunk's own transaction), left it, and
    the chunk's commit deleted it as done (200 succeeded, exit 0)."""
    write_job("batch", PREPARED)
    bad = list(range(0, 200, 10))  # at batch 1, chunks of nothing but a failure
    out = cli(
        "run", "batch", "--database-url", pg_url, "--processes", "2", "-w", "2", "-b", batch,
        "--param", "n=200", "--param", "unprepared=" + ",".join(map(str, bad)), "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["status"], summary["succeeded"], summary["failed"]) == ("failed", 180, 20)
    assert sorted(int(f["item"]) for f in summary["failures"]) == bad
    assert all("cannot be prepared" in f["error"] for f in summary["failures"]), summary["failures"]
    rows = query(pg_url, "SELECT item FROM batch_rows ORDER BY item")
    assert [item for (item,) in rows] == [i for i in range(200) if i not in bad]
    assert query(pg_url, "SELECT count(*) FROM jobrunner_work") == [(0,)]
    # A chunk of nothing but failures commits them, and none of the job's work.
    [(chunks,)] = query(pg_url, "SELECT count(DISTINCT tx) FROM batch_rows")
    assert summary["commits"] == chunks
    [run] = json.loads(cli("history", "batch", "--database-url", pg_url, "--json").stdout)
    assert (run["succeeded"], run["failed"], run["commits"]) == (180, 20, chunks)


def test_processes_share_one_run_and_each_item_is_done_once(cli, write_job, pg_url):
    write_job("batch", BATCH)
    out = cli(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--processes",
        "3",
        "-b",
        "10",
        "--param",
        "n=3000",
        "--param",
        "sleep=0.001",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"], summary["role"], summary["processes"]) == (
        3000,
        0,
        "leader",
        3,
    )
    rows = items_once(pg_url, 3000)
    assert len({pid for _, pid in rows}) >= 2, "only one process did any work"
    [run] = json.loads(cli("history", "batch", "--database-url", pg_url, "--json").stdout)
    assert run["succeeded"] == 3000 and len(run["processes"]) == 3
    assert {p["role"] for p in run["processes"]} == {"leader", "helper"}
    # Every process row, the leader's too, says how it ended.
    rows = query(pg_url, "SELECT role, status, finished_at IS NOT NULL FROM jobrunner_run_processes")
    assert sorted(rows) == [("helper", "succeeded", True)] * 2 + [("leader", "succeeded", True)], rows


def test_each_claim_takes_consecutive_items_a_batch_at_a_time(cli, write_job, pg_url):
    write_job("batch", BATCH)
    out = cli(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--processes",
        "2",
        "-b",
        "100",
        "--param",
        "n=2500",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    rows = query(pg_url, "SELECT item, tx FROM batch_rows ORDER BY item")
    assert [item for item, _ in rows] == list(range(2500))
    chunks: dict[str, list[int]] = {}
    for item, tx in rows:
        chunks.setdefault(tx, []).append(item)
    # A transaction never mixes batches. Two claims that meet in one lane can
    # split a batch between them (SKIP LOCKED sees the other's locks row by
    # row), so a few chunks may be part of a batch; numbered one by one into
    # 64 lanes, every chunk was a scatter of items from all over the run.
    assert all(len({item // 100 for item in chunk}) == 1 for chunk in chunks.values())
    whole = [chunk for chunk in chunks.values() if chunk == list(range(chunk[0], chunk[0] + 100))]
    assert len(whole) >= 20, f"{len(whole)} whole batches in {len(chunks)} transactions"
    assert json.loads(out.stdout)["commits"] == len(chunks)


def test_a_second_start_with_join_helps_the_run_in_progress(cli, spawn, write_job, pg_url, tmp_path):
    write_job("batch", BATCH)
    args = (
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--join",
        "-b",
        "5",
        "--param",
        "n=600",
        "--param",
        "sleep=0.05",  # about 7 s alone: a busy machine may take seconds to start the helper
        "--json",
    )
    leader = spawn(*args)
    wait_for_rows(pg_url, "batch_rows", minimum=20)
    helper = spawn(*args, "--log-file", "helper.log")
    helper_code, helper_out, helper_err = finish(helper)
    leader_code, leader_out, leader_err = finish(leader)
    assert (leader_code, helper_code) == (0, 0), leader_err + helper_err
    led, helped = json.loads(leader_out), json.loads(helper_out)
    assert (led["role"], helped["role"]) == ("leader", "helper") and helped["run_id"] == led["run_id"]
    assert helped["succeeded"] > 0, "the helper did nothing"
    assert led["succeeded"] == 600 and led["processes"] == 2
    rows = items_once(pg_url, 600)
    assert {pid for _, pid in rows} == {leader.pid, helper.pid}
    # One run has one pair of "run N started/ended" lines: the helper's say whose they are.
    log = (tmp_path / "helper.log").read_text()
    run = led["run_id"]
    assert f"batch: helper of run {run} started" in log and f"batch: helper of run {run} ended" in log, log
    assert f"batch: run {run} ended" not in log and "lease" not in log


def test_join_with_nothing_left_to_claim_exits_0_promptly(cli, spawn, write_job, pg_url):
    write_job("batch", BATCH)
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--join",
        "-w",
        "8",
        "-b",
        "2",
        "--param",
        "n=16",
        "--param",
        "sleep=1.5",
    )
    wait_for_rows(pg_url, "jobrunner_work", minimum=16)
    time.sleep(1)  # every item is claimed: 8 chunks of 2, each 3 s long
    t0 = time.monotonic()
    late = cli("run", "batch", "--database-url", pg_url, "--join", "--json")
    assert late.returncode == 0, late.stderr
    assert json.loads(late.stdout)["succeeded"] == 0 and time.monotonic() - t0 < 5
    assert finish(leader)[0] == 0


def test_a_helper_killed_mid_run_gives_its_items_back(spawn, write_job, pg_url):
    write_job("batch", BATCH)
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--join",
        "-b",
        "20",
        "--param",
        "n=1500",
        "--param",
        "sleep=0.005",
        "--json",
    )
    wait_for_rows(pg_url, "batch_rows", minimum=20)
    helper = spawn("run", "batch", "--database-url", pg_url, "--join", "-b", "20")
    time.sleep(1.5)
    helper.send_signal(signal.SIGKILL)
    finish(helper)
    code, out, err = finish(leader)
    assert code == 0, err
    assert json.loads(out)["succeeded"] == 1500
    items_once(pg_url, 1500)


def test_when_the_leader_dies_helpers_stop_and_resume_finishes_the_rest(cli, spawn, write_job, pg_url):
    write_job("batch", BATCH)
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--join",
        "-b",
        "5",
        "--param",
        "n=1000",
        "--param",
        "sleep=0.03",
        "--heartbeat",
        "0.2",
    )
    wait_for_rows(pg_url, "batch_rows", minimum=20)
    # Items no more than the work table's bound, so the leader has fed them all
    # before it dies, and as slow in the helper as in the leader (params are
    # per process): a fast helper could finish the run before the kill.
    helper = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--join",
        "-b",
        "5",
        "--param",
        "sleep=0.03",
        "--heartbeat",
        "0.2",
        "--json",
    )
    time.sleep(1.5)
    leader.send_signal(signal.SIGKILL)
    killed_at = time.time()
    finish(leader)
    code, out, err = finish(helper)
    assert code == 69, err
    error = json.loads(out)["error"]
    assert "the run ended under this helper" in error
    assert error.count("has no lock connection") <= 1, f"the reason twice: {error}"
    [(late,)] = query(
        pg_url, f"SELECT count(*) FROM batch_rows WHERE pid = {helper.pid} AND t1 > {killed_at + 2}"
    )
    assert late == 0, "the helper kept committing after its leader died"
    [(first,)] = query(pg_url, "SELECT min(id) FROM jobrunner_runs")
    [(committed,)] = query(pg_url, "SELECT count(*) FROM batch_rows")
    out = cli(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "-b",
        "5",
        "--param",
        "n=1000",
        "--resume",
        "--processes",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert "took over" in out.stderr and summary["skipped"] == 0
    items_once(pg_url, 1000)
    # The run that died is recorded with what it committed over both its processes.
    [(status, succeeded)] = query(pg_url, f"SELECT status, succeeded FROM jobrunner_runs WHERE id = {first}")
    assert (status, succeeded) == ("crashed", committed)


def test_no_new_run_while_a_helper_of_an_older_run_can_still_commit(cli, spawn, write_job, pg_url):
    write_job("batch", BATCH)
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--join",
        "-b",
        "5",
        "--param",
        "n=3000",
        "--param",
        "sleep=0.01",
    )
    wait_for_rows(pg_url, "batch_rows", minimum=10)
    helper = spawn("run", "batch", "--database-url", pg_url, "--join", "-b", "5", "--heartbeat", "0.2")
    wait_for_rows(pg_url, "jobrunner_run_processes", minimum=2)
    helper.send_signal(signal.SIGSTOP)  # alive, holding its helper's key, not heartbeating
    try:
        leader.send_signal(signal.SIGKILL)
        finish(leader)
        blocked = cli("run", "batch", "--database-url", pg_url)
        assert blocked.returncode == 75, blocked.stderr
        assert "helpers of an earlier run of batch can still commit" in blocked.stderr
        assert f"pid {helper.pid}" in blocked.stderr
    finally:
        helper.send_signal(signal.SIGCONT)
    assert finish(helper)[0] == 69
    done = cli("run", "batch", "--database-url", pg_url, "-b", "5", "--param", "n=3000", "--resume")
    assert done.returncode == 0, done.stderr
    items_once(pg_url, 3000)


def test_failures_are_counted_over_all_processes(cli, write_job, pg_url):
    write_job("batch", BATCH)
    out = cli(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--processes",
        "2",
        "-b",
        "10",
        "--param",
        "n=500",
        "--param",
        "poison=3,250,499",
        "--json",
    )
    assert out.returncode == 1
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (497, 3)
    assert sorted(int(f["item"]) for f in summary["failures"]) == [3, 250, 499]
    assert len(query(pg_url, "SELECT item FROM batch_rows")) == 497


UNTRAVELLED = """
class Thing:
    pass

def items(ctx, session):
    return [Thing(), 1, 2]

def process(ctx, session, item):
    raise AssertionError("nothing may be processed")
"""


def test_an_item_that_cannot_travel_is_refused_before_any_work(cli, write_job, pg_url):
    write_job("untravelled", UNTRAVELLED)
    out = cli("run", "untravelled", "--database-url", pg_url, "--processes", "2")
    assert out.returncode == 2, out.stderr
    # One line, however far the local helper got before the leader stopped the
    # run: the leader speaks for every process.
    [line] = out.stderr.strip().splitlines()
    assert "items() yielded a jobrunner_jobs.untravelled.Thing, which cannot travel" in line


LEADER_ONLY = """
import multiprocessing

if multiprocessing.parent_process() is not None:
    raise RuntimeError("this module refuses helpers")

def items(ctx, session):
    return range(40)

def process(ctx, session, item):
    pass
"""


def test_a_local_helper_that_cannot_start_says_so_in_one_line(cli, write_job, pg_url):
    write_job("leader_only", LEADER_ONLY)
    out = cli("run", "leader_only", "--database-url", pg_url, "--processes", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["succeeded"] == 40
    assert "Traceback" not in out.stderr
    [line] = [line for line in out.stderr.splitlines() if "helper pid" in line]
    assert line.startswith("jobrunner: error: helper pid ")
    assert "this module refuses helpers" in line


TYPES = """
from sqlalchemy import text
ITEMS = [1, -2.5, "text", None, True, (1, "a"), [1, [2, 3]], {"k": (1, 2), 3: None}, ((1, 2), [3])]

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS typed (i INTEGER, ok BOOLEAN)"))

def items(ctx, session):
    return list(range(len(ITEMS)))

def process(ctx, session, i):
    pass
"""


def test_items_arrive_equal_and_of_the_same_type(cli, write_job, pg_url):
    write_job(
        "typed",
        TYPES.replace("return list(range(len(ITEMS)))", "return list(ITEMS)").replace(
            "def process(ctx, session, i):\n    pass",
            "def process(ctx, session, item):\n"
            "    ok = any(item == x and type(item) is type(x) for x in ITEMS)\n"
            "    session.execute(text('INSERT INTO typed VALUES (0, :ok)'), {'ok': ok})",
        ),
    )
    out = cli("run", "typed", "--database-url", pg_url, "--processes", "2")
    assert out.returncode == 0, out.stderr
    assert query(pg_url, "SELECT count(*), bool_and(ok) FROM typed") == [(9, True)]


@pytest.mark.parametrize("flag", [["--processes", "2"], ["--join"]])
def test_sqlite_refuses_a_distributed_run(cli, write_job, sqlite_url, flag, tmp_path):
    write_job("batch", BATCH)
    out = cli("run", "batch", "--database-url", sqlite_url, *flag)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "a distributed run needs PostgreSQL" in line
    # A refused run leaves nothing behind: no database file, no lock file.
    assert not list(tmp_path.glob("*.db*")), list(tmp_path.glob("*.db*"))


def test_status_shows_the_leader_and_its_helpers(cli, spawn, write_job, pg_url):
    write_job("batch", BATCH)
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--processes",
        "2",
        "--param",
        # Far more than the test needs: SIGTERM ends it once both status calls
        # are done (seen in CI: a 400-item run ended between them).
        "n=3000",
        "--param",
        "sleep=0.05",
    )
    wait_for_rows(pg_url, "batch_rows", minimum=10)
    # The leader's workers can commit before its helper process is up on a busy machine.
    wait_for_rows(pg_url, "jobrunner_run_processes", minimum=2)
    rows = json.loads(cli("status", "--database-url", pg_url, "--json").stdout)
    [row] = [r for r in rows if r["job"] == "batch"]
    assert row["holder"]["pid"] == leader.pid and len(row["helpers"]) == 1
    human = cli("status", "--database-url", pg_url).stdout
    assert f"running (pid {leader.pid} on " in human and "1 helper" in human
    t0 = time.monotonic()
    leader.send_signal(signal.SIGTERM)
    assert finish(leader)[0] == 143
    # Its helper stops too, at once: its in-flight items take 0.05 s. (Seen:
    # the leader's workers finished before a tick saw the stop, the helper
    # was never told and did all 2,000 items fed, 28 s.)
    assert time.monotonic() - t0 < 10, "the leader's helper was not told to stop"


SLOW_IN_HELPER = '''
"""Items sleep for $JOB_SLEEP seconds; each says when it starts (a file per
process and item), and writes its row at the end."""
import os, pathlib, time
from sqlalchemy import text

def setup(ctx, session):
    session.execute(text("CREATE TABLE IF NOT EXISTS batch_rows (item INTEGER PRIMARY KEY, pid INTEGER)"))

def items(ctx, session):
    return range(int(ctx.params.get("n", 40)))

def process(ctx, session, item):
    pathlib.Path(f"started-{os.getpid()}-{item}").touch()
    time.sleep(float(os.environ["JOB_SLEEP"]))
    session.execute(text("INSERT INTO batch_rows VALUES (:i, :p)"), {"i": item, "p": os.getpid()})
'''


def test_a_join_helper_told_to_stop_honours_the_shutdown_timeout(spawn, write_job, pg_url, tmp_path):
    write_job("slowhelp", SLOW_IN_HELPER)
    args = ("run", "slowhelp", "--database-url", pg_url, "--join", "-w", "2", "--param", "n=40")
    leader = spawn(*args, env={"JOB_SLEEP": "0.3"})
    wait_for_rows(pg_url, "batch_rows", minimum=2)
    helper = spawn(*args, "--shutdown-timeout", "1", env={"JOB_SLEEP": "60"})
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(f"started-{helper.pid}-*")):
        assert time.monotonic() < deadline and helper.poll() is None, "the helper never took an item"
        time.sleep(0.05)
    helper.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code, _, err = finish(helper, timeout=30)
    took = time.monotonic() - stopped
    assert code == 143, err
    # Its items sleep for a minute: it left at the bound, not when they ended.
    assert took < 1 + 5, f"the helper took {took:.1f}s to stop"
    assert "rolled back" in err
    leader_code, _, leader_err = finish(leader)
    assert leader_code == 0, leader_err
    rows = query(pg_url, "SELECT item, pid FROM batch_rows ORDER BY item")
    assert [item for item, _ in rows] == list(range(40)), "an item was lost or done twice"
    assert helper.pid not in {pid for _, pid in rows}, "an abandoned item committed"


def test_one_bad_item_costs_one_chunks_isolation_in_a_distributed_run(cli, write_job, pg_url, pg_server_log):
    """The failed chunk keeps its claim while it isolates the bad item: its
    items are not released, claimed again by others and failed there again."""
    if pg_server_log is None:
        pytest.skip("the server's log is not ours to read")
    write_job("batch", BATCH)
    log_from = pg_server_log.stat().st_size
    out = cli(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "--processes",
        "2",
        "-w",
        "2",
        "-b",
        "500",
        "--param",
        "n=6000",
        "--param",
        "poison=1234",
        "--json",
    )
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (5999, 1)
    assert [f["item"] for f in summary["failures"]] == ["1234"]
    assert summary["replayed"] == 500, "the bad item's chunk was replayed more than once"
    # No item was retried (a retried chunk would count its 500 items), and
    # no claim was refused by another's (CI once saw 2, each an ERROR line
    # in the server's log, before claims skipped rows taken since their snapshot).
    assert summary["retried"] == 0
    assert refused_since(pg_server_log, log_from) == []
    rows = query(pg_url, "SELECT item FROM batch_rows ORDER BY item")
    assert [item for (item,) in rows] == [i for i in range(6000) if i != 1234]


def refused_since(server_log, offset: int) -> list[str]:
    """The server's "could not serialize" ERROR lines since ``offset``, each with its statement."""
    with server_log.open(errors="replace") as log:
        log.seek(offset)
        lines = log.read().splitlines()
    return [" / ".join(lines[i : i + 2]) for i, line in enumerate(lines) if "could not serialize" in line]


def test_claims_that_meet_in_a_lane_leave_no_error_in_the_servers_log(cli, write_job, pg_url, pg_server_log):
    """At batch 1, eight workers over two processes claim all the time and
    meet in their lanes: a claim that saw, in its snapshot, a row another
    claim had taken since was refused (40001, one claim in 70 to 400 as
    measured, an ERROR line each in the server's log). It skips such rows now."""
    if pg_server_log is None:
        pytest.skip("the server's log is not ours to read")
    write_job("batch", BATCH)
    log_from = pg_server_log.stat().st_size
    args = ("--processes", "2", "-w", "4", "-b", "1", "--param", "n=4000", "--json")
    out = cli("run", "batch", "--database-url", pg_url, *args)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"], summary["retried"]) == (4000, 0, 0)
    assert refused_since(pg_server_log, log_from) == []
    rows = items_once(pg_url, 4000)
    assert len({pid for _, pid in rows}) == 2, "the helper claimed nothing: no claims met"


def test_a_distributed_runs_lock_holds_no_transaction_id_and_still_excludes_row_lock_runs(
    cli, spawn, write_job, pg_url
):
    """A row lock's transaction id would hold back VACUUM of the work table for
    the whole run; the advisory lock the leader takes instead excludes a plain
    (row-lock) start all the same."""
    write_job("batch", BATCH)
    leader = spawn(
        "run", "batch", "--database-url", pg_url, "--join", "--param", "n=400", "--param", "sleep=0.05"
    )
    wait_for_rows(pg_url, "batch_rows", minimum=5)
    [(state, xid)] = query(
        pg_url,
        "SELECT state, backend_xid::text FROM pg_stat_activity "
        "WHERE application_name = 'jobrunner batch lock'",
    )
    assert state == "idle in transaction" and xid is None, (state, xid)
    plain = cli("run", "batch", "--database-url", pg_url, "--param", "n=400")
    assert plain.returncode == 75, plain.stderr
    assert "already running" in plain.stderr
    leader.kill()
    finish(leader)


def test_a_join_start_beside_a_run_that_takes_no_helpers_says_why_it_cannot_help(
    cli, spawn, write_job, pg_url
):
    write_job("batch", BATCH)
    plain = spawn("run", "batch", "--database-url", pg_url, "--param", "n=400", "--param", "sleep=0.05")
    wait_for_rows(pg_url, "batch_rows", minimum=5)
    out = cli("run", "batch", "--database-url", pg_url, "--join")
    assert out.returncode == 75, out.stderr
    assert "already running" in out.stderr and "takes no helpers" in out.stderr and "--join" in out.stderr
    plain.kill()
    finish(plain)


def test_a_helper_killed_while_it_holds_an_uncommitted_claim_gives_those_items_back(
    spawn, write_job, pg_url, tmp_path
):
    """Killed only once it provably holds a claim it has not committed: its
    process() has begun (the claim is the transaction's first statement).
    Claims committed on their own would lose these items."""
    write_job("slowhelp", SLOW_IN_HELPER)
    args = ("run", "slowhelp", "--database-url", pg_url, "--join", "-w", "2", "--param", "n=40")
    leader = spawn(*args, env={"JOB_SLEEP": "0.3"})
    wait_for_rows(pg_url, "batch_rows", minimum=2)
    helper = spawn(*args, env={"JOB_SLEEP": "60"})
    deadline = time.monotonic() + 30
    while not (held := list(tmp_path.glob(f"started-{helper.pid}-*"))):
        assert time.monotonic() < deadline and helper.poll() is None, "the helper never took an item"
        time.sleep(0.05)
    helper.send_signal(signal.SIGKILL)
    finish(helper)
    code, _, err = finish(leader)
    assert code == 0, err
    rows = dict(query(pg_url, "SELECT item, pid FROM batch_rows"))
    assert sorted(rows) == list(range(40)), "an item was lost or done twice"
    for path in held:
        item = int(path.name.rsplit("-", 1)[1])
        assert rows[item] == leader.pid, f"item {item}, claimed by the killed helper, was not redone"


def test_a_local_helper_that_dies_is_mentioned_and_its_items_are_done(cli, spawn, write_job, pg_url):
    """Said once, its items done by the others, and ``commits`` still true:
    the run counts chunks in their own transactions, not in the processes'
    checkpoints, which miss what the helper committed after its last one
    (seen: 994 commits for 1,000 chunks)."""
    write_job("batch", BATCH)
    leader = spawn(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "-P",
        "2",
        "-b",
        "5",
        "--param",
        "n=1500",
        "--param",
        "sleep=0.01",
        "--json",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            helpers = query(pg_url, "SELECT pid FROM jobrunner_run_processes WHERE role = 'helper'")
        except Exception:  # the leader has not made jobrunner's tables yet
            helpers = []
        if helpers:
            break
        assert time.monotonic() < deadline, "no local helper registered"
        time.sleep(0.1)
    [(pid,)] = helpers
    while not query(pg_url, f"SELECT 1 FROM batch_rows WHERE pid = {pid} OFFSET 20"):
        assert time.monotonic() < deadline, "the helper committed too little"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    code, out, err = finish(leader)
    assert code == 0, err
    assert f"helper pid {pid} on this host was killed by SIGKILL" in err, err
    items_once(pg_url, 1500)
    # Each row names the transaction that committed it: one per chunk committed.
    [(chunks,)] = query(pg_url, "SELECT count(DISTINCT tx) FROM batch_rows")
    assert json.loads(out)["commits"] == chunks
    [run] = json.loads(cli("history", "batch", "--database-url", pg_url, "--json").stdout)
    assert run["commits"] == chunks


def test_resuming_a_distributed_run_that_had_not_fed_everything_counts_each_item_once(
    cli, spawn, write_job, pg_url
):
    """Seen in the field: skipped 44,000 + succeeded 17,647 for a 60,000-item
    job: the items taken over from the work table were counted as skipped too."""
    write_job("batch", BATCH)
    # More items than the work table's bound (1,000): the leader dies before it has fed them all.
    kill_a_join_leader_mid_run(spawn, pg_url, items=4000, after=100)
    [(fed_all,)] = query(pg_url, "SELECT fed_all FROM jobrunner_runs")
    assert not fed_all, "the leader fed everything before it died: the test needs more items"
    out = cli(
        "run",
        "batch",
        "--database-url",
        pg_url,
        "-b",
        "5",
        "--param",
        "n=4000",
        "--resume",
        "-P",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert "took over" in out.stderr
    [(committed_before,)] = query(pg_url, "SELECT count(*) FROM jobrunner_item_keys WHERE run_id = 1")
    assert summary["skipped"] == committed_before
    assert summary["skipped"] + summary["succeeded"] == 4000, summary
    items_once(pg_url, 4000)
    assert query(pg_url, "SELECT count(*) FROM jobrunner_work") == [(0,)], "rows of a finished run stayed"


def test_no_rows_of_a_crashed_distributed_run_stay_in_the_work_table(cli, spawn, write_job, pg_url):
    """A --join run killed with rows in its work table, resumed by a plain
    start: the rows of the old run stayed in jobrunner_work for good."""
    write_job("batch", BATCH)
    kill_a_join_leader_mid_run(spawn, pg_url, items=800, after=50)
    [(left,)] = query(pg_url, "SELECT count(*) FROM jobrunner_work")
    assert left > 0, "the test needs rows left behind"
    out = cli("run", "batch", "--database-url", pg_url, "--param", "n=800", "--resume", "--json")
    assert out.returncode == 0, out.stderr
    items_once(pg_url, 800)
    assert query(pg_url, "SELECT count(*) FROM jobrunner_work") == [(0,)]
