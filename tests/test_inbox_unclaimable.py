"""Inbox entries the daemon cannot claim: a submitter's directory the daemon's user may not
move (moving a directory needs write permission on it) was never failed, and was logged
as `claim_failed` at every scan, for ever: N such directories, N lines a scan. Each now
gets its `not_regular_file` record in failed/, where it is, once.

The tests run as root, which may move any directory: `chattr +i` makes one immovable
(EPERM), as the reviewer measured it; where the file system has no such flag, the
end-to-end test is skipped and the decision is tested alone."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cosyvoiced.intake.inboxrules import Unclaimable, claim_refusal
from cosyvoiced.job import ErrorCode
from tests.conftest import DaemonFactory
from tests.daemon import wait_until

TONE = {"name": "tests.engines.faulty:load"}
STUCK = ("stuck-a", "stuck-b", "stuck-c.txt")


def _chattr(flag: str, *paths: Path) -> bool:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True,
                          check=False).returncode == 0


@pytest.fixture
def immovable(tmp_path: Path) -> Iterator[list[Path]]:
    """Directories made immovable (EPERM, root or not) as they are placed in the list;
    made movable again at the end, so that the test's folder can be removed."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if not _chattr("+i", probe):
        pytest.skip("chattr +i is not supported here (an immovable directory is needed)")
    _chattr("-i", probe)
    made: list[Path] = []
    yield made
    _chattr("-i", *made)


def test_a_directory_that_cannot_be_moved_gets_its_record_once(
        make_daemon: DaemonFactory, immovable: list[Path]) -> None:
    daemon = make_daemon(engine=TONE, spool={"rescan_interval_s": 1})
    daemon.inbox.mkdir(parents=True)
    for name in STUCK:
        (daemon.inbox / name).mkdir()
        immovable.append(daemon.inbox / name)
        assert _chattr("+i", daemon.inbox / name)
    daemon.start()
    records = {name: daemon.wait_failed(name, 10) for name in STUCK}
    assert {record["code"] for record in records.values()} == {"not_regular_file"}
    assert "may not move it" in records["stuck-a"]["message"], records
    # Scans go on every second: each entry was said once, not at each of them.
    wait_until(lambda: len(daemon.log_events("inbox_scanned")) >= 4, 10, "4 scans")
    rejected = [e["input"] for e in daemon.log_events("job_rejected")]
    assert sorted(rejected) == sorted(ascii(name) for name in STUCK), rejected
    assert not daemon.log_events("claim_failed")
    assert sorted(os.listdir(daemon.failed)) == sorted(f"{name}.error.json" for name in STUCK)
    assert all((daemon.inbox / name).is_dir() for name in STUCK), "left where they are"
    daemon.drop("after.txt", "Served beside them.")
    daemon.wait_done("after.txt")


def _refused(mode: int, code: int) -> ErrorCode | None:
    refusal = claim_refusal(mode, OSError(code, os.strerror(code)))
    return None if refusal is None else refusal.code


def test_only_an_entry_the_daemon_may_not_move_is_refused_where_it_is() -> None:
    directory, fifo, file = stat.S_IFDIR | 0o750, stat.S_IFIFO | 0o644, stat.S_IFREG | 0o644
    for mode in (directory, fifo):
        for code in (errno.EACCES, errno.EPERM, errno.EBUSY):
            assert _refused(mode, code) == ErrorCode.NOT_REGULAR_FILE
    # The disk's doing, or a file's (the inbox not writable): tried again by later scans.
    for code in (errno.ENOSPC, errno.EROFS, errno.EIO, errno.ENOMEM):
        assert _refused(directory, code) is None
    assert _refused(file, errno.EACCES) is None


def test_unclaimable_entries_are_remembered_by_inode_within_a_bound() -> None:
    entries = Unclaimable(max_remembered=2)
    assert entries.remember("a", 1, refused=True)
    assert entries.remember("b", 2, refused=False)
    assert not entries.remember("c", 3, refused=True), "over the bound"
    assert entries.known("a", 1)
    assert entries.refused("a", 1)
    assert entries.known("b", 2)
    assert not entries.refused("b", 2)
    assert not entries.known("a", 9), "a new entry of the name is tried afresh"
    entries.forget_unless(lambda name, inode: name == "b")
    assert "a" not in entries
    assert len(entries) == 1
    assert entries.remember("c", 3, refused=True)
