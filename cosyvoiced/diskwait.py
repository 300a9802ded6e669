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
MAX_RETRIES_PER_TICK = 32  # outcomes written in one tick once the disk has room again
_DISK = "disk"  # the one key of UnwrittenOutcomes' backoff

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

    def __len__(self) -> int:
        return len(self._backoff)

    def forget(self, job_id: str) -> None:
        """The job ended (cancelled, or its daemon stops) before it could start."""
        self._backoff.forget(job_id)


def status_note(waits: dict[str, int]) -> str:
    """STATUS='s part: "; 3 outcomes waiting for the disk" and the like, or ""."""
    return "".join(f"; {count} {what} waiting for the disk"
                   for what, count in waits.items() if count)


class UnwrittenOutcomes:
    """Outcomes the spool's disk would not take, each written again by its `retry` (a
    spool job's result: the job made again), in the order they came.

    The disk is one: while it refuses, it is probed with one outcome at a time, after a
    backoff (each refusal sends the probed one to the back); once one is written the
    rest follow, MAX_RETRIES_PER_TICK a tick. Logged once while any wait, not once an
    outcome: 20,000 rejected drops on a full disk were 20,000 critical lines and a tick
    of 0.59 s. What waits counts against the drop folder's queued bound (service.py), so
    no number of drops grows it."""

    def __init__(self) -> None:
        self._retries: dict[str, Callable[[], None]] = {}  # job id -> its retry, in order
        self._disk = Backoff()
        self._written = 0  # outcomes written since the disk first refused one

    def __len__(self) -> int:
        return len(self._retries)

    def hold(self, job_id: str, retry: Callable[[], None], error: OSError | str,
             now: float | None = None) -> None:
        """`retry` writes the job's outcome (and holds it again if it cannot)."""
        now = time.monotonic() if now is None else now
        if not self._retries and _DISK not in self._disk:
            log.critical("outcome_unwritable", job=job_id, error=str(error),
                         message="the spool's disk refused a job's outcome; it waits, as "
                                 "any more do (STATUS=: outcomes waiting for the disk), and "
                                 "is written once the disk has room")
        self._retries.pop(job_id, None)
        self._retries[job_id] = retry  # behind the rest: another is probed next
        if not self._disk.waits(_DISK, now):
            self._disk.failed(_DISK, now)  # refused again: the next probe waits longer

    def written(self, job_id: str) -> None:
        """The job's outcome is written (the disk has room: the rest are due)."""
        if self._retries.pop(job_id, None) is not None or _DISK in self._disk:
            self._written += 1
            self._disk.forget(_DISK)
        if not self._retries and self._written:
            log.warning("outcome_written", job=job_id, written=self._written,
                        message="the outcomes that waited are written: the disk has room")
            self._written = 0

    def retry_due(self, now: float) -> None:
        """Probe the disk with the first waiting outcome, when due; if it is taken, the
        next ones (MAX_RETRIES_PER_TICK in all)."""
        if self._disk.waits(_DISK, now):
            return
        for job_id in list(self._retries)[:MAX_RETRIES_PER_TICK]:
            retry = self._retries.pop(job_id)
            retry()  # holds it again if the disk refuses it
            if job_id in self._retries:
                return
