"""What the supervisor knows about jobs: the queue, the one in hand, and recent outcomes.

Owned by the supervisor's thread only. Answers the `status` and `stats` questions and keeps
the crash counts that tell a poison job from bad luck.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cosyvoiced.job import Job

HISTORY = 10_000  # finished jobs remembered for `status`


@dataclass
class Running:
    """The job the worker has in hand."""

    job: Job
    dispatched_at: float
    started_at: float = 0.0  # wall clock, from the worker
    last_progress: float = 0.0  # monotonic: dispatch, start, or the latest chunk
    voice: str = ""
    sample_rate: int = 0
    chunks_sent: int = 0
    cancel_requested: bool = False
    chunks: list[npt.NDArray[np.float32]] = field(default_factory=list)


class Ledger:
    def __init__(self) -> None:
        self.queue: deque[Job] = deque()
        self.running: Running | None = None
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.crashes: dict[str, int] = {}
        self.counts = {"done": 0, "failed": 0, "cancelled": 0}

    def __len__(self) -> int:
        return len(self.queue)

    def enqueue(self, job: Job, front: bool = False) -> None:
        if front:
            self.queue.appendleft(job)
        else:
            self.queue.append(job)

    def start(self, job: Job, now: float) -> Running:
        self.running = Running(job, now)
        return self.running

    def take_running(self) -> Running | None:
        running, self.running = self.running, None
        return running

    def remove_queued(self, job_id: str) -> Job | None:
        for job in self.queue:
            if job.id == job_id:
                self.queue.remove(job)
                return job
        return None

    def drain_queue(self) -> Iterator[Job]:
        while self.queue:
            yield self.queue.popleft()

    def record(self, job_id: str, source: str, state: str, **detail: Any) -> None:
        """Remember how a job ended (state: done, failed or cancelled)."""
        self.crashes.pop(job_id, None)
        self.counts[state] += 1
        self.finished[job_id] = {"state": state, "source": source} | detail
        while len(self.finished) > HISTORY:
            self.finished.popitem(last=False)

    def count_crash(self, job: Job) -> int:
        self.crashes[job.id] = self.crashes.get(job.id, 0) + 1
        return self.crashes[job.id]

    def status(self, job_id: str) -> dict[str, Any] | None:
        if self.running is not None and self.running.job.id == job_id:
            return {"state": "running", "source": self.running.job.source,
                    "chunks": self.running.chunks_sent}
        for position, job in enumerate(self.queue):
            if job.id == job_id:
                return {"state": "queued", "source": job.source, "position": position}
        return self.finished.get(job_id)
