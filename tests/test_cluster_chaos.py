"""Chaos across a cluster (issue 13): 200 jobs on three hosts while hosts are SIGKILLed.

Three daemons share one real Redis. Jobs arrive on all three drop folders (and a few through
ZeroMQ `submit`) while a seeded schedule SIGKILLs one host, sometimes two, and starts them
again on the same spool. A killed host's jobs in flight are taken over after claim_idle_s;
the jobs it received wait for it in its spool's work/ and their outcomes in Redis. At the
end every input has exactly one outcome on the host that received it, with exactly the
audio its text makes: none lost, none doubled.

A failure prints its seed and kill schedule; `COSYVOICED_CHAOS_SEED=N` replays one.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_cluster import CLAIM_IDLE_S, assert_exact_audio, host, start

JOBS = 200
HOSTS = "abc"
FIRST_BATCH = 50  # dropped before the first kill; the rest arrive between kills
STEPS = 8  # kill rounds: one host each, sometimes two (never all three)
TWO_DOWN = 0.25  # the share of rounds that kill two hosts at once
PAUSE_S = (1.5, 3.0)  # between a round's restart and the next kill
DOWN_S = (0.0, 1.0)  # how long a killed host stays down
SUBMITTED = 12  # of the jobs, sent through ZeroMQ `submit` instead of a drop folder
# Sentences that keep a job in flight a while: about 0.3 s a job on average, so that the
# jobs arrive about as fast as the three hosts serve them and each kill finds some running.
SLOW = ("SLOW@0.1 now.", "SLOW@0.3 now.", "SLOW@0.5 now.")
SLOW_SHARE = 0.5  # of the sentences
# A job taken over after a kill is often running when the next kill comes; if that host dies
# too, the job is poisoned (worker_crashed, as the issue asks). Each one must have been
# taken over at its third delivery; 0-3 were seen in a run.
MAX_CRASHED = 4
OUTCOMES_TIMEOUT_S = CLAIM_IDLE_S * 4 + 45  # the backlog, then takeovers
DEFAULT_SEED = 20260513
WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo",
         "juniper", "kelp", "lagoon", "meadow", "nimbus", "orchid", "prairie")


@dataclass(frozen=True)
class PlannedJob:
    host: str  # the host that receives it, where its outcome must be
    name: str  # the drop file's name, or the output name of a submitted job
    text: str
    submitted: bool
    step: int  # the kill round before which it arrives


def planned_jobs(rng: random.Random) -> list[PlannedJob]:
    per_round = -(-(JOBS - FIRST_BATCH) // (STEPS - 1))
    submitted = set(rng.sample(range(JOBS), SUBMITTED))
    jobs = []
    for n in range(JOBS):
        sentences = [rng.choice(SLOW) if rng.random() < SLOW_SHARE
                     else " ".join(rng.choices(WORDS, k=rng.randint(2, 6))).capitalize() + "."
                     for _ in range(rng.randint(1, 3))]
        receiver = rng.choice(HOSTS)
        suffix = "" if n in submitted else rng.choice((".txt", ".json"))
        step = 0 if n < FIRST_BATCH else 1 + (n - FIRST_BATCH) // per_round
        jobs.append(PlannedJob(receiver, f"{receiver}-{n:03d}{suffix}", " ".join(sentences),
                               n in submitted, step))
    return jobs


class Outcomes:
    """The outcome records on every host's spool, read once each (they are written by
    rename, never changed): (host, input) -> every outcome seen for it."""

    def __init__(self, hosts: dict[str, Daemon]) -> None:
        self.hosts = hosts
        self._read: dict[Path, tuple[str, str, dict[str, Any]]] = {}

    def scan(self) -> dict[tuple[str, str], list[tuple[str, dict[str, Any]]]]:
        for name, daemon in self.hosts.items():
            for kind, paths in (("done", daemon.outbox.glob("*.json")),
                                ("failed", daemon.failed.glob("*.error.json"))):
                for path in paths:
                    if path not in self._read:
                        self._read[path] = (name, kind, json.loads(path.read_text()))
        found: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
        for name, kind, record in self._read.values():
            found.setdefault((name, record["input"]), []).append((kind, record))
        return found


def host_runs(logs: dict[str, list[dict[str, Any]]], receiver: str, job_id: str) -> list[str]:
    """The runs (host/pid) whose worker started a job: its id is `receiver-id` elsewhere."""
    local = {job_id, f"{receiver}-{job_id}"}
    return sorted({f"{name}/{event['pid']}" for name, events in logs.items() for event in events
                   if event["event"] == "worker_state" and event.get("state") == "busy"
                   and event.get("job") in local})


def restart(daemon: Daemon) -> None:
    if daemon.notify is not None:
        daemon.notify.close()  # the killed run's socket; start() binds a fresh one
    start(daemon)


@pytest.mark.slow
def test_no_job_is_lost_or_doubled_while_hosts_are_killed(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    seed = int(os.environ.get("COSYVOICED_CHAOS_SEED", DEFAULT_SEED))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (COSYVOICED_CHAOS_SEED={seed} replays it)")
    began = time.monotonic()
    hosts = {name: start(host(make_daemon, redis_server, name)) for name in HOSTS}
    jobs = planned_jobs(rng)
    expected: dict[tuple[str, str], PlannedJob] = {}

    def arrive(step: int) -> None:
        for job in (j for j in jobs if j.step == step):
            daemon = hosts[job.host]
            if job.submitted:  # every host is up between rounds
                with Client(daemon.endpoint, timeout_s=30) as client:
                    job_id = client.submit(job.text, output=job.name)
                expected[job.host, f"{job_id}.json"] = job
            else:
                if job.name.endswith(".json"):
                    daemon.drop(job.name, json.dumps({"text": job.text}))
                else:
                    daemon.drop(job.name, job.text)
                expected[job.host, job.name] = job

    schedule: list[str] = []
    kills = 0
    outcomes = Outcomes(hosts)
    chaos_began = time.monotonic()
    for step in range(STEPS):
        arrive(step)
        pause = rng.uniform(*PAUSE_S)
        time.sleep(pause)  # the kill schedule: its sleeps are the only bare ones
        victims = rng.sample(HOSTS, 2 if rng.random() < TWO_DOWN else 1)
        ended = len(outcomes.scan())
        for victim in victims:
            hosts[victim].kill_hard()
        kills += len(victims)
        down = rng.uniform(*DOWN_S)
        time.sleep(down)
        for victim in victims:
            restart(hosts[victim])
        schedule.append(f"+{time.monotonic() - chaos_began:.1f}s kill {','.join(victims)} "
                        f"(after {pause:.1f} s, down {down:.1f} s; {ended} of {len(expected)} "
                        "ended)")
        print(f"round {step}: {schedule[-1]}")
    assert len(expected) == JOBS
    replay = f"seed {seed}; schedule: {'; '.join(schedule)}"

    try:
        wait_until(lambda: set(outcomes.scan()) >= set(expected), OUTCOMES_TIMEOUT_S,
                   "an outcome for every input")
    except AssertionError as error:
        missing = sorted(set(expected) - set(outcomes.scan()))
        raise AssertionError(f"{error}; missing {missing} ({replay})") from None
    wait_until(lambda: not any(any(d.work.iterdir()) for d in hosts.values()), 30,
               f"work/ to empty on every host ({replay})")
    found = Outcomes(hosts).scan()  # read afresh

    doubled = {key: [kind for kind, _ in seen] for key, seen in found.items() if len(seen) > 1}
    assert doubled == {}, f"inputs with more than one outcome ({replay})"
    assert set(found) == set(expected), f"outcomes of unknown inputs ({replay})"
    done = {key: seen[0][1] for key, seen in found.items() if seen[0][0] == "done"}
    failed = {key: seen[0][1] for key, seen in found.items() if seen[0][0] == "failed"}
    for (receiver, name), record in done.items():
        assert_exact_audio(hosts[receiver].outbox / record["file"], expected[receiver, name].text)
    assert not any(any(d.inbox.iterdir()) for d in hosts.values()), f"inbox/ left ({replay})"

    logs = {name: daemon.log_events() for name, daemon in hosts.items()}
    taken = [event for events in logs.values() for event in events
             if event["event"] == "job_taken_over"]
    deliveries: Counter[tuple[str, str]] = Counter()
    for event in taken:
        job = (event["received_by"], event["job"])
        deliveries[job] = max(deliveries[job], int(event["deliveries"]))
    for (receiver, name), record in failed.items():
        runs = host_runs(logs, receiver, record["job"])
        print(f"{record['code']}: {receiver}/{name}: {record['message']}; started by {runs}")
        # Poisoned only after its hosts died twice under it: taken over at its 3rd delivery
        # (worker_crashed), or its own host found it in hand after two of its deaths in a
        # row (daemon_crashed, the crash-safe recovery), which is the same rule seen locally.
        if record["code"] == "daemon_crashed":
            assert len([run for run in runs if run.startswith(f"{receiver}/")]) >= 2, \
                f"{name}: {record} ({replay})"
            continue
        assert record["code"] == "worker_crashed", f"{receiver}/{name}: {record} ({replay})"
        assert deliveries[receiver, record["job"]] > 2, f"{name}: {record} ({replay})"
    assert len(failed) <= MAX_CRASHED, f"too many poisoned ({replay})"

    served_by = Counter(record["served_by"] for record in done.values())
    assert set(served_by) == set(HOSTS), f"{served_by} ({replay})"
    assert taken, f"no kill left a job to take over ({replay})"
    # Redis keeps everything here (AOF, never restarted): a job taken back says otherwise.
    taken_back = Counter(event["reason"] for events in logs.values() for event in events
                         if event["event"] == "job_taken_back")
    print(f"cluster chaos: {JOBS} jobs ({SUBMITTED} submitted), {kills} kills in "
          f"{STEPS} rounds, {len(taken)} taken over, {len(failed)} worker_crashed, "
          f"taken back {dict(taken_back)}, served_by {dict(sorted(served_by.items()))}, "
          f"seed {seed}, {time.monotonic() - began:.1f} s")
