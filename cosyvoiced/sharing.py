"""This host's side of a cluster: jobs shared through Redis with the other daemons.

A job received here goes onto the shared stream and waits in the job book as `remote` until
its events come back (or this host takes it itself). A job taken from the stream runs here
like any other; if another host received it, a `RemoteSink` sends its audio and outcome
there. Every job still ends exactly once, where it was received: the events of a job
that ended already (it ran twice after a host died, or was taken back) are dropped.

While Redis is down, new jobs are served here, and the jobs waiting on the stream are
taken back: at once if no host has started them, after `claim_idle_s` otherwise.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from cosyvoiced import clusterwire as wire
from cosyvoiced import logs, policy
from cosyvoiced.clusterwire import SharedLost, ShareFailed
from cosyvoiced.config import ClusterConfig
from cosyvoiced.job import (
    SINK_REPLY,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    ResultAudio,
)
from cosyvoiced.jobspec import Limits, check_text
from cosyvoiced.ledger import Running, Samples
from cosyvoiced.metrics import Metrics
from cosyvoiced.remoteaudio import Arriving, PartAction, part_action

if TYPE_CHECKING:  # redis, which the link imports, costs every start 0.17 s
    from cosyvoiced.cluster import ClusterLink

PROMPT_NAME = "shared.prompt"

log = logs.get_logger("cosyvoiced.sharing")

# A tick spends this long at most on what came from Redis (jobs taken, events): the event
# reader keeps adding while the tick works, and could hold it for good.
POLL_S = 0.1
# A `done` read before all its parts (they were left to be read again) is left in Redis and
# the stream read again this many times; then the job is served here.
INCOMPLETE_READS = 2


class RemoteSink:
    """The outcome of another host's job goes back to that host, as events."""

    def __init__(self, link: ClusterLink, shared: wire.SharedJob) -> None:
        self.link, self.shared = link, shared

    def _event(self, kind: str, audio: bytes = b"", **detail: Any) -> wire.Event:
        return wire.Event(kind, self.shared.job.id, self.link.host, detail, audio)

    def started(self, job: Job, sample_rate: int) -> None:
        self.link.send(self.shared.host, self._event(wire.STARTED, sample_rate=sample_rate))

    def chunk(self, job: Job, seq: int, samples: npt.NDArray[np.float32]) -> None:
        self.link.send(self.shared.host,
                       self._event(wire.CHUNK, wire.audio_bytes(samples), seq=seq))

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str:
        detail = {"voice": result.voice, "sample_rate": result.sample_rate,
                  "samples": result.samples, "synth_s": result.synth_s,
                  "first_chunk_s": result.first_chunk_s, "cached": result.cached,
                  "timings": timings}
        self.link.complete(self.shared.host, self._event(wire.DONE, b"", **detail), self.shared,
                           None if job.stream else made)
        return f"to {self.shared.host}"

    def fail_job(self, job: Job, error: JobError) -> str:
        self.link.complete(self.shared.host,
                           self._event(wire.FAILED, error=error.to_dict()), self.shared)
        return f"to {self.shared.host}"

    def cancelled(self, job: Job) -> None:
        self.link.complete(self.shared.host, self._event(wire.CANCELLED), self.shared)


class Host(Protocol):
    """What sharing needs of the daemon it runs in (service.Service), and nothing more."""

    @property
    def ready(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def limits(self) -> Limits: ...

    def wake(self) -> None: ...

    def idle_workers(self) -> int: ...

    def enqueue_here(self, job: Job) -> None: ...

    def cancel(self, job_id: str) -> bool: ...

    @property
    def recovering(self) -> AbstractSet[str]: ...


class Book(Protocol):
    """What sharing reads and changes of the job book (jobs.JobBook): the jobs' records
    are the book's to write."""

    def get(self, job_id: str) -> Running | None: ...

    def shared(self) -> list[Running]: ...

    def room(self, idle: int) -> tuple[int, int]: ...

    def mark_remote(self, running: Running) -> None: ...

    def remote_started(self, running: Running, host: str, sample_rate: int) -> None: ...

    def remote_chunk(self, running: Running, samples: Samples) -> None: ...

    def keep(self, running: Running, chunks: list[Samples]) -> bool: ...

    def finish_remote(self, running: Running, event: wire.Event) -> None: ...

    def serve_here(self, running: Running) -> None: ...

    def end(self, running: Running, error: JobError | None) -> None: ...

    def release(self, running: Running) -> bool: ...


class Prompts(Protocol):
    """Where the prompt audio of the jobs taken from the stream is kept (spool.Spool)."""

    def write_prompt(self, job_id: str, name: str, data: bytes) -> Path: ...

    def discard_prompts(self, job_id: str) -> None: ...


def _link(settings: ClusterConfig, name: str, wake: Callable[[], None]) -> ClusterLink:
    """The link to the cluster's Redis: imported here, so that only a host with a cluster
    imports redis (0.17 s of CPU at every start)."""
    from cosyvoiced.cluster import ClusterLink  # noqa: PLC0415

    return ClusterLink(settings, name, wake)


class Sharing:
    def __init__(self, settings: ClusterConfig, host: Host, *, book: Book, prompts: Prompts,
                 metrics: Metrics) -> None:
        self.host, self.book, self.prompts, self.metrics = host, book, prompts, metrics
        self.name = (settings.name or socket.gethostname()) if settings.redis else ""
        self.claim_idle_s = settings.claim_idle_s
        self.link = _link(settings, self.name, host.wake) if settings.redis else None
        self.was_up = False
        self.down_since = 0.0
        self.own: dict[str, Running] = {}  # received here and shared, not ended
        # Released at a stop: their outcomes wait in Redis for the next start (bounded by
        # the jobs in the book at that stop).
        self.left_to_redis: set[str] = set()
        self.served: dict[str, wire.SharedJob] = {}  # local id -> its stream entry
        self.sinks: dict[str, RemoteSink] = {}  # local id -> where its outcome goes
        self.arriving: dict[str, Arriving] = {}  # own id -> the parts of its audio so far
        self.incomplete_reads: dict[str, int] = {}  # own id -> its `done` read too early
        self.taken_over = 0
        self.next_audit = 0.0
        # Events of jobs left in work/ by a crash that are not in the book yet (they are
        # admitted a tick's claims at a time) are left in Redis and read again after.
        self.replay_events = False
        self.clock = time.monotonic

    @property
    def up(self) -> bool:
        return self.link is not None and self.link.up

    # -- lifetime ------------------------------------------------------------------------
    def connect(self) -> None:
        if self.link is None:
            return
        if self.link.connect():
            log.info("cluster_joined", redis=self.link.url, name=self.name)
        else:
            log.warning("cluster_unreachable", redis=self.link.url, error=self.link.error,
                        message="serving this host's jobs here until Redis is back")
            self.down_since = time.monotonic()
        self.was_up = self.link.up

    def start(self) -> None:
        if self.link is not None:
            self.link.start()

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()

    # -- receiving -----------------------------------------------------------------------
    def share(self, running: Running) -> bool:
        """Put a job received here onto the shared stream; False: serve it here, as this
        host has a worker free for it (no Redis round trip) or Redis is down."""
        if self.link is None:
            return False
        if not self.link.up or self._free_here():
            if running.persisted:  # shared before a crash, maybe: another host must not
                self.link.withdraw(running.job.id)  # make it again once Redis answers
            return False
        job = running.job
        prompt_path = Path(job.prompt_audio) if job.prompt_audio else None
        why_not = wire.unshareable(job, prompt_path.stat().st_size if prompt_path else 0)
        if why_not is not None:  # every host would drop it unread: its own limits apply here
            log.info("job_not_shared", job=job.id, reason=why_not)
            return False
        prompt = prompt_path.read_bytes() if prompt_path else None
        self.book.mark_remote(running)
        self.own[job.id] = running
        self.link.want(0)  # first: a read still out for jobs must not take this one back
        self.link.share(job, prompt)
        return True

    def _free_here(self) -> bool:
        """An idle worker for every job waiting here to start (the new one included)."""
        return self.host.ready and self._capacity()[0] >= 0

    def _capacity(self) -> tuple[int, int]:
        """(idle workers less the jobs here waiting to start, jobs more that this host's
        turns have room for)."""
        return self.book.room(self.host.idle_workers())

    def _shared_count(self) -> int:
        return len(self.book.shared())

    def ended(self, job_id: str) -> None:
        """A job ended here: settle what Redis holds of it."""
        if self.link is None:
            return
        shared = self.served.pop(job_id, None)
        self.sinks.pop(job_id, None)
        running = self.own.pop(job_id, None)
        self._let_parts_go(job_id)
        if shared is not None:
            if shared.host == self.name:
                self.link.settle(shared)  # (another host's: its RemoteSink settled it)
        elif running is not None:  # ended here before its outcome came back
            if running.remote and running.served_by:
                self.link.send(running.served_by, wire.Event(wire.CANCEL, job_id, self.name))
            self.link.withdraw(job_id)

    def release(self, running: Running) -> bool:
        """The daemon stops: a job not started here (or not served here at all) is left
        to the cluster. False: the service releases it as it would alone."""
        job_id = running.job.id
        shared = self.served.get(job_id)
        own = running.remote or (shared is not None and shared.host == self.name)
        if self.link is None or (own and running.job.sink == SINK_REPLY):
            return False  # a reply's client is told: its request ends with this host
        if not own and shared is None:
            return False
        if shared is not None:
            self.link.requeue(shared)  # another host can take it at once
            self.served.pop(job_id)
            self.sinks.pop(job_id, None)
        if own:
            # Its outcome waits in Redis until this host is back and finds it in work/.
            self.own.pop(job_id, None)
            self.left_to_redis.add(job_id)
        else:
            self.prompts.discard_prompts(job_id)
        self.book.release(running)
        return True

    # -- the tick ------------------------------------------------------------------------
    def poll(self, now: float) -> None:
        if self.link is None:
            return
        self._watch_link(now)
        self._take_inbound(self.link)
        if self.replay_events and not self.host.recovering:
            self.replay_events = False
            self.link.replay_events()
        if self.link.up and now >= self.next_audit:
            self.next_audit = now + self.claim_idle_s
            waiting = [job_id for job_id, running in self.own.items() if running.remote]
            if waiting:
                self.link.audit(waiting)

    def _take_inbound(self, link: ClusterLink) -> None:
        """What the link's threads read (jobs taken, events), for POLL_S at most."""
        forgotten: list[str] = []
        finished: list[str] = []
        began = self.clock()
        while not link.inbound.empty():
            if self.clock() - began >= POLL_S:  # the rest at the next tick, which comes at once
                self.host.wake()
                break
            item = link.inbound.get_nowait()
            if isinstance(item, wire.SharedJob):
                self._take(item)
            elif isinstance(item, ShareFailed):
                self._take_back(item.job_id, "redis_unreachable")
            elif isinstance(item, SharedLost):
                self._take_back(item.job_id, "lost_by_redis")
            else:
                link.taken(item)
                if item.kind != wire.CANCEL and item.job_id in self.left_to_redis:
                    continue  # it came while this host drains its own jobs to stop
                if item.kind != wire.CANCEL and item.job_id in self.host.recovering:
                    self.replay_events = True  # read again once the job is in the book
                    continue
                if item.kind == wire.PART:
                    forgotten.extend(self._part(item))
                    continue
                forgotten.append(item.entry)
                if self._apply(item, forgotten):
                    finished.append(item.job_id)
        if forgotten:
            link.forget(forgotten, finished)

    def offer(self) -> None:
        """Take as many jobs from the stream as this host can start now."""
        if self.link is None:
            return
        if self.host.ready and not self.host.stopping:
            self.link.want(*self._capacity())
        else:
            self.link.want(0)

    def _watch_link(self, now: float) -> None:
        assert self.link is not None
        up = self.link.up
        if up != self.was_up:
            self.was_up = up
            if up:
                log.info("cluster_up", redis=self.link.url, down_s=round(now - self.down_since, 1))
            else:
                self.down_since = now
                log.warning("cluster_down", redis=self.link.url, error=self.link.error,
                            message="serving this host's jobs here until Redis is back")
        self.metrics.cluster_connected.set(int(up))
        if not up:
            self._take_back_all(now)

    def _take_back_all(self, now: float) -> None:
        """Redis is down: the jobs it holds for this host are served here instead."""
        for running in self.book.shared():
            if not running.started:
                self._take_back(running.job.id, "redis_unreachable")
            elif now - self.down_since >= self.claim_idle_s:
                self._take_back(running.job.id, "redis_unreachable_started")

    def _take_back(self, job_id: str, reason: str) -> None:
        running = self.book.get(job_id)
        if running is None or not running.remote:
            return
        if running.job.stream and running.chunks_sent:
            self.book.end(running, JobError(
                ErrorCode.WORKER_CRASHED, f"lost contact with {running.served_by}, which was "
                "streaming this job; its audio cannot be continued here"))
            return
        log.warning("job_taken_back", job=job_id, reason=reason, served_by=running.served_by)
        self._serve_here(running)
        # Off the stream and its marker gone once Redis answers: a crash before it ends here
        # then shares it afresh at the restart (its marker left, it was taken as shared
        # still, and waited for an outcome no host would send).
        assert self.link is not None
        self.link.withdraw(job_id)

    def _serve_here(self, running: Running) -> None:
        self._let_parts_go(running.job.id)
        self.book.serve_here(running)
        self.host.wake()  # the tick dispatches it

    # -- serving -------------------------------------------------------------------------
    def _take(self, shared: wire.SharedJob) -> None:
        if shared.taken_over:  # (its deliveries count only the tries that started it)
            self.taken_over += 1
            self.metrics.jobs_taken_over.inc()
        if shared.host == self.name:
            self._take_own(shared)
            return
        local_id = f"{shared.host}-{shared.job.id}"
        assert self.link is not None
        if self.book.get(local_id) is not None:
            self.link.settle(shared)  # a second entry of a job here already
            return
        sink = RemoteSink(self.link, shared)
        refusal = _poison_error(shared.deliveries) if policy.poisoned(shared.deliveries) \
            else _refusal(shared.job, self.host.limits)
        if refusal is not None:  # never queued here: no prompt kept
            sink.fail_job(wire.served_job(shared, local_id, None), refusal)
            return
        prompt = None
        if shared.prompt is not None:
            try:
                prompt = str(self.prompts.write_prompt(local_id, PROMPT_NAME, shared.prompt))
            except OSError as error:  # a full disk here: the job ends, with why, at its host
                sink.fail_job(wire.served_job(shared, local_id, None), JobError(
                    ErrorCode.INTERNAL,
                    f"{self.name} could not store the job's prompt audio: "
                    f"{error.strerror or error}"))  # (its spool's path is not the client's)
                return
        self.served[local_id] = shared
        self.sinks[local_id] = sink
        self.host.enqueue_here(wire.served_job(shared, local_id, prompt))

    def _take_own(self, shared: wire.SharedJob) -> None:
        assert self.link is not None
        running = self.book.get(shared.job.id)
        if running is None or not running.remote:
            self.link.settle(shared)  # ended, or taken back, already
            return
        self.served[shared.job.id] = shared
        if policy.poisoned(shared.deliveries):
            self.book.end(running, _poison_error(shared.deliveries))
        elif running.job.stream and running.chunks_sent:  # taken over from a dead host
            self.book.end(running, _stream_lost(running.served_by, self.name))
        else:
            self._serve_here(running)

    # -- events --------------------------------------------------------------------------
    def _apply(self, event: wire.Event, forgotten: list[str]) -> bool:
        """Act on one event; True if it ended a job received here. The entries that may
        leave Redis now go in `forgotten`."""
        if event.kind == wire.CANCEL:
            self.host.cancel(f"{event.sender}-{event.job_id}")  # a repeat here, too
            return False
        running = self.book.get(event.job_id)
        if running is None or not running.remote:
            return False  # ended already, or served here since
        if event.kind == wire.STARTED:
            self._started(running, event)
        elif event.kind == wire.CHUNK:
            if event.sender == running.served_by and event.detail["seq"] == running.chunks_sent:
                self.book.remote_chunk(running, event.samples)
        elif event.kind == wire.DONE:
            return self._done(running, event, forgotten)
        elif event.kind in wire.OUTCOMES:
            self.own.pop(running.job.id, None)  # settled by forget(): nothing to withdraw
            error = event.detail.get("error")
            self.book.end(running, JobError.from_dict(error) if error else None)
            return True
        return False

    def _part(self, event: wire.Event) -> list[str]:
        """A part of a whole reply's audio (remoteaudio.py); the entries that may leave
        Redis now (the rest go with the outcome)."""
        running = self.book.get(event.job_id)
        if running is None or not running.remote or running.job.stream:
            return [event.entry]
        arriving = self.arriving.setdefault(event.job_id, Arriving())
        action = part_action(arriving, event.sender, event.entry, event.detail["seq"])
        if action is PartAction.SKIP:
            return []
        if action is PartAction.BREAK:
            arriving.noted(event.entry)
            return []
        gone: list[str] = []
        if action is PartAction.RESTART:  # another try: the audio of the one before goes
            gone = arriving.begin_again()
            running.reply_audio.discard()
        if not self.book.keep(running, [event.samples]):  # ended, its parts let go
            return [*gone, event.entry]
        arriving.kept(event.sender, event.entry, len(event.samples))
        return gone

    def _done(self, running: Running, event: wire.Event, forgotten: list[str]) -> bool:
        """A job received here is done elsewhere: delivered here if its audio came whole.
        If not, its parts may be in Redis still, left to be read again (they came while
        the job was not in the book yet, just after a restart): the outcome is left there
        too, and the stream read again in order, up to INCOMPLETE_READS times. Parts that
        Redis let go (`max_outcomes`): the job is served here again."""
        job_id, arriving = running.job.id, self.arriving.get(running.job.id) or Arriving()
        samples = event.detail["samples"]
        if not running.job.stream and not arriving.whole(event.sender, samples):
            reads = self.incomplete_reads[job_id] = self.incomplete_reads.get(job_id, 0) + 1
            if reads <= INCOMPLETE_READS:  # all of it again, in order, from Redis
                forgotten.remove(event.entry)
                self.arriving.pop(job_id, None)
                running.reply_audio.discard()
                self.replay_events = True
                return False
            log.warning("outcome_incomplete", job=job_id, served_by=event.sender,
                        samples=samples, came=arriving.frames)
            self._take_back(job_id, "outcome_incomplete")
            return False
        self.own.pop(job_id, None)  # settled by forget(): nothing to withdraw
        forgotten.extend(self.arriving.pop(job_id, arriving).entries)
        self.book.finish_remote(running, event)
        return True

    def _let_parts_go(self, job_id: str) -> None:
        self.incomplete_reads.pop(job_id, None)
        arriving = self.arriving.pop(job_id, None)
        if arriving is not None and arriving.entries and self.link is not None:
            self.link.forget(arriving.entries, [])

    def started_here(self, job_id: str) -> None:
        """A job taken from the stream has started here: from now on, this host's death
        counts against it."""
        shared = self.served.get(job_id)
        if shared is not None and self.link is not None:
            self.link.count_start(shared)

    def _started(self, running: Running, event: wire.Event) -> None:
        if running.served_by and running.served_by != event.sender and running.chunks_sent:
            self.book.end(running, _stream_lost(running.served_by, event.sender))
            return
        self.book.remote_started(running, event.sender, int(event.detail["sample_rate"]))

    # -- reporting -----------------------------------------------------------------------
    def figures(self) -> dict[str, Any] | None:
        if self.link is None:
            return None
        error = self.link.error if not self.link.up else self.link.refusal(self.clock())
        return {"name": self.name, "redis": self.link.url, "connected": self.link.up,
                "error": error or None, "shared": self._shared_count(),
                "serving_for_others": len(self.sinks), "taken_over": self.taken_over}

    def status(self) -> str:
        if self.link is None:
            return ""
        if not self.link.up:
            return f"; cluster: Redis unreachable, serving here ({self.link.error})"
        refused = self.link.refusal(self.clock())
        return (f"; cluster {self.name}: {self._shared_count()} shared, "
                f"{len(self.sinks)} for others" + (f"; Redis refuses: {refused}" if refused
                                                   else ""))


def _refusal(job: Job, limits: Limits) -> JobError | None:
    """Why this host does not serve a job another host received: its text is over this
    host's limits (the wire's bounds are wider), or not one an engine can speak."""
    try:
        check_text(job.text, limits, normalize=False)
    except JobFailure as failure:
        return failure.error
    return None


def _poison_error(deliveries: int) -> JobError:
    return JobError(ErrorCode.WORKER_CRASHED, f"the hosts serving this job stopped "
                    f"{deliveries - 1} time(s) while it ran; it is not retried again")


def _stream_lost(first: str, second: str) -> JobError:
    return JobError(ErrorCode.WORKER_CRASHED, f"{first} stopped while streaming this job and "
                    f"{second} took it over; its audio cannot be continued")
