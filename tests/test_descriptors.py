"""Out of file descriptors: a drop-folder job claimed at that moment is retried until it
can be read, never left in work/ without an outcome."""

from __future__ import annotations

from tests.conftest import DaemonFactory
from tests.daemon import free_port, out_of_descriptors, wait_until


def test_a_claim_that_fails_with_emfile_is_retried_and_served(
        make_daemon: DaemonFactory) -> None:
    port = free_port()
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         http={"listen": f"127.0.0.1:{port}", "max_connections": 5000,
                               "idle_timeout_s": 1.0})
    daemon.start()
    with out_of_descriptors(daemon, port):
        wait_until(lambda: daemon.log_events("accept_failed"), 15, "the daemon at its limit")
        daemon.drop("while-full.txt", "Dropped while the daemon had no descriptor left.")
        retry = wait_until(lambda: daemon.log_events("claim_retry"), 30, "a claim retry")
        assert "Too many open files" in retry[0]["error"]
    # The connections go (closed by their clients, or idle for 1 s): the claim succeeds.
    record = daemon.wait_done("while-full.txt")
    assert record["input"] == "while-full.txt"
    assert not daemon.log_events("claim_unreadable")
    # The record is the commit point; the work file is released just after it.
    wait_until(lambda: not any(daemon.work.iterdir()), 10, "work/ to empty")
