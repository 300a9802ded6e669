"""SIGHUP and the engine: reloaded engine settings that cannot load give way to the last
that did (the daemon serves on); a reload during the first load sends READY=1 only when
the engine is ready."""

from __future__ import annotations

import signal

from tests.conftest import DaemonFactory
from tests.daemon import wait_until
from tests.test_pool_failures_engines import OUT_OF_MEMORY

ENGINES = "tests.test_pool_failures_engines"
QUICK = {"kill_grace_s": 1.0, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3.0,
         "max_start_failures": 2}


def test_reloaded_engine_settings_that_cannot_load_give_way_to_the_last_that_did(
        make_daemon: DaemonFactory) -> None:
    """engine.name changed to one that raises (CUDA out of memory): the daemon exited 3
    4.1 s after the SIGHUP. Now the worker is started again with the last engine settings
    that loaded, the reload's error is logged and in STATUS=, and jobs are served."""
    sections = {"worker": QUICK}
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"}, **sections)
    daemon.start()
    assert daemon.process is not None
    assert daemon.notify is not None
    notify = daemon.notify
    daemon.configure(engine={"name": f"{ENGINES}:out_of_memory"}, **sections)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.log_events("reload_engine_failed"), 15, "the engine reverted")
    daemon.drop("after.txt", "Served by the engine that loaded.")
    assert daemon.wait_done("after.txt", timeout_s=15)
    assert daemon.process.poll() is None, daemon.output()
    assert not daemon.log_events("worker_start_failed")
    assert any("the engine settings failed to load" in s and OUT_OF_MEMORY in s
               for s in notify.statuses())
    loaded = [e["engine"] for e in daemon.log_events("worker_state") if "engine" in e]
    assert loaded == ["faulty", "faulty"]  # the first worker, then the one after the revert
    # One failed start of the new settings, not counted against the slot.
    assert [e["during"] for e in daemon.log_events("worker_lost")] == ["start"]


def test_a_reload_during_the_first_load_sends_ready_only_once_the_engine_is(
        make_daemon: DaemonFactory) -> None:
    """READY=1 came 0.02 s after the SIGHUP, 5.7 s before the engine was ready."""
    daemon = make_daemon(engine={"name": f"{ENGINES}:slow_load"}, worker=QUICK)
    daemon.start(wait_ready=False)
    assert daemon.notify is not None
    notify = daemon.notify
    wait_until(lambda: daemon.log_events("worker_state"), 15, "the worker starting")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: notify.seen("RELOADING=1"), 10, "RELOADING=1")
    wait_until(lambda: daemon.log_events("ready"), 15, "the engine ready")
    wait_until(lambda: notify.seen("READY=1"), 5, "READY=1")
    (reloading,) = notify.times("RELOADING=1")
    (ready,) = notify.times("READY=1")  # one, when the engine is ready: none before
    assert ready > reloading
    assert not daemon.log_events("worker_lost")
