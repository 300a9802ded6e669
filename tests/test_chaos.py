"""Chaos: workers and the daemon itself are SIGKILLed at random while 120 jobs run."""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest

from cosyvoiced.client import Client, NoReply
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

# The 25 kills come between some 100 of the jobs (2 to 6 apart); the rest run after the last.
JOBS = 120
WORKER_KILLS = 20
DAEMON_KILLS = 5


class Outcomes:
    """How many outcome records each input has, across outbox/ and failed/. A record is
    written once (by rename) and never changes, so each is read once: the test polls this
    many times a second over every record."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._inputs: dict[Path, str] = {}

    def counts(self) -> Counter[str]:
        paths = [*self._daemon.outbox.glob("*.json"), *self._daemon.failed.glob("*.error.json")]
        for path in paths:
            if path not in self._inputs:
                try:
                    self._inputs[path] = json.loads(path.read_text())["input"]
                except (OSError, ValueError, KeyError):
                    continue  # being written right now: read again on the next call
        return Counter(self._inputs[path] for path in paths if path in self._inputs)

    def total(self) -> int:
        return sum(self.counts().values())


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
    outcomes = Outcomes(daemon)
    plan = ["worker"] * WORKER_KILLS + ["daemon"] * DAEMON_KILLS
    rng.shuffle(plan)
    for step in plan:
        done_before = outcomes.total()
        target = min(JOBS, done_before + rng.randint(2, 6))

        def progressed(target: int = target) -> bool:
            return outcomes.total() >= target

        wait_until(progressed, 120, "progress between kills")
        if step == "worker":
            kill_worker(daemon)
        else:
            daemon.kill_hard()
            daemon.start()
    wait_until(lambda: set(outcomes.counts()) >= set(names), 300, "every outcome")
    wait_until(lambda: not list(daemon.work.iterdir()), 60, "work/ to empty")
    counts = outcomes.counts()
    assert {name: n for name, n in counts.items() if n != 1} == {}, "an input ended twice"
    assert set(counts) == set(names)
    assert not [p for p in daemon.inbox.iterdir()]
    assert daemon.wait_outcome(names[7])[0] == "failed"
    # The chaos really happened: 6 daemon runs, and a fresh worker after each kill.
    assert daemon.runs == DAEMON_KILLS + 1
    starts = [e for e in daemon.log_events()
              if e["event"] == "worker_state" and e["state"] == "starting"]
    assert len(starts) >= WORKER_KILLS + DAEMON_KILLS
