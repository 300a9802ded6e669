"""Drops past what the supervisor can read soon stay in the inbox: the inotify thread
claimed every file and posted it for the supervisor (200,000 drops grew it 70 -> 124 MiB,
bounded only by the disk's inodes). Now at most MAX_CLAIMS_WAITING claims wait to be
read; the rest are claimed in order as room comes, with no wait for the periodic scan."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest

from cosyvoiced.intake import inbox
from cosyvoiced.intake.inbox import MAX_CLAIMS_WAITING, MAX_HELD_NAMES, InboxIntake
from cosyvoiced.service import CLAIMS_PER_TICK, MAX_QUEUED_DROPS
from cosyvoiced.spool import Claimed, Spool
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

TONE = {"name": "tests.engines.faulty:load"}
HOUR = 3600.0
QUEUED = MAX_QUEUED_DROPS + 8  # valid jobs: all that may wait queued, and a few more
# Files that fail at once (bad JSON), behind them: more than may wait claimed and held by
# name, so that some are found only by the scan asked for once the held ones are claimed.
REFUSED = MAX_CLAIMS_WAITING + MAX_HELD_NAMES + 100


def _count(folder: Path, suffix: str = "") -> int:
    return sum(1 for name in os.listdir(folder) if name.endswith(suffix))


def _drop_all(daemon: Daemon) -> None:
    staging = daemon.root / "staging"
    staging.mkdir()
    names = [f"hi-{n:04}.txt" for n in range(QUEUED)] + \
        [f"bad-{n:04}.json" for n in range(REFUSED)]
    for name in names:
        (staging / name).write_text("{" if name.endswith(".json") else "Hi.")
    for name in names:  # in order: the oldest are claimed first
        os.rename(staging / name, daemon.inbox / name)


def test_drops_past_the_backlog_stay_in_the_inbox_and_are_all_taken_in_turn(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine=TONE, spool={"rescan_interval_s": 3600})
    daemon.start()
    daemon.drop("slow.txt", "SLOW@4 holds the only worker.")
    wait_until(lambda: [e for e in daemon.log_events("worker_state") if e["state"] == "busy"],
               10, "the slow job to start")
    _drop_all(daemon)
    wait_until(lambda: daemon.log_events("drops_left_in_inbox")
               or _count(daemon.inbox) == 0, 10, "every drop to be claimed or left")
    # The claims queue fills (the supervisor reads none: its queue of drops is full).
    wait_until(lambda: _count(daemon.work) >= 1 + MAX_QUEUED_DROPS + MAX_CLAIMS_WAITING, 10,
               "the backlog to fill")
    claimed = _count(daemon.work)
    bound = 1 + MAX_QUEUED_DROPS + MAX_CLAIMS_WAITING + CLAIMS_PER_TICK
    assert claimed <= bound, f"{claimed} of {QUEUED + REFUSED + 1} drops claimed at once"
    assert _count(daemon.inbox) >= QUEUED + REFUSED - bound
    # All taken in turn as room comes (the periodic scan is an hour away): each bad file
    # failed, the oldest first (those the scan found came last).
    wait_until(lambda: _count(daemon.failed, ".error.json") == REFUSED, 30,
               "every bad file to fail")
    assert _count(daemon.inbox) == 0
    # when each was claimed: a job id starts with its creation time in ms (job.new_job_id)
    jobs = [daemon.wait_failed(f"bad-{n:04}.json", 1)["job"][:11] for n in range(REFUSED)]
    assert jobs[:MAX_HELD_NAMES] == sorted(jobs[:MAX_HELD_NAMES]), "claimed out of order"
    assert max(jobs[:MAX_HELD_NAMES]) < min(jobs[MAX_CLAIMS_WAITING + MAX_HELD_NAMES:])


def test_drops_forgotten_past_the_held_names_are_taken_while_new_drops_keep_coming(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names past MAX_HELD_NAMES are forgotten, for a scan to find once the held ones are
    claimed. But new drops were held behind the list as it drained, so under a steady
    stream of drops (one for each the workers finish) it never emptied: the forgotten
    waited for as long as the stream lasted. Now no name is held while some are forgotten,
    and the scan that finds them waits for room where it is rather than starting over."""
    monkeypatch.setattr(inbox, "MAX_CLAIMS_WAITING", 2)
    monkeypatch.setattr(inbox, "MAX_HELD_NAMES", 4)
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    still_since = time.time() - 60  # what a scan takes at once

    def drop(name: str) -> str:
        (spool.inbox / name).write_text("Hi.")
        os.utime(spool.inbox / name, (still_since, still_since))
        return name

    early = [drop(f"early-{n:02}.txt") for n in range(10)]  # 2 claimed, 4 held, 4 forgotten
    claims: queue.SimpleQueue[Claimed] = queue.SimpleQueue()
    intake = InboxIntake(spool, claims, lambda: None)
    intake.start()
    now, taken = 100.0, []
    try:
        intake.rescan_if_due(now, HOUR)
        for n in range(30):  # a drop read, a new one dropped: the backlog stays full
            taken.append(claims.get_nowait().original_name)
            intake.take(drop(f"late-{n:02}.txt"))  # as its event would (it comes too)
            now += 0.1
            intake.rescan_if_due(now, HOUR)
        assert set(early) <= set(taken), f"never taken: {sorted(set(early) - set(taken))}"
        # The stream ends: the drops forgotten meanwhile are found by a scan at once, not
        # by the periodic one an hour away.
        for _ in range(len(early) + 30 - len(taken)):
            taken.append(claims.get_nowait().original_name)
            now += 0.1
            intake.rescan_if_due(now, HOUR)
    finally:
        intake.stop()
    assert not os.listdir(spool.inbox)
    assert sorted(taken) == sorted(early + [f"late-{n:02}.txt" for n in range(30)])
