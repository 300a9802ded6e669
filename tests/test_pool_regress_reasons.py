"""Each slot that fails to start says its own reason: its worker's error, or how it crashed.

The engine double below (named in the test's config) fails differently on each GPU."""

from __future__ import annotations

import os

import pytest

from cosyvoiced.config import EngineConfig
from cosyvoiced.policy import end_reason
from tests.conftest import DaemonFactory
from tests.daemon import wait_until
from tests.engines.faulty import ToneEngine

QUICK = {"kill_grace_s": 1.0, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3.0}
FAULTS = {"1": "CUDA out of memory on the first (a test double)",
          "2": "CUDA driver too old on the second (a test double)"}


def faults_per_gpu(config: EngineConfig) -> ToneEngine:
    """Serves on cuda:0; cuda:1 and cuda:2 cannot load, each with its own error; the
    worker on cuda:3 crashes (SIGABRT) while it loads, saying nothing."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device == "3":
        os.abort()
    if device in FAULTS:
        raise RuntimeError(FAULTS[device])
    return ToneEngine()


def test_each_failing_slot_says_its_own_reason(make_daemon: DaemonFactory) -> None:
    """The reason was one value for the whole daemon (the last EngineLoadFailed any worker
    sent): a slot's slot_failing line and STATUS= could show another slot's error, and a
    worker that crashed got a stale one. Now each slot's is its own worker's."""
    daemon = make_daemon(engine={"name": "tests.test_pool_regress_reasons:faults_per_gpu"},
                         worker=QUICK | {"devices": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"],
                                         "max_start_failures": 2})
    daemon.start()
    assert daemon.notify is not None
    notify = daemon.notify
    failing = wait_until(lambda: len(e := daemon.log_events("slot_failing")) >= 3 and e, 15,
                         "slots 1, 2 and 3 failing")
    reasons = {event["slot"]: event["reason"] for event in failing}
    assert reasons[1] == f"RuntimeError: {FAULTS['1']}"
    assert reasons[2] == f"RuntimeError: {FAULTS['2']}"
    assert reasons[3] == "the worker crashed: killed by SIGABRT (exit code -6)"
    status = wait_until(lambda: next((s for s in notify.statuses()[::-1]
                                      if "slot 3 cuda:3 failing" in s), None), 5,
                        "STATUS= naming slot 3")
    for slot in (1, 2, 3):
        assert f"slot {slot} cuda:{slot} failing to start (2 tries): {reasons[slot]}" in status
    daemon.drop("served.txt", "Slot zero serves this.")
    assert daemon.wait_done("served.txt", timeout_s=10)


@pytest.mark.parametrize(("lost_for", "exitcode", "reason"), [
    ("start_timeout", None, "engine did not load within 60 s"),
    ("exited", -9, "the worker crashed: killed by SIGKILL (exit code -9)"),
    ("exited", -99, "the worker crashed: killed by signal 99 (exit code -99)"),
    ("exited", 1, "the worker exited with code 1"),
    ("heartbeat_timeout", None, "the worker was given up on (heartbeat_timeout)"),
])
def test_a_worker_that_said_nothing_is_described_by_how_it_ended(
        lost_for: str, exitcode: int | None, reason: str) -> None:
    assert end_reason(lost_for, exitcode, 60.0) == reason
