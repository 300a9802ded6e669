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

Above the jobs, clients take turns too: every job carries a `share` (an API key, a CURVE
key, the drop folder; anonymous clients all share one), and within a class a share's n-th
waiting job goes after every other share's (n-1)-th; among shares with jobs of the same
rank, the one whose turn was longest ago goes first (`last_turn`). So a client with 200
queued jobs holds up a newcomer's first job by one turn, not 200. Within a share, its
`party`s (the hosts of anonymous clients) rank their jobs the same way, their turns kept in
`last_turn` too, so one host's flood does not go ahead of another host's request within
the anonymous share either. While several shares
want to start jobs, a share may hold at most its fair part of the class's `max_active`
places (Postfix's per-destination concurrency), so one client cannot take every place with
long jobs.
"""

from __future__ import annotations

import math
from collections import Counter
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
    share: str = ""  # whose turn it is: the client's fair-share identity
    party: str = ""  # who takes turns within the share (an anonymous client's host)


@dataclass(frozen=True)
class Assignment:
    job_id: str
    slot: int


def order(waiting: Sequence[Waiting],
          last_turn: Mapping[str, float] | None = None) -> list[Waiting]:
    """The order in which waiting jobs are served: by class, retries first, then by the
    job's rank among its share's waiting jobs, then the share whose last turn (a segment
    handed out, `last_turn`) was longest ago, then by age."""
    turns = last_turn or {}
    oldest_first = sorted(waiting, key=lambda w: (w.priority, not w.retry, w.ready_since))
    ranks = _ranks_in_share(oldest_first, turns)
    ranked = []
    for job in oldest_first:
        key = (job.priority, not job.retry, ranks[job.job_id], turns.get(job.share, -math.inf),
               job.ready_since)
        ranked.append((key, job))
    return [job for _key, job in sorted(ranked, key=lambda pair: pair[0])]


def _ranks_in_share(oldest_first: Sequence[Waiting],
                    turns: Mapping[str, float]) -> dict[str, int]:
    """Each job's rank among its share's waiting jobs of its class: the parties of a share
    take turns, so a party's n-th job ranks after every other party's (n-1)-th; among equals,
    the party whose turn was longest ago, then retries and older jobs (`oldest_first`'s
    order, kept by the stable sort)."""
    seen: Counter[tuple[Priority, str, str]] = Counter()
    in_party = []
    for job in oldest_first:
        rank = seen[job.priority, job.share, job.party]
        seen[job.priority, job.share, job.party] += 1
        in_party.append(((job.priority, job.share, rank, turns.get(job.party, -math.inf)),
                         job))
    ranks: dict[str, int] = {}
    counted: Counter[tuple[Priority, str]] = Counter()
    for _key, job in sorted(in_party, key=lambda pair: pair[0]):
        ranks[job.job_id] = counted[job.priority, job.share]
        counted[job.priority, job.share] += 1
    return ranks


def fair_places(waiting: Sequence[Waiting], shares_active: Mapping[tuple[Priority, str], int],
                max_active: int) -> dict[Priority, int]:
    """How many of a class's `max_active` places one share may hold: all of them while it
    is alone, an equal part (at least one) while other shares want places too."""
    wanting: dict[Priority, set[str]] = {}
    for (priority, share), active in shares_active.items():
        if active:
            wanting.setdefault(priority, set()).add(share)
    for job in waiting:
        if not job.started:
            wanting.setdefault(job.priority, set()).add(job.share)
    return {priority: max(1, max_active // len(shares)) for priority, shares in wanting.items()}


def places(free: Mapping[int, int], held: Mapping[int, int]) -> list[int]:
    """The worker slots with room, once per segment each can take more (a batched worker
    makes several at once), least loaded first: new segments spread over the workers
    before any one is filled. `free` and `held` count, per slot, the segments it can still
    take and those it has in hand."""
    ranked = [(held.get(slot, 0) + n, slot) for slot, room in free.items()
              for n in range(room)]
    return [slot for _load, slot in sorted(ranked)]


def assign(waiting: Sequence[Waiting], idle_slots: Sequence[int],  # noqa: PLR0917
           in_progress: Mapping[Priority, int], max_active: int,
           shares_active: Mapping[tuple[Priority, str], int] | None = None,
           last_turn: Mapping[str, float] | None = None) -> list[Assignment]:
    """The next segments to hand out, one per place in `idle_slots` at most (a slot is
    listed once per segment its worker can take: `places`).

    `in_progress` counts the jobs of each class started and not yet ended, and
    `shares_active` the same per (class, share). A job's next segment goes back to the slot
    that served its last one when that slot is idle.
    """
    idle = list(idle_slots)
    active = dict(in_progress)
    per_share: Counter[tuple[Priority, str]] = Counter(shares_active or {})
    places = fair_places(waiting, per_share, max_active)
    assignments = []
    for job in order(waiting, last_turn):
        if not idle:
            break
        if not job.started:
            share = (job.priority, job.share)
            if active.get(job.priority, 0) >= max_active or \
                    per_share[share] >= places[job.priority]:
                continue
            active[job.priority] = active.get(job.priority, 0) + 1
            per_share[share] += 1
        slot = job.last_worker if job.last_worker is not None and job.last_worker in idle \
            else idle[0]
        idle.remove(slot)
        assignments.append(Assignment(job.job_id, slot))
    return assignments
