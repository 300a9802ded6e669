"""The job book (Postfix's qmgr): every job not ended, its segments, its progress and its one
outcome. It hands segments to idle workers in the scheduler's order, takes the workers'
messages about them, retries a segment whose worker died, and ends each job exactly once
through the sink bound to it when it was admitted.

It is owned by the supervisor's thread and never calls back into the supervisor or the
cluster: what happened is recorded (`closed`, `started_here`, `freed`) and the tick drains
it, in its fixed order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from cosyvoiced import captions, clusterwire, diskwait, logs, policy, scheduler, stages
from cosyvoiced.clients import LOCAL_ADMIN, Identity
from cosyvoiced.config import Config
from cosyvoiced.encoding import Encoder
from cosyvoiced.job import (
    SINK_REPLY,
    SINK_SPOOL,
    Deferred,
    ErrorCode,
    Job,
    JobError,
    JobResult,
    Sink,
)
from cosyvoiced.ledger import Ledger, LedgerView, Running, Samples
from cosyvoiced.messages import (
    AudioChunkReady,
    CancelJob,
    FromWorker,
    JobCancelled,
    JobFailed,
    RunSegment,
    SegmentFinished,
    SegmentStarted,
)
from cosyvoiced.replyaudio import ReplyAudio
from cosyvoiced.spool import Spool
from cosyvoiced.workerhandle import WorkerHandle, WorkerState

log = logs.get_logger("cosyvoiced.supervisor")


@dataclass(frozen=True)
class Closed:
    """A job that ended: what the tick tells the metrics, the spool and the cluster."""

    job_id: str
    source: str
    outcome: str  # done, failed or cancelled
    result: JobResult | None
    share: str
    chars: int


@dataclass
class _Encoding:
    """A finished job whose file the encoder is making."""

    job: Job
    sink: Sink
    deferred: Deferred
    result: JobResult
    status: dict[str, Any]
    summary: dict[str, Any]
    since: float
    made: tuple[bool, bool]  # (persisted in work/, its start counted in attempts/ here)


def _stage_summary(result: JobResult) -> dict[str, Any]:
    """The `job` line's stage figures: the job's totals, then each segment's."""
    if not result.stages:
        return {}
    return stages.job_timings(result.stages) | {
        "stages": [segment.summary() for segment in result.stages]}


def _result_of(running: Running, host: str) -> JobResult:
    job = running.job
    return JobResult(job.id, running.voice, running.sample_rate, running.samples,
                     running.synth_s, running.first_chunk_s,
                     served_by=running.served_by or host, stages=tuple(running.stages),
                     captions=_captions(running))


def _timings_of(running: Running, result: JobResult) -> dict[str, float]:
    """The job's `timings`: when it came and started, and what its segments took."""
    job = running.job
    return {
        "received_at": round(job.received_at, 6),
        "started_at": round(running.started_at, 6),
        "queue_wait_s": round(max(0.0, running.started_at - job.received_at), 4),
        "first_chunk_s": round(result.first_chunk_s, 4),
        "synth_s": round(result.synth_s, 4),
    } | stages.job_timings(result.stages)


def _captions(running: Running) -> captions.Captions | None:
    """The job's captions, if it asked for them and its segments were all made here (a job
    served by another host in a cluster has none)."""
    job = running.job
    if (job.timestamps is None and job.captions is None) or \
            len(running.made) != len(running.segments):
        return None
    return captions.build(running.made, running.sample_rate)


def _on_chunk(running: Running, message: AudioChunkReady) -> None:
    running.segment_chunks += 1
    if running.job.stream:
        running.bound_sink.chunk(running.job, running.chunks_sent, message.audio)
        running.chunks_sent += 1
    else:
        running.segment_audio.append(message.audio)


def _max_active(config: Config, streams: int) -> int:
    """Jobs of a class in progress at once: the configured bound, or more where the workers
    make more segments at once (batched streams), so that none stays empty."""
    return max(config.scheduling.max_active_jobs, streams)


def _uncounted(spool: Spool, job_id: str) -> bool:
    """Take back this life's count of a job's start (a stop is no crash); True if no start
    is left counted. A disk that refuses it (full) leaves the count one too many: the job
    stays in work/ and the poison rule takes this stop for a crash (exit 5 in the tick
    was worse: every job stopped, the network intakes with them)."""
    try:
        return spool.uncount_attempt(job_id) == 0
    except OSError as error:
        log.error("attempt_uncount_unwritable", job=job_id, error=str(error),
                  message="the spool's disk would not take back the count of the job's "
                          "start at this stop: it stays in work/ with one start too many "
                          "counted (one crash fewer before it is not run again)")
        return False


def _free_worker(book: JobBook, worker: WorkerHandle, running: Running, now: float) -> None:
    """The worker no longer has the job's segment in hand (done, failed or lost)."""
    running.holder = None
    running.ready_since = now
    if running.job.id not in worker.jobs:
        return
    worker.jobs.remove(running.job.id)
    worker.segments_served += 1
    if worker.state == WorkerState.BUSY and not worker.jobs:
        worker.set_state(WorkerState.IDLE)
        book.freed.append(worker)  # the tick lets the pool recycle it if due


def _after_a_crash(book: JobBook, running: Running, crashes: int, reason: str) -> None:
    """The segment of a job whose worker died or hung: retried, or the job ends."""
    job = running.job
    timeout_s = policy.job_timeout_s(len(running.segments[running.done]), book.config.worker)
    what = f"hung (no progress for {timeout_s:g} s)" if reason == "job_timeout" else "died"
    if running.cancel_requested:
        book.end(running, None)
    elif crashes >= policy.MAX_ATTEMPTS or (job.stream and running.segment_chunks):
        # Chunks of the segment already streamed cannot be made again without
        # duplicating audio; a segment boundary can (the next worker starts there).
        book.end(running, JobError(ErrorCode.WORKER_CRASHED, f"the worker {what} while "
                                   f"synthesizing this job ({crashes} time(s)); it is not "
                                   "retried again"))
    else:
        log.warning("job_retry", job=job.id, crashes=crashes, reason=reason,
                    segment=running.done)
        running.retry = True
        running.segment_audio = []


class JobBook:
    def __init__(self, spool: Spool, encoder: Encoder, prepare: Callable[[Job], Job],
                 settings: Callable[[], Config]) -> None:
        self._ledger = Ledger()  # written here only; read through `records`
        self._spool = spool
        self._encoder = encoder
        self._prepare = prepare  # Job -> the job as a worker should see it (the cache's)
        self._settings = settings  # () -> Config
        self.host = ""  # this host's name in a cluster: a result's served_by
        self.closed: list[Closed] = []
        self.started_here: list[str] = []
        self.freed: list[WorkerHandle] = []
        self._encoding: dict[str, _Encoding] = {}
        self._held = diskwait.HeldStarts(spool)  # jobs whose start the disk refused
        self.unwritten = diskwait.UnwrittenOutcomes()  # outcomes it refused: retried
        # Reads a spool job again from work/ and queues it (the service's; None: none).
        self.remake: Callable[[Job], None] | None = None

    @property
    def config(self) -> Config:
        return self._settings()

    @property
    def records(self) -> LedgerView:
        """The jobs not ended and the recent outcomes, to read (status, stats, console)."""
        return self._ledger

    @property
    def writing(self) -> int:
        """Results being encoded: the daemon waits for them before it exits."""
        return len(self._encoding)

    def disk_waits(self) -> dict[str, int]:
        """What waits for room on the spool's disk (STATUS=, stats): outcomes, starts."""
        return {"outcomes": len(self.unwritten), "starts": len(self._held)}

    # -- admitting --------------------------------------------------------------------------
    def repeat(self, job: Job) -> None:
        """`job` waits to be played from the result cache (status: queued, cached)."""
        self._ledger.repeat(job)

    def admit(self, job: Job, sink: Sink, segments: list[str], persisted: bool) -> Running:
        """Queue `job`, its outcome bound to `sink` once and for all."""
        running = self._ledger.enqueue(job, segments, time.monotonic())
        running.sink, running.persisted = sink, persisted
        running.audio = ReplyAudio(self._spool.root)
        return running

    # -- dispatching ------------------------------------------------------------------------
    def dispatch(self, idle: dict[int, WorkerHandle], now: float, stopping: bool,
                 streams: int = 1) -> None:
        """Hand the next segments to the workers with room, in the scheduler's order.
        `streams`: the segments all ready workers make at once."""
        if not idle:
            return
        waiting = [w for w in self._ledger.waiting() if not self._held.waits(w.job_id, now)]
        if stopping:  # finish what is in progress; start nothing new
            waiting = [w for w in waiting if w.started]
        places = scheduler.places({slot: w.free_streams for slot, w in idle.items()},
                                  {slot: len(w.jobs) for slot, w in idle.items()})
        for choice in scheduler.assign(waiting, places, self._ledger.in_progress(),
                                       _max_active(self.config, streams),
                                       self._ledger.shares_in_progress(),
                                       self._ledger.last_turn):
            self._hand_segment(self._ledger.jobs[choice.job_id], idle[choice.slot], now)

    def _hand_segment(self, running: Running, worker: WorkerHandle, now: float) -> None:
        index = running.done
        if not running.counted and running.persisted:  # durable before it is in hand
            if not self._held.count(running.job.id, now):
                return  # a full disk: it stays queued, tried again after a backoff
            running.counted = True
        if not worker.send(RunSegment(self._prepare(running.job), index,
                                      len(running.segments), running.segments[index])):
            return  # the worker is gone; handled next tick, the job waits
        running.holder, running.last_slot, running.retry = worker, worker.slot, False
        self._ledger.turn_taken(running.job, now)
        running.dispatched = True
        running.last_progress = now
        running.segment_chunks = 0
        worker.jobs.append(running.job.id)
        worker.set_state(WorkerState.BUSY, job=running.job.id, segment=index)

    def progress(self, worker: WorkerHandle) -> tuple[float, int] | None:
        """The segments `worker` holds: the last progress of any and the longest one's
        length in characters (for the pool's job timeout), or None. A batched worker makes
        all of them in one loop, so any progress shows it is not hung."""
        held = self._ledger.held_by(worker)
        if not held:
            return None
        return (max(r.last_progress for r in held),
                max(len(r.segments[r.done]) for r in held))

    # -- the workers' messages --------------------------------------------------------------
    def on_worker_message(self, worker: WorkerHandle, message: FromWorker, now: float) -> None:
        running = self._ledger.get(getattr(message, "job_id", ""))
        if running is None or running.holder is not worker:
            return  # a late message of a job that has ended
        running.last_progress = now
        match message:
            case SegmentStarted() if not running.sample_rate:
                self.started_here.append(running.job.id)
                running.started_at = message.started_at
                running.voice, running.sample_rate = message.voice, message.sample_rate
                running.bound_sink.started(running.job, message.sample_rate)
            case AudioChunkReady():
                _on_chunk(running, message)
            case SegmentFinished():
                self._on_segment_done(worker, running, message, now)
            case JobFailed(_job_id, error):
                _free_worker(self, worker, running, now)
                self.end(running, error)
            case JobCancelled():
                _free_worker(self, worker, running, now)
                self.end(running, None)

    def _on_segment_done(self, worker: WorkerHandle, running: Running,
                         message: SegmentFinished, now: float) -> None:
        running.done += 1
        running.samples += message.samples
        running.synth_s += message.synth_s
        if running.done == 1:
            running.first_chunk_s = message.first_chunk_s
        if message.stages is not None:
            running.stages.append(message.stages)
        running.made.append(captions.SegmentAudio(running.segments[message.index],
                                                  message.samples, message.words))
        _free_worker(self, worker, running, now)
        chunks, running.segment_audio = running.segment_audio, []
        if not self.keep(running, chunks):
            return
        if running.cancel_requested:  # asked after its last chunk: still cancelled
            self.end(running, None)
        elif running.done == len(running.segments):
            self.finish(running)

    def keep(self, running: Running, chunks: list[Samples]) -> bool:
        """A whole reply's finished audio, kept until the job ends (on disk where it is
        long); False if the disk refused it, and the job ended with the error."""
        try:
            running.reply_audio.add(chunks)
        except OSError as error:
            self.end(running, JobError(ErrorCode.INTERNAL, "could not keep the audio made so "
                                       f"far on the spool's disk: {error}"))
            return False
        return True

    def lost(self, worker: WorkerHandle, reason: str, now: float) -> None:
        """The worker holding segments died or was killed: retry each, or end its job."""
        for running in self._ledger.held_by(worker):
            _free_worker(self, worker, running, now)
            _after_a_crash(self, running, self._ledger.count_crash(running.job), reason)

    # -- asking and telling -----------------------------------------------------------------
    def cancel(self, job_id: str, identity: Identity = LOCAL_ADMIN) -> bool:
        running = self._ledger.get(job_id)
        if running is None or not identity.may_see(running.job.owner):
            return False
        if running.holder is None:  # queued, or between two segments
            self.end(running, None)
        elif not running.cancel_requested:
            running.cancel_requested = True
            running.holder.send(CancelJob(job_id))
        return True

    # -- the cluster's side (sharing.py): what it reads and changes of the jobs -------------
    def get(self, job_id: str) -> Running | None:
        """A job not ended, to read."""
        return self._ledger.get(job_id)

    def shared(self) -> list[Running]:
        """The jobs received here that wait on the cluster's stream (`remote`)."""
        return [running for running in self._ledger.jobs.values() if running.remote]

    def room(self, idle: int) -> tuple[int, int]:
        """What this host can take from the cluster: (`idle` places less the jobs here
        waiting to start, jobs more that this host's turns have room for)."""
        here = [running for running in self._ledger.jobs.values() if not running.remote]
        waiting = sum(1 for running in here if not running.started)
        return (idle - waiting,
                self.config.scheduling.max_active_jobs - len(here) if not waiting else 0)

    def mark_remote(self, running: Running) -> None:
        """The job went onto the cluster's stream: its events come from another host."""
        running.remote = True

    def remote_started(self, running: Running, host: str, sample_rate: int) -> None:
        """`host` started a job of this host's (or, having taken it over, goes on with it)."""
        first = not running.served_by
        running.served_by = host
        running.last_progress = time.monotonic()
        if first:
            running.dispatched, running.started_at = True, time.time()
            running.sample_rate = sample_rate
            running.bound_sink.started(running.job, sample_rate)

    def remote_chunk(self, running: Running, samples: Samples) -> None:
        """The next streamed chunk of a job of this host's that another host serves."""
        running.bound_sink.chunk(running.job, running.chunks_sent, samples)
        running.chunks_sent += 1
        running.last_progress = time.monotonic()

    def release(self, running: Running) -> bool:
        """The daemon stops: the job leaves this host's book with no outcome here (the
        cluster, or the inbox, has it now). True if a persisted job may go back to the
        inbox: one that took the daemon down stays in work/ with its count (handed back,
        it is claimed under a new id: a new job to the poison rule). A stop is no crash:
        this life's start of the job is not counted."""
        job_id = running.job.id
        self._leave(running)
        if not running.persisted:
            return True
        if running.counted:  # (not one served by another host: started, never counted)
            return _uncounted(self._spool, job_id)
        return self._spool.attempts_of(job_id) == 0

    def serve_here(self, running: Running) -> None:
        """A job of this host's that was on the cluster's stream is served here after all."""
        running.remote = False
        running.reply_audio.discard()  # parts of another host's audio, if any came
        if running.served_by:  # started elsewhere, taken back: it starts again here
            running.served_by, running.dispatched, running.sample_rate = "", False, 0

    def finish_remote(self, running: Running, event: clusterwire.Event) -> None:
        """A job received here made by another host, its audio (a whole reply's) kept as
        its parts came (`keep`)."""
        detail = event.detail
        running.voice, running.sample_rate = detail["voice"], detail["sample_rate"]
        running.samples, running.synth_s = detail["samples"], detail["synth_s"]
        running.first_chunk_s = detail["first_chunk_s"]
        running.started_at = detail["timings"].get("started_at", running.started_at)
        running.served_by = event.sender
        running.done = len(running.segments)
        self.finish(running)

    # -- ending -----------------------------------------------------------------------------
    def finish(self, running: Running) -> None:
        """The job's audio is complete: deliver it through its sink."""
        self._ledger.pop(running.job.id)
        job, result = running.job, _result_of(running, self.host)
        timings = _timings_of(running, result)
        written = time.monotonic()
        sink = running.bound_sink
        try:  # (the audio kept on disk is read back, then written)
            made = running.reply_audio.take(result.sample_rate)
            output = sink.deliver(job, result, made, timings)
        except OSError as error:
            self._leave(running)
            self._result_refused(job, sink, error, (running.persisted, running.counted))
            return
        served = {"served_by": result.served_by} if result.served_by else {}
        self.delivered(job, sink, output, result, made=(running.persisted, running.counted),
                       status=served, summary=served | {
            "voice": result.voice, "chars": job.chars, "segments": len(running.segments),
            "audio_s": round(result.audio_s, 3), "synth_s": round(result.synth_s, 3),
            "queue_wait_s": timings["queue_wait_s"], "first_chunk_s": timings["first_chunk_s"],
            "write_s": round(time.monotonic() - written, 4)} | _stage_summary(result))

    def delivered(self, job: Job, sink: Sink, output: str | Deferred, result: JobResult, *,
                  status: dict[str, Any], summary: dict[str, Any],
                  made: tuple[bool, bool] = (False, False)) -> None:
        """A job's audio went to its sink: it is done, or its file is being encoded (in
        the encoder process; `drain_encoded` finishes it)."""
        if isinstance(output, Deferred):
            self._encoder.submit(job.id, output.audio, output.format, output.staging)
            self._encoding[job.id] = _Encoding(job, sink, output, result, status, summary,
                                               time.monotonic(), made)
            self._ledger.writing(job)
            return
        self.close(job, "done", result=result, status=status | {"output": output},
                   **(summary | {"output": output}))

    def encoding_bytes(self) -> int:
        """The audio of finished jobs whose files the encoder has yet to make."""
        return self._encoder.backlog_bytes()

    def drain_encoded(self, now: float) -> None:
        """Publish the files the encoder finished; a file it could not make fails its job
        (encode_failed), and the daemon goes on. Outcomes the disk refused are tried again."""
        self.unwritten.retry_due(now)
        for encoded in self._encoder.completed():
            pending = self._encoding.pop(encoded.key, None)
            if pending is None:
                continue
            job = pending.job
            if encoded.error is not None and encoded.error.code == ErrorCode.INTERNAL:
                # (the encoder's one INTERNAL: its staged file refused by the disk)
                self._result_refused(job, pending.sink, encoded.error.message, pending.made)
                continue
            if encoded.error is not None or encoded.data is None:
                self.end_unqueued(job, pending.sink, encoded.error or JobError(
                    ErrorCode.ENCODE_FAILED, "the encoder returned nothing"))
                continue
            try:
                output = pending.deferred.publish(encoded.data)
            except OSError as error:
                self._result_refused(job, pending.sink, error, pending.made)
                continue
            summary = pending.summary | {"encode_s": round(now - pending.since, 4)}
            self.delivered(job, pending.sink, output, pending.result, status=pending.status,
                           summary=summary)

    def abandon_unwritten(self, unplayed: list[tuple[Job, Sink]]) -> None:
        """The daemon stops with results not written yet (its drain deadline passed): those
        still being encoded, and `unplayed` repeats from the cache. A reply's client is told
        to ask again; a drop-folder job stays in work/ and is made again at the next start."""
        unwritten = [*((p.job, p.sink) for p in self._encoding.values()), *unplayed]
        self._encoding.clear()
        for job, sink in unwritten:
            if job.sink == SINK_REPLY:
                self.end_unqueued(job, sink, JobError(
                    ErrorCode.SHUTTING_DOWN, "the daemon stopped before this result was "
                    "written; send the request again"))

    def _result_refused(self, job: Job, sink: Sink, error: OSError | str,
                        made: tuple[bool, bool]) -> None:
        """A result the spool's disk refused: a spool job waits (running, writing) and is
        read again from work/ and made again once the disk has room (`remake`; its audio
        is not held meanwhile: bounded memory); a reply's client is told."""
        persisted, counted = made  # (another host's spool job is not in work/ here)
        if not persisted or job.sink != SINK_SPOOL or self.remake is None:
            why = error if isinstance(error, str) else f"could not write the result: {error}"
            self.end_unqueued(job, sink, JobError(ErrorCode.INTERNAL, why))
            return
        if counted:  # made again in this life: its start is counted again then
            _uncounted(self._spool, job.id)
        self._ledger.writing(job)
        self.unwritten.hold(job.id, partial(self.remake, job), error, time.monotonic())

    def end_unqueued(self, job: Job, sink: Sink, error: JobError | None) -> None:
        """`end` for a job with no place in the queue: its file being encoded, or a repeat
        from the result cache."""
        self.end(Running(job, [], time.monotonic(), sink=sink), error)

    def end(self, running: Running, error: JobError | None) -> None:
        """Record a job that ends without audio: failed with `error`, or cancelled (None).
        An outcome the spool's disk refuses waits (its status: being written) and is
        written once the disk has room (`drain_encoded` tries it again)."""
        self._leave(running)
        self._write_outcome(running.job, running.bound_sink, error)

    def _write_outcome(self, job: Job, sink: Sink, error: JobError | None) -> None:
        try:
            if error is None:
                sink.cancelled(job)
            else:
                where = sink.fail_job(job, error)
        except OSError as failure:
            self._ledger.writing(job)
            self.unwritten.hold(job.id, partial(self._write_outcome, job, sink, error),
                                failure, time.monotonic())
            return
        if error is None:
            self.close(job, "cancelled", chars=job.chars)
            return
        self.close(job, "failed", status={"error": error.to_dict()}, chars=job.chars,
                   code=str(error.code), message=error.message, failed=where)

    def _leave(self, running: Running) -> None:
        """The job leaves the book without its audio: any it made goes now."""
        self._ledger.pop(running.job.id)
        self._held.forget(running.job.id)
        if running.audio is not None:
            running.audio.discard()

    def waits_for_disk(self, job_id: str, source: str, owner: str,
                       retry: Callable[[], None], error: OSError) -> None:
        """A job refused before it was queued whose record the disk refused: being written
        (status), and `retry` writes it once the disk has room (`rejected` then)."""
        self._ledger.writing(Job(job_id, source, job_id, "", owner=owner))
        self.unwritten.hold(job_id, retry, error, time.monotonic())

    def rejected(self, job_id: str, source: str, owner: str, error: JobError,
                 where: str) -> None:
        """A job refused before it was queued (a dropped file that is not a valid job)."""
        self._ledger.record(job_id, source, "failed", owner, error=error.to_dict())
        self.unwritten.written(job_id)
        self.closed.append(Closed(job_id, source, "failed", None, owner, 0))
        log.info("job", job=job_id, source=source, outcome="failed", code=str(error.code),
                 message=error.message, failed=where)

    def undelivered(self, job_id: str, source: str) -> bool:
        """The job ended done, but its client did not get the whole reply: it left, it
        stopped reading, or the rest could not be encoded (the intake logged which)."""
        counted = self._ledger.undelivered(job_id)
        if counted:
            log.warning("reply_undelivered", job=job_id, source=source,
                        message="the audio was made, but the client did not get all of it")
        return counted

    def close(self, job: Job, outcome: str, *, status: dict[str, Any] | None = None,
              result: JobResult | None = None, **summary: Any) -> None:
        """A job has ended: remember it for `status`, and log its one summary line."""
        self._ledger.record(job.id, job.source, outcome, job.owner, **(status or {}))
        self.unwritten.written(job.id)  # (the disk took it: any outcomes waiting follow)
        self.closed.append(Closed(job.id, job.source, outcome, result, job.share,
                                  int(summary.get("chars", job.chars))))
        log.info("job", job=job.id, source=job.source, outcome=outcome, **summary)
