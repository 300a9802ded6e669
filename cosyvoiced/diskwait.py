"""What waits for room on the spool's disk (a full disk: ENOSPC), tried again with a bounded
backoff: a full disk is the operator's to fix, never a reason for the daemon to exit (it
would only come back to the same disk, and its network intakes with it).

- A job whose start cannot be counted in `attempts/` stays queued: a job is handed out only
  once its start is durable (the poison rule counts crashes by it).
- An outcome (a job's failure or cancellation record) that cannot be written waits: its job
  is not ended (its status says it is being written) until it is written, once.

Both are logged when they first wait and when they go on, not at every try.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cosyvoiced import logs
from cosyvoiced.spool import Spool

FIRST_RETRY_S = 0.5
LONGEST_RETRY_S = 30.0

log = logs.get_logger("cosyvoiced.supervisor")


@dataclass
class _Tries:
    due: float  # monotonic: when to try again
    count: int  # failed tries so far


class Backoff:
    """Keys whose next try waits: after each failure twice as long as after the one before,
    from FIRST_RETRY_S up to LONGEST_RETRY_S."""

    def __init__(self) -> None:
        self._tries: dict[str, _Tries] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._tries

    def __len__(self) -> int:
        return len(self._tries)

    def failed(self, key: str, now: float) -> _Tries:
        tries = self._tries.setdefault(key, _Tries(now, 0))
        tries.due = now + min(LONGEST_RETRY_S, FIRST_RETRY_S * 2 ** tries.count)
        tries.count += 1
        return tries

    def waits(self, key: str, now: float) -> bool:
        tries = self._tries.get(key)
        return tries is not None and now < tries.due

    def due(self, now: float) -> list[str]:
        return [key for key, tries in self._tries.items() if now >= tries.due]

    def forget(self, key: str) -> int:
        """The failed tries `key` had (0: none)."""
        tries = self._tries.pop(key, None)
        return 0 if tries is None else tries.count


class HeldStarts:
    """Queued jobs whose start the spool's disk would not record."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._backoff = Backoff()

    def waits(self, job_id: str, now: float) -> bool:
        """Not to be handed out now: its start could not be counted, and its next try is
        not due."""
        return self._backoff.waits(job_id, now)

    def count(self, job_id: str, now: float) -> bool:
        """Count the job's start in `attempts/`; False (it stays queued) if the disk
        refused it."""
        try:
            self._spool.count_attempt(job_id)
        except OSError as error:
            tries = self._backoff.failed(job_id, now)
            if tries.count == 1:
                log.error("attempt_unwritable", job=job_id, error=str(error),
                          message="the spool's disk would not record the job's start; it "
                                  "stays queued and starts once the disk has room")
            return False
        if self._backoff.forget(job_id):
            log.info("attempt_written", job=job_id, message="the job starts")
        return True

    def forget(self, job_id: str) -> None:
        """The job ended (cancelled, or its daemon stops) before it could start."""
        self._backoff.forget(job_id)


class UnwrittenOutcomes:
    """Outcomes the spool's disk would not take, each written again by its `retry`."""

    def __init__(self) -> None:
        self._retries: dict[str, Callable[[], None]] = {}
        self._backoff = Backoff()

    def __len__(self) -> int:
        return len(self._retries)

    def hold(self, job_id: str, retry: Callable[[], None], error: OSError,
             now: float | None = None) -> None:
        """`retry` writes the job's outcome (and holds it again if it cannot)."""
        self._retries[job_id] = retry
        tries = self._backoff.failed(job_id, time.monotonic() if now is None else now)
        if tries.count == 1:
            log.critical("outcome_unwritable", job=job_id, error=str(error),
                         message="the job's outcome could not be written on the spool's "
                                 "disk; it is written once the disk has room")

    def written(self, job_id: str) -> None:
        """The job's outcome is written (if it waited: said so)."""
        self._retries.pop(job_id, None)
        tries = self._backoff.forget(job_id)
        if tries:
            log.warning("outcome_written", job=job_id, tries=tries + 1,
                        message="written after the disk had room again")

    def retry_due(self, now: float) -> None:
        for job_id in self._backoff.due(now):
            retry = self._retries.get(job_id)
            if retry is not None:
                retry()
