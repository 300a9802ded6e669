"""The supervisor's own heap, handed back to the system after a burst.

Every message, reply and job passes through the supervisor's memory, made and freed on its
threads (the tick, the ZeroMQ thread, HTTP's and Wyoming's loops). glibc gives a heap back
to the system only from its top, so after a burst the free pages between the objects still
live stay resident for as long as nothing reuses them: MEASURED for an idle daemon after a
burst. To an operator that is memory that crept up and never came down. glibc's
malloc_trim hands back the free pages between live objects too; the tick calls it at most
every TRIM_INTERVAL_S (`trim_due`), and only after the tick has seen the heap grow since the
last trim, since an idle daemon has nothing to hand back.
"""

from __future__ import annotations

import time

from cosyvoiced import logs, memory

TRIM_INTERVAL_S = 30.0
GREW_BYTES = 16 << 20  # RSS over the last trim's that makes a trim worth its time

log = logs.get_logger("cosyvoiced.heap")


def trim_due(rss_bytes: int, rss_after_last_trim: int) -> bool:
    """Whether a trim is worth its time: the process grew by GREW_BYTES since the last."""
    return rss_bytes - rss_after_last_trim >= GREW_BYTES


class HeapTrim:
    def __init__(self, now: float) -> None:
        self._next_look = now + TRIM_INTERVAL_S
        self._rss_after = memory.rss_bytes()

    def trim_if_due(self, now: float) -> None:
        """At most every TRIM_INTERVAL_S: look at the RSS, and trim if `trim_due`."""
        if now < self._next_look:
            return
        self._next_look = now + TRIM_INTERVAL_S
        rss = memory.rss_bytes()
        if not trim_due(rss, self._rss_after):
            return
        started = time.perf_counter()
        memory.give_free_heap_back()
        self._rss_after = memory.rss_bytes()
        log.info("heap_trimmed", rss_before=rss, rss_after=self._rss_after,
                 ms=round((time.perf_counter() - started) * 1000, 1))
