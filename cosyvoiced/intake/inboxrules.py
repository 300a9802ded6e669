"""The drop folder's pure decisions, apart from the folder and its threads: when a file a
scan found has been still long enough to take, and what an entry that cannot be claimed
ends with. Given the file's `stat`, the error and the clocks, so that they are tested
without files or waits."""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cosyvoiced.job import ErrorCode, JobError

# Files whose times are both in the future that one scan remembers, to see at the next
# whether they changed (about 300 bytes each): more wait for a later scan.
MAX_UNDATED_REMEMBERED = 4096
# Entries of the inbox that could not be claimed, remembered so that each is logged (and,
# if refused, recorded) once, not at every scan: more are counted, in one line a scan.
MAX_UNCLAIMABLE_REMEMBERED = 1024
# Why moving an entry out of the inbox fails that is the entry's own doing: a directory
# of another user without write permission for the daemon (moving a directory rewrites
# its ".."), an immutable or append-only one (EPERM), a mount point (EBUSY).
_ENTRY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EBUSY})

_Mark = tuple[int, int, int, int]  # inode, size, mtime and ctime (ns): changed if it differs


class FileTimes(Protocol):
    """What the decisions read of a file's `os.lstat` (an `os.stat_result` is one)."""

    @property
    def st_ino(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_mtime(self) -> float: ...
    @property
    def st_ctime(self) -> float: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...


def _mark(info: FileTimes) -> _Mark:
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


@dataclass
class Stillness:
    """Whether a file found by a scan (no event said it is finished) has been still for
    the scan's quiet time, so that a writer filling it in place is left alone.

    The file's mtime says when it was last written, unless it is in the future: `cp -p`
    and `tar x` copy a future mtime from their source, so it would look written "just now"
    for ever (the file was never taken, and the folder scanned every second). Then its
    ctime, which no submitter can set (a `utime` sets it to now), says when it last
    changed. If that is in the future too, the daemon's clock was stepped back, or the
    folder is on a file server whose clock is ahead: no time can be trusted, so the file
    counts as still once it is seen unchanged (inode, size, both times) by two scans that
    began `quiet_s` apart on the daemon's own monotonic clock.
    """

    max_remembered: int = MAX_UNDATED_REMEMBERED
    # Undated files seen by the last scan (and this one): their mark, and when the scan
    # that first saw them so began (monotonic).
    _seen: dict[str, tuple[_Mark, float]] = field(default_factory=dict)
    _seeing: dict[str, tuple[_Mark, float]] = field(default_factory=dict)

    def is_still(self, name: str, info: FileTimes, wall_now: float, scan_began: float,
                 quiet_s: float) -> bool:
        """Whether `name` (its `lstat` is `info`, read at `wall_now`) is still, for the scan
        that began at `scan_began` (monotonic) and takes files still for `quiet_s`."""
        changed = info.st_mtime if info.st_mtime <= wall_now else info.st_ctime
        if changed <= wall_now:
            return wall_now - changed >= quiet_s
        mark = _mark(info)
        earlier = self._seen.get(name)
        first_seen = earlier[1] if earlier is not None and earlier[0] == mark else scan_began
        if scan_began - first_seen >= quiet_s:
            return True
        if name in self._seeing or len(self._seeing) < self.max_remembered:
            self._seeing[name] = (mark, first_seen)
        return False

    def scan_ended(self) -> None:
        """A scan is over (it looked at every name): what it saw is what the next compares
        with."""
        self._seen = self._seeing
        self._seeing = {}

    def remembered(self) -> int:
        return len(self._seen) + len(self._seeing)


def claim_refusal(mode: int, error: OSError) -> JobError | None:
    """The error an inbox entry (of `mode`, its lstat) whose claim failed with `error` ends
    with, where it is (it cannot be moved to failed/ either): a directory, device or other
    entry the daemon may not move. None when the failure is not the entry's doing (a full
    or read-only disk, a regular file whose folder the daemon may not write): it stays to
    be claimed by a later scan."""
    if stat.S_ISREG(mode) or error.errno not in _ENTRY_ERRNOS:
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    return JobError(ErrorCode.NOT_REGULAR_FILE, f"the job is {kind}, and the daemon may not "
                    f"move it out of the inbox ({error.strerror}): directories and devices "
                    "are refused; remove it")


@dataclass
class Unclaimable:
    """Inbox entries whose claim failed, by name and inode (a new entry of the name is
    tried afresh), at most `max_remembered`; whether each was refused where it is."""

    max_remembered: int = MAX_UNCLAIMABLE_REMEMBERED
    _entries: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def known(self, name: str, inode: int) -> bool:
        """Whether this entry's failure was said already (not to be said again)."""
        entry = self._entries.get(name)
        return entry is not None and entry[0] == inode

    def refused(self, name: str, inode: int) -> bool:
        """Whether this entry has its error record: it is not to be claimed again."""
        entry = self._entries.get(name)
        return entry is not None and entry == (inode, True)

    def remember(self, name: str, inode: int, *, refused: bool) -> bool:
        """Note the entry; False if there is no room (it is not remembered)."""
        if name not in self._entries and len(self._entries) >= self.max_remembered:
            return False
        self._entries[name] = (inode, refused)
        return True

    def forget_unless(self, present: Callable[[str, int], bool]) -> None:
        """Forget the entries no longer there (`present(name, inode)` is False)."""
        self._entries = {name: entry for name, entry in self._entries.items()
                         if present(name, entry[0])}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
