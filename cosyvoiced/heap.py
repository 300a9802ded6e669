"""The supervisor's own heap, handed back to the system after a burst.

Every message, reply and job passes through the supervisor's memory, made and freed on its
threads (the tick, the ZeroMQ thread, HTTP's and Wyoming's loops). glibc gives a heap back
to the system only from its top, so after a burst the free pages between the objects still
live stay resident for as long as nothing reuses them: 3,000 ZeroMQ clients that each sent
a long request and hung up left the supervisor 30 MiB over its start for good (117 MiB
after 5,000). To an operator that is memory that crept up and never came down. glibc's
malloc_trim hands back the free pages between live objects too.

The tick looks at the heap's resident size (`memory.heap_bytes`: the RSS less the pages
of files it maps, such as a long result's audio read from the spool's disk, which no trim
gives back) at most every LOOK_INTERVAL_S and trims when it is GREW_BYTES over the floor:
the size at the start, or after the last trim that gave nothing back (the growth was
live, and trimming it again would give nothing either). A trim that gave pages
back leaves the floor where it was, so that a trim in the middle of a burst is followed by
another once the burst has ended. A trim that leaves the process still GREW_BYTES over its
floor (memory that stays live, with a little freed beside it: a daemon that serves for
weeks holds more than at its start) doubles the wait for the next look, up to
LONGEST_LOOK_S, so that it is not trimmed, and logged, every 30 s for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cosyvoiced import logs, memory

LOOK_INTERVAL_S = 30.0
LONGEST_LOOK_S = 600.0
GREW_BYTES = 16 << 20  # over the floor: worth a trim
GAVE_NOTHING_BYTES = 1 << 20  # a trim that gave back less found only live memory

log = logs.get_logger("cosyvoiced.heap")


def trim_due(rss_bytes: int, floor_bytes: int) -> bool:
    """Whether a trim is worth its time: the process is GREW_BYTES over its floor."""
    return rss_bytes - floor_bytes >= GREW_BYTES


def next_floor(floor_bytes: int, before_bytes: int, after_bytes: int) -> int:
    """The floor after a trim from `before_bytes` to `after_bytes`: raised to what is
    left when the trim gave (almost) nothing back, else kept."""
    return after_bytes if before_bytes - after_bytes < GAVE_NOTHING_BYTES else floor_bytes


def next_look_s(last_look_s: float, after_bytes: int, floor_bytes: int) -> float:
    """The wait for the next look after a trim that left `after_bytes`: LOOK_INTERVAL_S
    once the process is back within GREW_BYTES of its floor, else twice the last wait."""
    if after_bytes - floor_bytes < GREW_BYTES:
        return LOOK_INTERVAL_S
    return min(2 * last_look_s, LONGEST_LOOK_S)


class HeapTrim:
    """The supervisor's trims: looked for on the tick, at most every LOOK_INTERVAL_S (or
    longer, while trims find memory that stays live)."""

    def __init__(self, now: float, rss: Callable[[], int] = memory.heap_bytes,
                 trim: Callable[[], bool] = memory.give_free_heap_back) -> None:
        self._rss, self._trim = rss, trim
        self._look_s = LOOK_INTERVAL_S
        self._next_look = now + self._look_s
        self.floor = rss()

    def trim_if_due(self, now: float) -> None:
        if now < self._next_look:
            return
        before = self._rss()
        self.floor = min(self.floor, before)
        if not trim_due(before, self.floor):
            self._look_s = LOOK_INTERVAL_S
            self._next_look = now + self._look_s
            return
        started = time.perf_counter()
        released = self._trim()
        after = self._rss()
        self.floor = next_floor(self.floor, before, after)
        self._look_s = next_look_s(self._look_s, after, self.floor)
        self._next_look = now + self._look_s
        log.info("heap_trimmed", rss_before=before, rss_after=after, released=released,
                 ms=round((time.perf_counter() - started) * 1000, 1))
