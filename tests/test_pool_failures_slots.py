"""A worker slot that cannot start does not stop the daemon while another serves; a worker
that dies just after its READY backs off and counts as a failed start."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from datetime import datetime
from typing import Any, cast

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.test_pool_failures_engines import OUT_OF_MEMORY

ENGINES = "tests.test_pool_failures_engines"
QUICK = {"kill_grace_s": 1.0, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3.0}


def seconds_between(events: list[dict[str, Any]]) -> list[float]:
    at = [datetime.fromisoformat(event["timestamp"]).timestamp() for event in events]
    return [later - earlier for earlier, later in itertools.pairwise(at)]


def _stats(daemon: Daemon) -> dict[str, Any]:
    asked = subprocess.run([sys.executable, "-m", "cosyvoiced.ctl", "--config",
                            str(daemon.config_path), "stats"],
                           capture_output=True, timeout=60, check=True)
    return cast("dict[str, Any]", json.loads(asked.stdout))


def test_a_slot_that_cannot_load_backs_off_while_the_other_serves(
        make_daemon: DaemonFactory) -> None:
    """cuda:1 cannot load the engine (on CPU: a double that fails where it sees GPU 1).
    It fails past worker.max_start_failures, backing off, said in the log, STATUS= and
    `stats`,
    while cuda:0 serves; the daemon lives (it exited 3 after 3 failures in all)."""
    daemon = make_daemon(engine={"name": f"{ENGINES}:gpu1_broken"},
                         worker=QUICK | {"devices": ["cuda:0", "cuda:1"],
                                         "max_start_failures": 2})
    daemon.start()
    assert daemon.process is not None
    assert daemon.notify is not None
    notify = daemon.notify
    # Past its limit, slot 1 is tried again, later each time; the daemon serves on.
    lost = wait_until(lambda: len(e := [x for x in daemon.log_events("worker_lost")
                                        if x["slot"] == 1]) >= 3 and e, 15,
                      "a third failed start of slot 1")
    assert daemon.process.poll() is None, daemon.output()
    assert not daemon.log_events("worker_start_failed")
    (failing,) = daemon.log_events("slot_failing")
    assert (failing["slot"], failing["device"], failing["failures"]) == (1, "cuda:1", 2)
    assert OUT_OF_MEMORY in failing["reason"]
    wait_until(lambda: any("slot 1 cuda:1 failing to start" in s and OUT_OF_MEMORY in s
                           for s in notify.statuses()), 5, "STATUS= naming slot 1")
    (shown,) = _stats(daemon)["failing_slots"]  # `stats` did not say it
    assert (shown["slot"], shown["device"]) == (1, "cuda:1")
    assert shown["tries"] >= 2
    assert OUT_OF_MEMORY in shown["error"]
    gaps = seconds_between(lost)
    assert gaps[1] > gaps[0]  # backing off
    daemon.drop("served.txt", "Slot zero serves this.")
    assert daemon.wait_done("served.txt", timeout_s=10)
    assert daemon.process.poll() is None


def test_a_worker_that_dies_just_after_its_ready_backs_off_then_gives_up(
        make_daemon: DaemonFactory) -> None:
    """It was respawned at once for good (25 times in 20 s); now each death soon after
    READY counts as a failed start: backoff, then exit 3 at worker.max_start_failures."""
    daemon = make_daemon(engine={"name": f"{ENGINES}:aborts_after_ready"},
                         worker=QUICK | {"max_start_failures": 3})
    started = time.monotonic()
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(timeout_s=20) == 3, daemon.output()
    took = time.monotonic() - started
    (fatal,) = daemon.log_events("worker_start_failed")
    assert fatal["failures"] == 3
    lost = daemon.log_events("worker_lost")
    assert [e["during"] for e in lost] == ["service"] * 3
    starting = [e for e in daemon.log_events("worker_state") if e["state"] == "starting"]
    assert len(starting) == 3
    assert took > 3.0  # 1 s, then 2 s, of backoff between the three
