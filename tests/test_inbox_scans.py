"""Scans of the drop folder and the files they take: a file dated in the future (`cp -p`,
`tar x`, a clock stepped back, a file server whose clock is ahead) is taken once it is
still, and the folder is not scanned every second for it, or for a file rewritten again
and again."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cosyvoiced.intake.inbox import QUIET_S, InboxIntake
from cosyvoiced.intake.inboxrules import Stillness
from cosyvoiced.spool import Claimed, Spool
from tests.conftest import DaemonFactory
from tests.daemon import wait_until

TONE = {"name": "tests.engines.faulty:load"}
HOUR = 3600.0


def test_a_file_dated_in_the_future_is_taken_and_the_folder_is_not_rescanned_for_it(
        make_daemon: DaemonFactory) -> None:
    """A file found by the first scan with its mtime an hour ahead (as `cp -p` of such a
    file leaves it) looked written "just now" for ever: it was never taken, and the folder
    was scanned every second (20 getdents64 in 10 s, measured). Its ctime, which no
    submitter can set, says when it changed: it is taken, and the next scan is the
    periodic one."""
    daemon = make_daemon(engine=TONE, spool={"rescan_interval_s": HOUR})
    daemon.inbox.mkdir(parents=True)
    text = "Copied with its times kept."
    (daemon.inbox / "copied.txt").write_text(text)
    ahead = time.time() + HOUR
    os.utime(daemon.inbox / "copied.txt", (ahead, ahead))
    daemon.start()
    assert daemon.wait_done("copied.txt", timeout_s=15)["chars"] == len(text)
    scans = wait_until(lambda: daemon.log_events("inbox_scanned"), 5, "a scan's end")
    assert len(scans) <= 2, scans  # the first, and its one retry a second later
    assert scans[-1]["next_in_s"] > HOUR - 60, f"scanned again soon: {scans}"


@dataclass(frozen=True)
class Times:
    """A file's stat as a scan reads it (inboxrules.FileTimes)."""

    st_mtime: float
    st_ctime: float
    st_size: int = 10
    st_ino: int = 7

    @property
    def st_mtime_ns(self) -> int:
        return round(self.st_mtime * 1e9)

    @property
    def st_ctime_ns(self) -> int:
        return round(self.st_ctime * 1e9)


NOW = 1_800_000_000.0  # the wall clock
BEGAN = 500.0  # the monotonic clock, when a scan began


def test_a_past_mtime_is_trusted_and_a_future_one_gives_way_to_the_ctime() -> None:
    still = Stillness()
    assert still.is_still("old.txt", Times(NOW - 5, NOW - 5), NOW, BEGAN, 1.0)
    assert not still.is_still("fresh.txt", Times(NOW - 0.5, NOW - 0.5), NOW, BEGAN, 1.0)
    # cp -p: the mtime its source had, the ctime of the copy
    assert still.is_still("copied.txt", Times(NOW + HOUR, NOW - 2), NOW, BEGAN, 1.0)
    assert not still.is_still("copied-now.txt", Times(NOW + HOUR, NOW - 0.5), NOW, BEGAN, 1.0)


def test_a_file_whose_times_are_both_ahead_is_still_once_two_scans_see_it_unchanged() -> None:
    """The clock stepped back (or a file server's is ahead): no time of the file can be
    trusted, so it is still once scans that began quiet_s apart see the same file."""
    still = Stillness()
    ahead = Times(NOW + HOUR, NOW + HOUR)
    assert not still.is_still("ahead.txt", ahead, NOW, BEGAN, 1.0)
    assert not still.is_still("written.txt", ahead, NOW, BEGAN, 1.0)
    still.scan_ended()
    assert not still.is_still("ahead.txt", ahead, NOW, BEGAN + 0.5, 1.0), "too soon"
    assert not still.is_still("written.txt", replace(ahead, st_size=20), NOW, BEGAN + 0.5, 1.0)
    still.scan_ended()
    assert still.is_still("ahead.txt", ahead, NOW + 1, BEGAN + 1, 1.0)
    # written again between the scans: a quiet_s from the scan that saw it last changed
    assert not still.is_still("written.txt", replace(ahead, st_size=20, st_ino=8), NOW + 1,
                              BEGAN + 1, 1.0)
    still.scan_ended()
    assert still.is_still("written.txt", replace(ahead, st_size=20, st_ino=8), NOW + 2,
                          BEGAN + 2, 1.0)


def test_the_files_remembered_between_scans_are_bounded_and_forgotten_once_gone() -> None:
    still = Stillness(max_remembered=3)
    ahead = Times(NOW + HOUR, NOW + HOUR)
    for n in range(10):
        assert not still.is_still(f"f{n}.txt", ahead, NOW, BEGAN, 1.0)
    still.scan_ended()
    assert still.remembered() == 3
    assert [n for n in range(10)
            if still.is_still(f"f{n}.txt", ahead, NOW, BEGAN + 1, 1.0)] == [0, 1, 2]
    still.scan_ended()
    assert still.remembered() == 3  # the next three; the first three were taken
    still.scan_ended()  # a scan that did not see them: they are gone
    assert still.remembered() == 0


def test_a_file_rewritten_every_second_gets_one_quick_retry_then_the_periodic_scans(
        tmp_path: Path) -> None:
    """A file kept fresh (touched before each scan) brought the next scan forward a
    second, again and again: the folder was scanned every second for as long as it was.
    The first scan gets one retry; what is fresh then was written since the watch began
    (its close event takes it), so the next scan is the periodic one."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    fresh = spool.inbox / "fresh.txt"
    fresh.write_text("Written again and again.")
    claims: queue.SimpleQueue[Claimed] = queue.SimpleQueue()
    intake = InboxIntake(spool, claims, lambda: None)
    intake.start()
    now, gaps = 100.0, []
    try:
        for _ in range(4):
            os.utime(fresh)  # now: fresher than any quiet time
            intake.rescan_if_due(now, HOUR)
            gaps.append(intake.next_scan - now)
            now = intake.next_scan
    finally:
        intake.stop()
    assert gaps == [QUIET_S, HOUR, HOUR, HOUR], gaps
    assert claims.empty()
