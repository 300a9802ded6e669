"""What waits for room on the spool's disk (a full disk: ENOSPC), tried again with a bounded
backoff: a full disk is the operator's to fix, never a reason for the daemon to exit (it
would only come back to the same disk, and its network intakes with it).

A job whose start cannot be counted in `attempts/` stays queued: a job is handed out only
once its start is durable (the poison rule counts crashes by it). It is logged when it
first waits and when it goes on, not at every try.
"""

from __future__ import annotations

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
