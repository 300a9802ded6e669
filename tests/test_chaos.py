"""Chaos: workers and the daemon itself are SIGKILLed at random while 120 jobs run."""

from __future__ import annotations

import os
import random
import signal

import pytest

from cosyvoiced.client import Client, NoReply
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

# The 25 kills come between some 100 of the jobs (2 to 6 apart); the rest run after the last.
JOBS = 120
WORKER_KILLS = 20
DAEMON_KILLS = 5


def kill_worker(daemon: Daemon) -> None:
    def current_worker() -> int | None:
        try:
            with Client(daemon.endpoint, timeout_s=5, retries=0) as client:
                workers = client.stats()["workers"]
        except NoReply:
            return None
        live = [w for w in workers if w["state"] in ("idle", "busy")]
        return int(live[0]["pid"]) if live else None

    pid = wait_until(current_worker, 60, "a live worker to kill")
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_every_input_ends_exactly_once_through_chaos(make_daemon: DaemonFactory) -> None:
    rng = random.Random(20261121)
    daemon = make_daemon()
    daemon.start()
    names = []
    for n in range(JOBS):
        if n % 40 == 7:
            names.append(f"chaos-{n:03d}.json")
            daemon.drop(names[-1], '{"text": "bad", "colour": "red"}')  # a failed record
        else:
            names.append(f"chaos-{n:03d}.txt")
            daemon.drop(names[-1], f"Chaos job number {n} says hello.")
    plan = ["worker"] * WORKER_KILLS + ["daemon"] * DAEMON_KILLS
    rng.shuffle(plan)
    for step in plan:
        done_before = sum(daemon.outcome_counts().values())
        target = min(JOBS, done_before + rng.randint(2, 6))

        def progressed(target: int = target) -> bool:
            return sum(daemon.outcome_counts().values()) >= target

        wait_until(progressed, 120, "progress between kills")
        if step == "worker":
            kill_worker(daemon)
        else:
            daemon.kill_hard()
            daemon.start()
    wait_until(lambda: set(daemon.outcome_counts()) >= set(names), 300, "every outcome")
    wait_until(lambda: not list(daemon.work.iterdir()), 60, "work/ to empty")
    counts = daemon.outcome_counts()
    assert {name: n for name, n in counts.items() if n != 1} == {}, "an input ended twice"
    assert set(counts) == set(names)
    assert not [p for p in daemon.inbox.iterdir()]
    assert daemon.wait_outcome(names[7])[0] == "failed"
    # The chaos really happened: 6 daemon runs, and a fresh worker after each kill.
    assert daemon.runs == DAEMON_KILLS + 1
    starts = [e for e in daemon.log_events()
              if e["event"] == "worker_state" and e["state"] == "starting"]
    assert len(starts) >= WORKER_KILLS + DAEMON_KILLS
