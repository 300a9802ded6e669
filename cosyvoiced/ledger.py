"""What the supervisor knows about jobs: those not ended yet, and recent outcomes.

Written by the job book (jobs.py) only, on the supervisor's thread; the others read it
through `LedgerView`. A job is queued until its first segment goes to a worker, then in
progress until it ends; in between, it waits for its next turn. Answers the `status` and
`stats` questions and keeps the crash counts that tell a poison job from bad luck.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from cosyvoiced import scheduler
from cosyvoiced.captions import SegmentAudio
from cosyvoiced.job import Job, Sink
from cosyvoiced.replyaudio import ReplyAudio
from cosyvoiced.scheduler import Priority, Waiting
from cosyvoiced.stages import SegmentStages

if TYPE_CHECKING:
    from cosyvoiced.workerhandle import WorkerHandle

HISTORY = 10_000  # finished jobs remembered for `status`
TURNS_KEPT = 10_000  # shares and parties whose last turn is remembered (fair turns)
Samples = npt.NDArray[np.float32]


@dataclass
class Running:
    """A job not ended yet: its segments, the one in hand, and its audio so far."""

    job: Job
    segments: list[str]
    ready_since: float  # monotonic: arrival, or the end of its last segment
    priority: Priority = Priority.BULK
    done: int = 0  # segments whose audio is complete
    holder: WorkerHandle | None = None  # the worker with its current segment in hand
    last_slot: int | None = None
    retry: bool = False
    started_at: float = 0.0  # wall clock, from the worker, at its first segment
    last_progress: float = 0.0  # monotonic: dispatch, start, or the latest chunk
    voice: str = ""
    sample_rate: int = 0
    chunks_sent: int = 0  # streamed chunks sent to the client, all segments
    segment_chunks: int = 0  # chunks of the segment in hand so far
    samples: int = 0  # of the complete segments
    synth_s: float = 0.0
    first_chunk_s: float = 0.0  # of the first segment: the client's wait for audio
    stages: list[SegmentStages] = field(default_factory=list)  # of the complete segments
    made: list[SegmentAudio] = field(default_factory=list)  # of the complete segments
    cancel_requested: bool = False
    dispatched: bool = False  # a segment of it has gone to a worker: it is in progress
    counted: bool = False  # this life's start of it here is counted in spool/attempts/
    remote: bool = False  # on the cluster's shared stream: its events come from elsewhere
    served_by: str = ""  # in a cluster, the host that serves it
    audio: ReplyAudio | None = None  # a whole reply's complete segments: given when admitted
    segment_audio: list[Samples] = field(default_factory=list)  # the segment in hand's
    sink: Sink | None = None  # where its outcome goes: bound once, when it is admitted
    persisted: bool = False  # in this host's work/: run again after a crash

    @property
    def bound_sink(self) -> Sink:
        assert self.sink is not None, "a job is admitted with its sink"
        return self.sink

    @property
    def reply_audio(self) -> ReplyAudio:
        assert self.audio is not None, "a job is admitted with a place for its audio"
        return self.audio

    @property
    def started(self) -> bool:
        return self.dispatched

    @property
    def audio_s(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    def progress(self) -> dict[str, Any]:
        return {"segments_done": self.done, "segments": len(self.segments),
                "audio_s": round(self.audio_s, 3)}


class LedgerView(Protocol):
    """The ledger, to read (status, stats, the console, the roster): only the job book
    (jobs.py) writes it."""

    @property
    def jobs(self) -> Mapping[str, Running]: ...

    @property
    def finished(self) -> OrderedDict[str, dict[str, Any]]: ...

    @property
    def written(self) -> Mapping[str, Job]: ...

    @property
    def counts(self) -> Mapping[str, int]: ...

    def __len__(self) -> int: ...

    def queued(self) -> list[Running]: ...

    def unstarted(self) -> int: ...

    def unstarted_of(self, share: str, party: str | None = None) -> int: ...

    def in_hand(self) -> list[Running]: ...

    def in_progress(self) -> Counter[Priority]: ...

    def reply_audio_bytes(self) -> dict[str, int]: ...

    def owner_of(self, job_id: str) -> str | None: ...

    def status(self, job_id: str) -> dict[str, Any] | None: ...


class Ledger:
    def __init__(self) -> None:
        self.jobs: OrderedDict[str, Running] = OrderedDict()  # in arrival order
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.finished_owners: dict[str, str] = {}  # job id -> owner, as long as remembered
        # share (or party) -> its last turn
        self.last_turn: OrderedDict[str, float] = OrderedDict()
        self.written: dict[str, Job] = {}  # done, its file being encoded and written
        self.repeating: dict[str, Job] = {}  # found in the result cache, waiting to be played
        self.crashes: dict[str, int] = {}
        # undelivered: done, but the client did not get the whole reply (not an outcome:
        # the job was made; what the client got is told apart here, as an operator asks)
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "undelivered": 0}

    def __len__(self) -> int:
        """Jobs not ended: queued or in progress."""
        return len(self.jobs)

    def enqueue(self, job: Job, segments: list[str], now: float) -> Running:
        running = Running(job, segments, now, scheduler.priority_of(job))
        self.jobs[job.id] = running
        return running

    def get(self, job_id: str) -> Running | None:
        return self.jobs.get(job_id)

    def pop(self, job_id: str) -> Running | None:
        """The job leaves (a repeat too: one whose outcome could not be written ends here,
        unrecorded, as any job does)."""
        self.repeating.pop(job_id, None)
        return self.jobs.pop(job_id, None)

    def queued(self) -> list[Running]:
        """Jobs not started, in the order they will start."""
        order = {w.job_id: n for n, w in
                 enumerate(scheduler.order(self.waiting(), self.last_turn))}
        unstarted = [r for r in self.jobs.values() if not r.started and r.job.id in order]
        return sorted(unstarted, key=lambda r: order[r.job.id])

    def unstarted(self) -> int:
        return sum(1 for r in self.jobs.values() if not r.started)

    def in_hand(self) -> list[Running]:
        return [r for r in self.jobs.values() if r.holder is not None]

    def in_progress(self) -> Counter[Priority]:
        return Counter(r.priority for r in self.jobs.values() if r.started and not r.remote)

    def reply_audio_bytes(self) -> dict[str, int]:
        """The whole replies' audio so far, held in memory and written to disk
        (replyaudio.py)."""
        held = [r.audio for r in self.jobs.values() if r.audio is not None]
        return {"memory": sum(audio.memory_bytes for audio in held),
                "disk": sum(audio.disk_bytes for audio in held)}

    def turn_taken(self, job: Job, now: float) -> None:
        """A segment of `job`'s went to a worker: the other shares go first next, and
        within its share the other parties."""
        for who in {job.share, job.party} - {""}:
            self.last_turn.pop(who, None)
            self.last_turn[who] = now
        while len(self.last_turn) > TURNS_KEPT:
            self.last_turn.popitem(last=False)

    def shares_in_progress(self) -> Counter[tuple[Priority, str]]:
        return Counter((r.priority, r.job.share) for r in self.jobs.values()
                       if r.started and not r.remote)

    def waiting(self) -> list[Waiting]:
        return [Waiting(r.job.id, r.priority, r.ready_since, r.started, r.retry, r.last_slot,
                        r.job.share, r.job.party)
                for r in self.jobs.values()
                if r.holder is None and not r.cancel_requested and r.done < len(r.segments)
                and not r.remote]

    def held_by(self, worker: WorkerHandle) -> list[Running]:
        """The jobs whose segments `worker` has in hand."""
        held = (self.jobs.get(job_id) for job_id in worker.jobs)
        return [running for running in held
                if running is not None and running.holder is worker]

    def record(self, job_id: str, source: str, state: str, owner: str = "",
               **detail: Any) -> None:
        """Remember how a job ended (state: done, failed or cancelled), and whose it was."""
        self.crashes.pop(job_id, None)
        self.written.pop(job_id, None)
        self.repeating.pop(job_id, None)
        self.counts[state] += 1
        self.finished[job_id] = {"state": state, "source": source} | detail
        self.finished_owners[job_id] = owner
        while len(self.finished) > HISTORY:
            forgotten, _ = self.finished.popitem(last=False)
            self.finished_owners.pop(forgotten, None)

    def undelivered(self, job_id: str) -> bool:
        """A job ended done, and its client did not get the whole reply: False if it is
        not a job remembered as done, or was counted so already."""
        record = self.finished.get(job_id)
        if record is None or record["state"] != "done" or record.get("delivered") is False:
            return False
        record["delivered"] = False
        self.counts["undelivered"] += 1
        return True

    def writing(self, job: Job) -> None:
        """The job's audio is complete; its file is being encoded and written."""
        self.repeating.pop(job.id, None)
        self.written[job.id] = job

    def repeat(self, job: Job) -> None:
        """The job is a repeat from the result cache, waiting for a tick to play it."""
        self.repeating[job.id] = job

    def owner_of(self, job_id: str) -> str | None:
        """Whose job it is ("" for nobody's: an admin's alone); None for an unknown job."""
        running = self.jobs.get(job_id)
        if running is not None:
            return running.job.owner
        waiting = self.written.get(job_id) or self.repeating.get(job_id)
        if waiting is not None:
            return waiting.owner
        return self.finished_owners.get(job_id)

    def unstarted_of(self, share: str, party: str | None = None) -> int:
        """Jobs of `share` not started, of its `party` alone if given."""
        return sum(1 for r in self.jobs.values() if not r.started and r.job.share == share
                   and party in (None, r.job.party))

    def count_crash(self, job: Job) -> int:
        self.crashes[job.id] = self.crashes.get(job.id, 0) + 1
        return self.crashes[job.id]

    def status(self, job_id: str) -> dict[str, Any] | None:
        running = self.jobs.get(job_id)
        if running is None and job_id in self.written:
            return {"state": "running", "source": self.written[job_id].source,
                    "writing": True}
        if running is None and job_id in self.repeating:
            return {"state": "queued", "source": self.repeating[job_id].source, "cached": True}
        if running is None:
            return self.finished.get(job_id)
        if running.remote:
            return {"state": "running" if running.started else "queued",
                    "source": running.job.source, "shared": True,
                    "served_by": running.served_by or None, "chunks": running.chunks_sent}
        if running.started:
            detail = running.progress()
            if running.holder is not None:
                detail["worker"] = running.holder.slot
            return {"state": "running", "source": running.job.source,
                    "chunks": running.chunks_sent} | detail
        position = next((n for n, r in enumerate(self.queued()) if r.job.id == job_id), 0)
        return {"state": "queued", "source": running.job.source, "position": position,
                "segments": len(running.segments)}
