"""A slot that keeps failing to start does not stop the serving slots being recycled."""

from __future__ import annotations

import pytest

from cosyvoiced.policy import may_replace
from tests.conftest import DaemonFactory
from tests.daemon import wait_until

ENGINES = "tests.test_pool_failures_engines"
QUICK = {"kill_grace_s": 1.0, "heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 3.0}


def test_the_serving_slot_is_recycled_while_another_keeps_failing(
        make_daemon: DaemonFactory) -> None:
    """cuda:1 cannot load, max_jobs = 1: slot 0 was recycled only when every other slot had
    a ready worker, so never (4 jobs on slot 0: no worker_recycle, still generation 1; a
    leaking worker grew without bound). Now it is, while slot 1 keeps failing."""
    daemon = make_daemon(engine={"name": f"{ENGINES}:gpu1_broken"},
                         worker=QUICK | {"devices": ["cuda:0", "cuda:1"], "max_jobs": 1,
                                         "max_start_failures": 2})
    daemon.start()
    assert daemon.process is not None
    # Before its first failure slot 1 counts as loading, and holds slot 0's recycle back.
    wait_until(lambda: [e for e in daemon.log_events("worker_lost") if e["slot"] == 1], 10,
               "slot 1's first failed start")
    for n in range(2):
        daemon.drop(f"job{n}.txt", "One job each.")
        assert daemon.wait_done(f"job{n}.txt", timeout_s=15)
    recycles = wait_until(lambda: len(e := daemon.log_events("worker_recycle")) >= 2 and e,
                          10, "slot 0's worker recycled after each job")
    assert [(e["slot"], e["reason"]) for e in recycles] == [(0, "max_jobs")] * 2
    ready = [e["generation"] for e in daemon.log_events("worker_state")
             if e["state"] == "idle" and e["slot"] == 0]
    assert len(set(ready)) >= 2, ready  # the generation advanced: a new worker served
    assert not [e for e in daemon.log_events("worker_state")
                if e["slot"] == 1 and e["state"] == "idle"]  # slot 1 never served
    assert daemon.process.poll() is None, daemon.output()


@pytest.mark.parametrize(("others", "allowed"), [
    ([], True),  # one slot: its recycle leaves none for one load, as it always did
    ([(True, 0), (True, 2)], True),  # every other slot serves
    ([(False, 0)], False),  # another loads (a recycle, a first start): wait for it
    ([(False, 3)], True),  # the other keeps failing: it must not hold this one back
    ([(True, 0), (False, 1), (False, 0)], False),  # one failing, one loading: wait
])
def test_a_slot_is_replaced_unless_another_is_loading(
        others: list[tuple[bool, int]], allowed: bool) -> None:
    assert may_replace(others) is allowed
