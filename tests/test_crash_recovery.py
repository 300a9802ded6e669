"""A job that takes the daemon down with it is not run a third time (the poison rule, for
the daemon itself), and the jobs around it are neither lost nor failed."""

from __future__ import annotations

import signal

from tests.conftest import DaemonFactory
from tests.daemon import wait_until

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
    assert daemon.wait_failed("deadly.txt")["code"] == "daemon_crashed"
    daemon.wait_done("waiting.txt")
