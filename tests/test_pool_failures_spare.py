"""worker.spare when the spare cannot load (only one model fits): the slot serves on and
is recycled in place, a recycle is counted when a worker takes over, and a reload waiting
on the spare is still applied."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.test_pool_failures_engines import ONE_MODEL_LOCK

ENGINES = "tests.test_pool_failures_engines"
QUICK = {"kill_grace_s": 1.0, "heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 3.0,
         "max_start_failures": 2, "spare": True}


def one_model_daemon(make_daemon: DaemonFactory, tmp_path: Path, **worker: Any) -> Daemon:
    daemon = make_daemon(engine={"name": f"{ENGINES}:one_fits"}, worker=QUICK | worker)
    daemon.start(extra_env={ONE_MODEL_LOCK: str(tmp_path / "gpu.lock")})
    return daemon


def settled(client: Client) -> dict[str, Any] | None:
    """stats, once one fresh worker serves and no spare loads (no recycle under way)."""
    stats = client.stats()
    workers = stats["workers"]
    fresh = len(workers) == 1 and workers[0]["state"] == "idle" and \
        workers[0]["segments_served"] == 0
    return stats if fresh and stats["spare"] is None else None


def test_a_spare_that_cannot_load_leaves_the_slot_serving_and_recycled_in_place(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """max_jobs = 1: each spare failed to load beside the serving worker, was tried again
    at the next heartbeat and counted as a failed start: exit 3 while the worker was fine,
    and STATUS= showed recycles that never happened. Now the recycle is done in place,
    counted once done, and the daemon serves on."""
    daemon = one_model_daemon(make_daemon, tmp_path, max_jobs=1)
    assert daemon.process is not None
    with Client(daemon.endpoint) as client:
        for n in range(2):  # the old code gave up at the second lost spare
            daemon.drop(f"job{n}.txt", "One job each.")
            assert daemon.wait_done(f"job{n}.txt", timeout_s=10)
            stats = wait_until(lambda: settled(client), 10, "the recycle done")
    assert daemon.process.poll() is None, daemon.output()
    assert not daemon.log_events("worker_start_failed")
    assert len(daemon.log_events("spare_lost")) == 2
    in_place = [e for e in daemon.log_events("worker_recycle") if not e["spare"]]
    assert len(in_place) == 2  # each job's worker, after its spare was lost
    taken_over = len(in_place) + len(daemon.log_events("worker_promoted"))
    assert stats["recycles"] == {"max_jobs": taken_over}


def test_a_reload_whose_spare_cannot_load_is_applied_in_place(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """The reload request was cleared when the spare was spawned: the spare failed, and the
    old engine was still served 60 s later, with no reload error."""
    daemon = one_model_daemon(make_daemon, tmp_path)
    daemon.configure(engine={"name": f"{ENGINES}:one_fits_again"}, worker=QUICK)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("engine") == "one-fits-again"
                           for e in daemon.log_events("worker_state")), 15,
               "the reloaded engine serving")
    assert daemon.log_events("spare_lost")
    daemon.drop("after.txt", "Made by the reloaded engine.")
    assert daemon.wait_done("after.txt", timeout_s=10)
    with Client(daemon.endpoint) as client:
        stats = client.stats()
    assert stats["engine"] == "one-fits-again"
    assert stats["recycles"] == {"reload": 1}
