"""A bug in the supervisor's own tick ends the process at once, with its own exit code and a
critical log line, never a process that hangs half alive (its intakes' threads and workers
going on, SIGTERM only recorded for a tick that will never come). The job in hand is
recovered at the next start, as after any crash."""

from __future__ import annotations

from tests.conftest import DaemonFactory
from tests.daemon import process_alive, thread_fault, wait_until

EXIT_CRASHED = 5


def test_a_tick_that_raises_ends_the_daemon_and_its_workers_at_once(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"})
    marker = daemon.root / "crash-the-tick"
    fault = thread_fault("tick", COSYVOICED_TEST_TICK_CRASH=str(marker))
    daemon.start(extra_env=fault)
    text = "A job in hand when the tick breaks SLOW@3 here."
    daemon.drop("in-hand.txt", text)
    busy = wait_until(lambda: [e for e in daemon.log_events("worker_state")
                               if e.get("state") == "busy"], 30, "the job in hand")
    worker = int(busy[0]["worker_pid"])
    marker.touch()
    assert daemon.wait_exit(30) == EXIT_CRASHED
    (crashed,) = daemon.log_events("supervisor_crashed")
    assert crashed["level"] == "critical"
    assert "a test double crashed the tick" in str(crashed)
    wait_until(lambda: not process_alive(worker), 10, "the worker to die with it")
    daemon.start()  # the service manager's restart, without the fault
    daemon.wait_done("in-hand.txt")
