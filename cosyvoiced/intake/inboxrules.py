"""The drop folder's pure decisions, apart from the folder and its threads: when a file a
scan found has been still long enough to take. Given the file's `stat` and the clocks, so
that they are tested without files or waits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# Files whose times are both in the future that one scan remembers, to see at the next
# whether they changed (about 300 bytes each): more wait for a later scan.
MAX_UNDATED_REMEMBERED = 4096

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

    def scan_ended(self, *, whole: bool) -> None:
        """A scan is over: what it saw is what the next compares with. One cut short (not
        `whole`) did not look at every name, so what earlier scans saw is kept too."""
        if whole:
            self._seen = self._seeing
        else:
            kept = dict(list(self._seen.items())[:max(0, self.max_remembered
                                                      - len(self._seeing))])
            self._seen = kept | self._seeing
        self._seeing = {}

    def remembered(self) -> int:
        return len(self._seen) + len(self._seeing)
