"""A job that takes the daemon down with it is not run a third time (the poison rule, for
the daemon itself), and the jobs around it are neither lost nor failed."""

from __future__ import annotations

import signal
from functools import partial

from cosyvoiced.client import Client
from cosyvoiced.job import new_job_id
from cosyvoiced.spool import Claimed
from tests.conftest import DaemonFactory
from tests.daemon import thread_fault, wait_until

FAULTY = "tests.engines.faulty:load"


def test_a_job_that_kills_the_daemon_twice_fails_as_daemon_crashed(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": FAULTY}, worker={"heartbeat_interval_s": 0.5},
                         spool={"rescan_interval_s": 1.0})
    daemon.start()
    daemon.drop("before.txt", "A normal job first.")
    daemon.wait_done("before.txt")
    daemon.drop("deadly.txt", "This text KILL_DAEMON takes the service down.")
    assert daemon.wait_exit(60) == -signal.SIGKILL  # as systemd would see a segfault
    assert any(daemon.work.glob("*deadly.txt")), "the job stays in work/ for the restart"

    daemon.start(wait_ready=False)  # systemd's Restart=: recovered, it kills it again
    assert daemon.wait_exit(60) == -signal.SIGKILL

    daemon.drop("after.txt", "A normal job after the deadly one.")
    daemon.start()  # the third life: the job is failed, not run
    record = daemon.wait_failed("deadly.txt")
    assert record["code"] == "daemon_crashed"
    assert "2 times" in record["message"]
    daemon.wait_done("after.txt")
    assert daemon.process is not None
    assert daemon.process.poll() is None, "the third life goes on"
    # The record is the commit point; the work file and attempt count go just after it.
    wait_until(lambda: not any(daemon.work.iterdir()), 10, "work/ to empty")
    wait_until(lambda: not any((daemon.spool / "attempts").iterdir()), 10, "attempts/ to empty")
    assert [e["job"] for e in daemon.log_events("daemon_crashed_on_job")]


def test_a_job_queued_behind_during_the_crashes_still_runs(make_daemon: DaemonFactory) -> None:
    """Only the job in hand counts a crash: the ones waiting their turn are run."""
    daemon = make_daemon(engine={"name": FAULTY}, worker={"heartbeat_interval_s": 0.5})
    daemon.start()
    daemon.drop("deadly.txt", "SLOW@1 then KILL_DAEMON.")
    daemon.drop("waiting.txt", "I wait for my turn.")
    assert daemon.wait_exit(60) == -signal.SIGKILL
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(60) == -signal.SIGKILL
    daemon.start()
    assert daemon.wait_failed("deadly.txt", 60)["code"] == "daemon_crashed"
    daemon.wait_done("waiting.txt")


BACKLOG = 300  # jobs ahead of it in work/: more than are queued at once (256)


def test_a_job_that_ended_just_before_a_crash_is_not_run_again_by_a_stop_during_recovery(
        make_daemon: DaemonFactory) -> None:
    """A crash between a job's record (the commit point) and the release of its file leaves
    the file in work/; the next start finds the record and only cleans up. But a stop that
    came while the jobs a crash left were still being admitted handed this one back to the
    inbox unchecked, and the start after ran it again: two results for one input. The
    jobs a crash left stay in work/ now, for the next start to check."""
    daemon = make_daemon(engine={"name": FAULTY})
    fault = thread_fault("commit", COSYVOICED_TEST_COMMIT_CRASH="ended-at-the-crash.json")
    daemon.start(extra_env=fault)
    # Jobs the same crash leaves in work/ (a daemon reads work/ only at its start), older
    # than the one that ends: they are admitted again before it, and fill the queue.
    for n in range(BACKLOG):
        left = Claimed.named(new_job_id(), f"backlog-{n:03}.txt")
        (daemon.work / left.work_name).write_text("A job SLOW@0.05 left by the crash.")
    with Client(daemon.endpoint) as client:
        client.submit("It ends just before the crash.", output="ended-at-the-crash")
    assert daemon.wait_exit(60) == -signal.SIGKILL
    assert (daemon.outbox / "ended-at-the-crash.json").exists()
    assert len(list(daemon.work.iterdir())) == BACKLOG + 1

    daemon.start()  # recovering, and a stop at once, while the jobs left are admitted
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    daemon.start()
    wait_until(lambda: not any(daemon.work.iterdir()) and not any(daemon.inbox.iterdir()),
               120, "every job to end")
    records = [p.name for p in daemon.outbox.glob("ended-at-the-crash*.json")]
    assert records == ["ended-at-the-crash.json"], records
    assert set(daemon.outcome_counts().values()) == {1}


AHEAD = 40  # jobs left in work/ before the deadly one: it waits its turn behind them


def test_a_job_that_crashed_the_daemon_keeps_its_count_through_a_stop_before_it_ran_again(
        make_daemon: DaemonFactory) -> None:
    """A job recovered after it took the daemon down, queued, then released by a stop
    before its turn came, went back to the inbox with its count of crashes cleared: it was
    a new job at the next start, and took the daemon down twice more. It stays in work/,
    its count with it."""
    daemon = make_daemon(engine={"name": FAULTY}, worker={"heartbeat_interval_s": 0.5})
    daemon.start()
    for n in range(AHEAD):  # older than the deadly job: recovered and queued before it
        ahead = Claimed.named(new_job_id(), f"ahead-{n:02}.txt")
        (daemon.work / ahead.work_name).write_text("A job SLOW@0.5 left by the crash.")
    daemon.drop("deadly.txt", "This text KILL_DAEMON takes the service down.")
    assert daemon.wait_exit(60) == -signal.SIGKILL
    deadly = next(Claimed(p.name) for p in daemon.work.glob("*deadly.txt")).job_id

    daemon.start()  # recovered and queued behind the others; a stop before its turn
    wait_until(lambda: len([e for e in daemon.log_events("job_queued") if e["job"] == deadly])
               == 2, 60, "the deadly job to be queued again")  # (the log goes on from life 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    assert "deadly.txt" not in daemon.outcome_counts(), "it never ran in that life"

    daemon.start(wait_ready=False)  # its second crash
    assert daemon.wait_exit(60) == -signal.SIGKILL
    daemon.start()
    assert daemon.wait_failed("deadly.txt", 60)["code"] == "daemon_crashed"


def test_stops_that_abandon_a_job_in_progress_do_not_count_as_crashes(
        make_daemon: DaemonFactory) -> None:
    """A stop abandons the job in progress at worker.drain_timeout_s: that start of it was
    no crash. Counted as one, two restarts during a long job failed it as daemon_crashed."""
    daemon = make_daemon(engine={"name": FAULTY},
                         worker={"drain_timeout_s": 0.5, "heartbeat_interval_s": 0.5})
    daemon.start()
    daemon.drop("long.txt", "SLOW@3 first. SLOW@3 second.")
    def started(times: int) -> bool:
        return len([e for e in daemon.log_events("worker_state")
                    if e["state"] == "busy"]) >= times

    for life in range(1, 3):
        wait_until(partial(started, life), 30, "the job to start")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(60) == 0
        daemon.start()
    assert daemon.wait_done("long.txt", 60)
    assert not daemon.log_events("daemon_crashed_on_job")
