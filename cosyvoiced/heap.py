"""The supervisor's own heap, handed back to the system after a burst.

Every message, reply and job passes through the supervisor's memory, made and freed on its
threads (the tick, the ZeroMQ thread, HTTP's and Wyoming's loops). glibc gives a heap back
to the system only from its top, so after a burst the free pages between the objects still
live stay resident for as long as nothing reuses them: 3,000 ZeroMQ clients that each sent
a long request and hung up left the supervisor 30 MiB over its start for good (117 MiB
after 5,000). To an operator that is memory that crept up and never came down. glibc's
malloc_trim hands back the free pages between live objects too.

The tick looks at the RSS at most every LOOK_INTERVAL_S and trims when it is GREW_BYTES
over the floor: the RSS at the start, or after the last trim that gave nothing back (the
growth was live, and trimming it again would give nothing either). A trim that gave pages
back leaves the floor where it was, so that a trim in the middle of a burst is followed by
another once the burst has ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cosyvoiced import logs, memory

LOOK_INTERVAL_S = 30.0
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


class HeapTrim:
    """The supervisor's trims: looked for on the tick, at most every LOOK_INTERVAL_S."""

    def __init__(self, now: float, rss: Callable[[], int] = memory.rss_bytes,
                 trim: Callable[[], bool] = memory.give_free_heap_back) -> None:
        self._rss, self._trim = rss, trim
        self._next_look = now + LOOK_INTERVAL_S
        self.floor = rss()

    def trim_if_due(self, now: float) -> None:
        if now < self._next_look:
            return
        self._next_look = now + LOOK_INTERVAL_S
        before = self._rss()
        self.floor = min(self.floor, before)
        if not trim_due(before, self.floor):
            return
        started = time.perf_counter()
        released = self._trim()
        after = self._rss()
        self.floor = next_floor(self.floor, before, after)
        log.info("heap_trimmed", rss_before=before, rss_after=after, released=released,
                 ms=round((time.perf_counter() - started) * 1000, 1))
