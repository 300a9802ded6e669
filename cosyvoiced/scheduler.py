"""Which job's next segment goes to which idle worker: a pure function of the queue.

Two classes, as an I/O scheduler has: interactive jobs (a client is waiting to play the
audio: ZeroMQ `synthesize`, and every other reply channel) always go before bulk ones (the
drop folder, `submit`). Within a class, jobs take turns segment by segment (Postfix's qmgr
takes turns between destinations the same way): the job whose next segment has been ready
the longest goes first, so a long text holds up another job's first audio by at most one
segment. A job whose worker died goes first of all, and a job never has two segments in
hand at once (its audio is made in order).

Only `max_active` jobs of a class are in progress at once; the others wait unstarted. A
job in progress holds its audio so far in the supervisor's memory, so this bounds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from cosyvoiced.job import SINK_REPLY, Job


class Priority(IntEnum):
    INTERACTIVE = 0
    BULK = 1


def priority_of(job: Job) -> Priority:
    return Priority.INTERACTIVE if job.sink == SINK_REPLY else Priority.BULK


@dataclass(frozen=True)
class Waiting:
    """A job whose next segment is ready to run."""

    job_id: str
    priority: Priority
    ready_since: float  # its arrival, or the end of its last segment
    started: bool = False  # it has had a segment already (it is in progress)
    retry: bool = False  # its last segment's worker died before finishing it
    last_worker: int | None = None  # the slot that served its last segment


@dataclass(frozen=True)
class Assignment:
    job_id: str
    slot: int


def order(waiting: Sequence[Waiting]) -> list[Waiting]:
    """The order in which waiting jobs are served."""
    return sorted(waiting, key=lambda w: (w.priority, not w.retry, w.ready_since))


def assign(waiting: Sequence[Waiting], idle_slots: Sequence[int],
           in_progress: Mapping[Priority, int], max_active: int) -> list[Assignment]:
    """The next segments to hand out, one per idle worker slot at most.

    `in_progress` counts the jobs of each class started and not yet ended. A job's next
    segment goes back to the slot that served its last one when that slot is idle.
    """
    idle = list(idle_slots)
    active = dict(in_progress)
    assignments = []
    for job in order(waiting):
        if not idle:
            break
        if not job.started:
            if active.get(job.priority, 0) >= max_active:
                continue
            active[job.priority] = active.get(job.priority, 0) + 1
        slot = job.last_worker if job.last_worker is not None and job.last_worker in idle \
            else idle[0]
        idle.remove(slot)
        assignments.append(Assignment(job.job_id, slot))
    return assignments
