"""The one service every intake sees: the same admission, limits, answers and catalog,
whether a job came by drop folder, ZeroMQ, HTTP, Wyoming or another host.

It holds the engine's catalog (catalog.py: voices, features, native rate, and the voices
clients register), decides admission
(admission.py: stopping, a full queue, the anonymous clients' part of it, each client's
requests in flight, an unknown voice), puts each job in front of the result
cache and into the job book with its sink bound, shares it with the cluster, and answers
`status`, `cancel` and `stats` for the jobs a client may see. The drop folder's claims come
in here too. It is also what the cluster's sharing needs of this host (`sharing.Host`).
"""

from __future__ import annotations

import errno
import hmac
import json
import queue
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from cosyvoiced import admission, clients, diskwait, logs, roster
from cosyvoiced import segments as text_segments
from cosyvoiced.admission import InFlight, PerClient
from cosyvoiced.catalog import Catalog
from cosyvoiced.clients import LOCAL_ADMIN, Identity
from cosyvoiced.config import Config
from cosyvoiced.encoding import Encoder
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake import http as http_intake
from cosyvoiced.intake import wyoming as wyoming_intake
from cosyvoiced.intake import zmq as zmq_intake
from cosyvoiced.intake.inbox import SOURCE as INBOX_SOURCE
from cosyvoiced.intake.inbox import InboxIntake
from cosyvoiced.intake.tickbudget import TickBudget, in_turn
from cosyvoiced.job import (
    SINK_REPLY,
    Deferred,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    ResultAudio,
    Samples,
    Sink,
)
from cosyvoiced.jobs import JobBook
from cosyvoiced.jobspec import Limits, build_job
from cosyvoiced.ledger import LedgerView, Running
from cosyvoiced.messages import EngineReady
from cosyvoiced.metrics import Metrics
from cosyvoiced.policy import MAX_ATTEMPTS
from cosyvoiced.pool import WorkerPool
from cosyvoiced.repeats import Repeats
from cosyvoiced.resultcache import ResultCache
from cosyvoiced.roster import Roster
from cosyvoiced.sharing import Sharing
from cosyvoiced.speakers import SpeakerStore
from cosyvoiced.spool import Claimed, Spool

CLAIM_RETRY_S = 1.0  # a claim that failed for want of descriptors or memory is retried
CLAIM_RETRIES = 60  # ...this many times before it fails as unreadable
# Drop-folder files read, parsed and queued in one tick, at most: a folder of 1,500 long
# texts, admitted at once, held the tick for 83 s (past WatchdogSec, every client waiting).
# Within the tick's one budget for every intake too (tickbudget.py): 16 texts slow to split
# (20,000 characters of one-character sentences) held one tick 1.1 s.
CLAIMS_PER_TICK = 16
# Drop-folder jobs queued (read, parsed, waiting to start) at most: each holds its text and
# segments (about 45 KB for 20,000 characters). More claimed files wait in work/, unread,
# and are admitted in order as these start: a folder of 100,000 files costs no memory.
MAX_QUEUED_DROPS = 256
# Audio waiting for the encoder process (and repeats about to be played to it), at most,
# before more drops are read: results from the cache come out as fast as files are read
# (16 copies of one long cached text as 48 kHz files held 1.2 GB in the supervisor at once).
MAX_ENCODING_BYTES = 256 << 20
HELD_BACK = (f"more drops are claimed (in work/) than are queued ({MAX_QUEUED_DROPS} at most) "
             f"or than the encoder has room for ({MAX_ENCODING_BYTES >> 20} MiB of audio); "
             "each is read as room comes")
# Errors of this process's state (descriptors, memory), not of the file: they pass.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                              errno.EINTR, errno.ENOBUFS})

log = logs.get_logger("cosyvoiced.supervisor")


class Intakes:
    """The four intakes: what they took in, and the sinks of their jobs."""

    def __init__(self, inbox: InboxIntake, zmq: zmq_intake.ZmqIntake,
                 http: http_intake.HttpIntake, wyoming: wyoming_intake.WyomingIntake,
                 in_flight: InFlight) -> None:
        self.inbox, self.zmq, self.http, self.wyoming = inbox, zmq, http, wyoming
        self.in_flight = in_flight  # each client's requests in flight, whichever intake's
        self._turn = 0  # which intake takes first from this tick's budget

    @classmethod
    def build(cls, settings: Callable[[], Config], spool: Spool,  # noqa: PLR0917
              claims: queue.SimpleQueue[Claimed], wake: Callable[[], None], encoder: Encoder,
              limits: Callable[[], Limits]) -> Intakes:
        """The four intakes of a daemon, reading their settings live (SIGHUP), with the
        one count of requests in flight (the ZeroMQ intake ends its requests itself)."""
        in_flight = InFlight()
        return cls(InboxIntake(spool, claims, wake),
                   zmq_intake.ZmqIntake(settings().zmq, limits, wake, encoder.read_prompt,
                                        in_flight),
                   http_intake.HttpIntake(lambda: settings().http, wake, encoder),
                   wyoming_intake.WyomingIntake(lambda: settings().wyoming, wake), in_flight)

    def take_inbound(self, service: Service, now: float) -> None:
        """The drop folder's claims and the network intakes' messages into `service`, each
        in its turn at the tick's one budget (tickbudget.py)."""
        takers = [partial(service.admit_claims, now), *(partial(intake.handle_inbound, service)
                                                        for intake in (self.http, self.wyoming,
                                                                       self.zmq))]
        budget = TickBudget()
        for take in in_turn(takers, self._turn):
            take(budget)
        self._turn += 1

    def all(self) -> tuple[InboxIntake, zmq_intake.ZmqIntake, http_intake.HttpIntake,
                           wyoming_intake.WyomingIntake]:
        return self.inbox, self.zmq, self.http, self.wyoming

    def sink_of(self, job: Job) -> Sink:
        if job.sink != SINK_REPLY:
            return self.inbox
        return {http_intake.SOURCE: self.http,
                wyoming_intake.SOURCE: self.wyoming}.get(job.source, self.zmq)


class Service:
    def __init__(self, settings: Callable[[], Config], *, spool: Spool, book: JobBook,
                 cache: ResultCache, speakers: SpeakerStore, metrics: Metrics,
                 intakes: Intakes, claims: queue.SimpleQueue[Claimed],
                 wake: Callable[[], None]) -> None:
        self._settings = settings
        self.spool, self.book, self.cache, self.speakers = spool, book, cache, speakers
        self.metrics, self.intakes, self.wake = metrics, intakes, wake
        self.in_flight = intakes.in_flight  # each client's requests, counted for admission
        self.repeats = Repeats()  # found in the result cache, played at `settle`
        config = settings()
        self.limits = _limits(config)
        self.sharing: Sharing | None = None  # set once built: it is given this service
        self.roster: Roster | None = None  # the cluster's hosts (start_cluster)
        self.pool: WorkerPool | None = None  # the workers (set by the supervisor), read here
        self.ready = False
        self.stopping = False
        self.catalog = Catalog(config.engine.name, speakers,
                               lambda: self.config.engine.cosyvoice, cache.voices_changed)
        self.admin_token = ""
        # The daemon's figures, with the job ids `identity` may see (set by the supervisor).
        self.report: Callable[[Identity], dict[str, Any]] = lambda _identity: {}
        self.claims = claims  # the drop folder's, posted by its inotify thread
        self.claim_retries: list[tuple[float, int, Claimed]] = []  # (due, tries, claim)
        self.recovering: set[str] = set()  # jobs left in work/, not admitted: see sharing.py
        self._drops_held_back = False  # claims wait for room in the queue (logged once)
        # A spool job whose result the disk refused is read again from work/ and queued (as
        # at the next start): made again, not failed for want of disk.
        book.remake = lambda job: self.claim(Claimed(job.origin), time.monotonic())

    def idle(self) -> int:
        """Segments the workers could start now (a batched worker has several places)."""
        return 0 if self.pool is None else self.pool.free_places()

    def record_misses(self) -> bool:
        """Cache misses are recorded unless an engine reload is pending."""
        return self.pool is None or not self.pool.reload_pending

    @property
    def config(self) -> Config:
        return self._settings()

    @property
    def ledger(self) -> LedgerView:
        """The job book's records, to read (only the book writes them)."""
        return self.book.records

    @property
    def voices(self) -> list[VoiceInfo]:
        return self.catalog.voices

    @property
    def engine_name(self) -> str:
        return self.catalog.engine_name

    @property
    def engine_features(self) -> frozenset[str]:
        return self.catalog.features

    @property
    def native_rate(self) -> int:
        return self.catalog.native_rate

    @property
    def cluster(self) -> Sharing:
        assert self.sharing is not None, "the service is built with its sharing"
        return self.sharing

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (SIGHUP): every intake's limits, the cache, ZeroMQ's keys."""
        self.limits = _limits(config)
        self.cache.configure(config)  # a changed engine or model invalidates entries
        self.intakes.zmq.settings = config.zmq
        self.intakes.zmq.reload_keys()  # authorized client keys may have changed on disk

    # -- the cluster: its job threads (sharing.py) and its roster of hosts (roster.py) -----
    def start_cluster(self) -> None:
        self.cluster.start()
        self.roster = roster.of_cluster(self.cluster)
        if self.roster is not None:
            self.roster.start()

    def stop_cluster(self) -> None:
        """After the outcomes of the jobs served for others have gone: this host says it
        stopped last."""
        self.cluster.stop()
        if self.roster is not None:
            self.roster.stop(self._host_figures())

    def roster_note(self, now: float) -> None:
        """This host's state and figures, for the other hosts' consoles (each tick)."""
        if self.roster is not None:
            state = "stopping" if self.stopping else "ready" if self.ready else "starting"
            self.roster.note(now, state, self._host_figures)

    def service_report(self, now: float) -> tuple[dict[str, Any] | None, str]:
        """What the pool and the ledger do not say: the cluster's figures (`stats`), and the
        service's part of STATUS= (the cluster's, what waits for the disk, another live host
        of this host's name)."""
        figures = self.cluster.figures()
        status = self.cluster.status() + diskwait.status_note(self.book.disk_waits())
        clash = None if self.roster is None else self.roster.name_clash(now)
        if figures is None or clash is None:
            return figures, status
        return figures | {"name_taken": clash}, f"{status}; {clash}"

    def _host_figures(self) -> dict[str, Any]:
        workers = 0 if self.pool is None else len(self.pool.workers())
        return roster.host_figures(self.ledger, engine=self.engine_name, workers=workers,
                                   idle=self.idle(), for_others=len(self.cluster.sinks))

    def settle(self) -> None:
        """What the job book recorded, to the parts that act on it: a closed job's prompts,
        its cluster entries and its metrics; a started one's delivery count. The cache's hits
        are played first: their jobs close here too."""
        _play_hits(self.repeats, self.cache, self.book, self.sink_of)
        closed, self.book.closed = self.book.closed, []
        for job in closed:
            self.spool.discard_prompts(job.job_id)  # a reply job's; a spool job's settled
            self.cluster.ended(job.job_id)
            self.metrics.job_ended(job.source, job.outcome, job.result, job.share, job.chars)
        started, self.book.started_here = self.book.started_here, []
        for job_id in started:
            self.cluster.started_here(job_id)

    # -- admission --------------------------------------------------------------------------
    def queue_full(self) -> bool:
        """Stopping, or the queue is full: not even a client with a key is admitted. Jobs
        waiting to start are bounded here; those in progress by the scheduler."""
        return self.refusal(LOCAL_ADMIN) is not None

    def refusal(self, identity: Identity,
                per_client: PerClient | None = None) -> JobError | None:
        """The one admission rule of every intake, before a job is queued (admission.py);
        `per_client`: the intake's bound on this client's requests in flight."""
        return admission.refusal(identity, self.ledger, stopping=self.stopping,
                                 max_pending=self.config.zmq.max_pending,
                                 in_flight=self.in_flight, per_client=per_client)

    def check_voice(self, voice: Any) -> None:
        """A voice the engine does not have is refused up front, by every intake alike."""
        error = admission.unknown_voice(voice, self.voices)
        if error is not None:
            raise JobFailure(error.code, error.message, error.field)

    def sink_of(self, job: Job) -> Sink:
        """The job's intake (or the host that sent it); for a cache miss, with the cache's
        recorder in front."""
        remote = self.cluster.sinks.get(job.id)
        sink = remote if remote is not None else self.intakes.sink_of(job)
        if remote is None and _has_sent_prompt(job):
            sink = _SentPromptSink(sink, self.spool)
        return self.cache.sink(job, sink)

    def enqueue(self, job: Job, share: bool = True) -> None:
        """Queue a job: from the cache if it is a repeat (played at `settle`, never back into
        the intake that is queueing it), on the cluster's shared stream if there is one and
        no worker here is free, else here."""
        entry = self.cache.find(job, record=self.record_misses())
        if entry is not None and self.repeats.keep(job, entry):
            self.book.repeat(job)
            return
        settings = self.config.scheduling
        segments = text_segments.split(job.text, settings.max_segment_chars,
                                       settings.first_segment_words if job.stream else 0,
                                       settings.pack_segment_chars)
        persisted = job.sink != SINK_REPLY and job.id not in self.cluster.sinks
        running = self.book.admit(job, self.sink_of(job), segments, persisted)
        shared = share and self.cluster.share(running)
        log.debug("job_queued", job=job.id, source=job.source, segments=len(segments),
                  depth=len(self.ledger), shared=shared)

    def submit(self, fields: dict[str, Any], job_id: str, prompt: bytes | None,
               identity: Identity = LOCAL_ADMIN) -> Job:
        """Validate a job for the outbox, persist it in work/ (it survives a crash), queue it.

        Prompt audio is kept in prompts/ first, named in the persisted job as if it had been
        dropped in the inbox, so a restart finds it.
        """
        name = f"{job_id}.json"
        job = build_job(fields, job_id=job_id, source=zmq_intake.SOURCE,
                        origin=Claimed.named(job_id, name).work_name, default_output=job_id,
                        limits=self.limits, known=zmq_intake.SUBMIT_FIELDS)
        self.check_prompt(prompt)
        if prompt is not None:
            fields = fields | {"prompt_audio": _prompt_name(job_id)}
            job = replace(job, prompt_audio=self.keep_prompt(job_id, prompt))
        self.spool.write_claimed(job_id, name, json.dumps(fields).encode())
        job = identity.stamp(job)
        self.enqueue(job)
        return job

    def check_prompt(self, prompt: bytes | None) -> None:
        """Prompt audio for an engine that cannot clone is refused up front, before a byte
        of it is written: the one rule of every intake (ZeroMQ, HTTP, Wyoming). Before the
        engine is ready its features are not known (none yet, a CosyVoice daemon's too):
        the worker decides, as it does for a voice (admission.unknown_voice)."""
        if prompt is not None and self.ready and "prompt_audio" not in self.engine_features:
            raise JobFailure(ErrorCode.NOT_SUPPORTED, f"prompt_audio: the {self.engine_name} "
                             "engine cannot clone voices", "prompt_audio")

    def keep_prompt(self, job_id: str, prompt: bytes) -> str:
        return str(self.spool.write_prompt(job_id, _prompt_name(job_id), prompt))

    # -- the drop folder's claims -----------------------------------------------------------
    def admit_claims(self, now: float, budget: TickBudget) -> None:
        """Claimed drop-folder files, read and queued within the tick's budget (and at most
        CLAIMS_PER_TICK of them); claims that failed for want of descriptors, when due."""
        retries, self.claim_retries = self.claim_retries, []
        for due, tries, claimed in retries:
            if due > now:
                self.claim_retries.append((due, tries, claimed))
            else:
                self.claim(claimed, now, tries)
        room = MAX_QUEUED_DROPS - self._queued_drops()
        for _ in range(min(CLAIMS_PER_TICK, room)):
            if budget.spent or self._encoder_full():
                break
            try:
                claimed = self.claims.get_nowait()
            except queue.Empty:
                return
            self.claim(claimed, now)
            budget.spend(None)  # its text is counted by the clock (split on the tick)
        held_back = (room <= 0 or self._encoder_full()) and not self.claims.empty()
        if held_back and not self._drops_held_back:
            log.info("drops_held_back", queued=self._queued_drops(), message=HELD_BACK)
        self._drops_held_back = held_back

    def _encoder_full(self) -> bool:
        """The encoder's backlog, with the repeats this tick will play into it, is full."""
        return self.book.encoding_bytes() + self.repeats.played_bytes() >= MAX_ENCODING_BYTES

    def _queued_drops(self) -> int:
        """Claimed jobs waiting to start (_admit), and outcomes waiting for the disk (20,000
        invalid drops on a full disk were all claimed and held: 70 -> 92 MiB)."""
        return self.ledger.unstarted_of(clients.INBOX) + len(self.book.unwritten)

    def deadlines(self) -> list[float]:
        """When claims that failed for want of descriptors are due again; at once, while
        claims are left for the next tick and there is room to queue them."""
        more = not self.claims.empty() and self._queued_drops() < MAX_QUEUED_DROPS \
            and not self._encoder_full()
        return [due for due, _tries, _claimed in self.claim_retries] + (
            [0.0] if more or self.repeats.more_now() else [])

    def claim(self, claimed: Claimed, now: float, tries: int = 0) -> None:
        recovering = claimed.job_id in self.recovering
        self.recovering.discard(claimed.job_id)  # admitted, failed or handed back: settled
        if self.stopping:
            # One a crash left in work/ stays there, unread: the next start checks whether
            # it ended before the crash (its record written, its file not yet released);
            # handed back to the inbox, it would run again (and its crashes be forgotten).
            if not recovering:
                self.hand_back(claimed)
            return
        try:
            self._admit(claimed)
        except OSError as error:
            if error.errno in TRANSIENT_ERRNOS and tries < CLAIM_RETRIES:
                log.warning("claim_retry", work_name=claimed.work_name, error=str(error),
                            tries=tries + 1)
                self.claim_retries.append((now + CLAIM_RETRY_S, tries + 1, claimed))
                if recovering:
                    self.recovering.add(claimed.job_id)
            else:
                log.error("claim_unreadable", work_name=claimed.work_name, error=str(error))
                self._reject(claimed, JobError(ErrorCode.UNREADABLE,
                                               f"the job file could not be read: {error}"))

    def _admit(self, claimed: Claimed) -> None:
        """Parse and queue a claimed job; OSError if it cannot be read now."""
        self.spool.max_prompt_bytes = self.config.http.max_upload_bytes  # as an upload's
        try:
            job = self.intakes.inbox.admit(claimed, self.limits,
                                           self.config.spool.max_file_bytes)
        except JobFailure as failure:
            self._reject(claimed, failure.error)
            return
        if job is None:
            return
        attempts = self.spool.attempts_of(job.id)
        if attempts >= MAX_ATTEMPTS:
            log.critical("daemon_crashed_on_job", job=job.id, attempts=attempts,
                         message="the daemon died each time this job was in hand")
            self._reject(claimed, JobError(
                ErrorCode.DAEMON_CRASHED, f"the daemon died {attempts} times while this job "
                "was in hand; it is not run again (send it again to retry)"))
            return
        if not job.owner:  # a dropped file (or a `submit` recovered from work/)
            job = clients.drop_folder().stamp(job)
        self.enqueue(job)

    def _reject(self, claimed: Claimed, error: JobError) -> None:
        """A drop-folder file that is not a valid job: failed/ and counted, never dropped."""
        try:
            _discard_sent_prompt(self.spool, claimed.job_id)  # a recovered `submit`'s
            where = self.intakes.inbox.fail(claimed, error)
        except OSError as failure:
            self.book.waits_for_disk(claimed.job_id, INBOX_SOURCE, clients.INBOX,
                                     partial(self._reject, claimed, error), failure)
            return
        self.book.rejected(claimed.job_id, INBOX_SOURCE, clients.INBOX, error, where)

    def hand_back(self, claimed: Claimed) -> None:
        if not self.spool.hand_back(claimed):
            log.warning("hand_back_deferred", work_name=claimed.work_name,
                        message="the inbox has a new file of its name, or its prompt could "
                                "not be made its submitter's again (the daemon is not root); "
                                "the job stays in work/ and runs at the next start")

    def recover(self) -> None:
        """At start: the jobs a crash left in work/ are claimed again, what the crash left
        half done is cleaned up, and voices stored the old way are upgraded."""
        left = self.spool.claimed()
        if left:
            log.info("recovering", jobs=len(left))
        _clean_up_after_crash(self.spool, self.speakers)
        _upgrade_speakers(self.speakers)
        for claimed in left:  # admitted by the ticks, as new drops are (admit_claims)
            self.claims.put(claimed)
        self.recovering.update(claimed.job_id for claimed in left)

    def release(self, running: Running) -> None:
        """The daemon stops before this job ran here (or ended, at the drain's deadline):
        the cluster takes it, a client is told to ask again, a spool job goes back to the
        inbox (one that took the daemon down stays in work/: `JobBook.release`)."""
        job = running.job
        if self.cluster.release(running):
            return
        if job.sink == SINK_REPLY:
            self.book.end(running, JobError(ErrorCode.SHUTTING_DOWN,
                                            "the daemon is stopping; send the request again"))
        elif self.book.release(running):
            self.hand_back(Claimed(job.origin))

    def drain(self, deadline_passed: bool) -> set[int] | None:
        """Stopping: jobs not started here are released at once; None while the jobs in
        progress (and the files being written) may still finish; else the generations of
        the workers whose jobs were abandoned at the deadline."""
        for running in list(self.ledger.jobs.values()):
            if not running.started or running.remote:
                self.release(running)
        left = list(self.ledger.jobs.values())
        if (left or self.book.writing or self.repeats) and not deadline_passed:
            return None
        self.book.abandon_unwritten([(r.job, self.sink_of(r.job))
                                     for r in self.repeats.take_all()])
        abandoned = set()
        for running in left:
            log.warning("drain_timeout", job=running.job.id, **running.progress())
            if running.holder is not None:
                abandoned.add(running.holder.generation)
            self.release(running)
        return abandoned

    # -- the catalog ------------------------------------------------------------------------
    def engine_ready(self, message: EngineReady) -> bool:
        """A worker has loaded the engine: its catalog is ours. True for the first one."""
        self.catalog.take(message)
        first, self.ready = not self.ready, True
        if first:
            self.metrics.ready.set(1)
        return first

    # -- what a client may see and do -------------------------------------------------------
    def is_admin_token(self, token: Any) -> bool:
        # A client's token may hold what UTF-8 cannot encode (a lone surrogate): not ours.
        return isinstance(token, str) and bool(self.admin_token) and \
            hmac.compare_digest(token.encode(errors="replace"), self.admin_token.encode())

    def visible(self, job_id: str, identity: Identity = LOCAL_ADMIN) -> bool:
        """May `identity` see this job? Another client's job is as if unknown."""
        owner = self.ledger.owner_of(job_id)
        return owner is not None and identity.may_see(owner)

    def job_status(self, job_id: str, identity: Identity = LOCAL_ADMIN) -> dict[str, Any] | None:
        return self.ledger.status(job_id) if self.visible(job_id, identity) else None

    def cancel(self, job_id: str, identity: Identity = LOCAL_ADMIN) -> bool:
        repeat = self.repeats.cancel(job_id, identity)
        if repeat is not None:  # not played yet: it ends here, as a queued job would
            self.book.end_unqueued(repeat, self.sink_of(repeat), None)
        return repeat is not None or self.book.cancel(job_id, identity)

    def undelivered(self, job_id: str, source: str) -> None:
        if self.book.undelivered(job_id, source):
            self.metrics.replies_undelivered.labels(source).inc()

    def stats(self, identity: Identity = LOCAL_ADMIN) -> dict[str, Any]:
        return self.report(identity) | {"waiting_for_disk": self.book.disk_waits()}

    # -- what the cluster asks of this host (sharing.Host) ---------------------------------
    def idle_workers(self) -> int:
        return self.idle()

    def enqueue_here(self, job: Job) -> None:
        """Another host's job, taken from the shared stream."""
        self.enqueue(job, share=False)


def _limits(config: Config) -> Limits:
    """What every intake checks a job's text against."""
    return Limits(config.spool.max_text_chars, config.spool.default_format,
                  config.spool.normalize)


def _play_hits(repeats: Repeats, cache: ResultCache, book: JobBook,
               sink_of: Callable[[Job], Sink]) -> None:
    """The repeats queued since the last tick, served from the result cache, no worker,
    within the tick's time and the encoder's room for them (repeats.py)."""
    for repeat in repeats.due(book.encoding_bytes, MAX_ENCODING_BYTES):
        job, sink = repeat.job, sink_of(repeat.job)
        try:
            served = cache.play(job, sink, repeat.entry, repeat.found)
        except OSError as error:  # the sink could not write the result
            book.end_unqueued(job, sink, JobError(ErrorCode.INTERNAL,
                                                  f"could not write the result: {error}"))
            continue
        summary = {k: v for k, v in served.summary.items() if k != "output"}
        book.delivered(job, sink, served.output, served.result, status={"cached": True},
                       summary=summary)


def _clean_up_after_crash(spool: Spool, speakers: SpeakerStore) -> None:
    """What a crash left half done: prompts of no job, temp files, attempt counts of jobs
    that ended."""
    orphans = spool.discard_orphan_prompts()
    if orphans:
        log.info("orphan_prompts_removed", prompts=orphans)
    temp_files = spool.remove_temp_files() + speakers.remove_temp_files()
    if temp_files:
        log.info("temp_files_removed", files=temp_files,
                 message="left by writes that a crash cut short; never results")
    spool.discard_orphan_attempts()


def _upgrade_speakers(speakers: SpeakerStore) -> None:
    """Voices stored with their audio in the JSON file get files of their own, so that a
    registration never rewrites all of their audio on the tick."""
    try:
        moved = speakers.upgrade()
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.error("speakers_upgrade_failed", file=str(speakers.path), error=str(error),
                  message="the voices are served as they are stored")
        return
    if moved:
        log.info("speakers_upgraded", voices=moved, audio_dir=str(speakers.audio_dir))


class _SentPromptSink:
    """The sink of a ZeroMQ `submit` that came with prompt audio, in front of the drop
    folder's: that audio is deleted when the job fails or is cancelled, as when it is done,
    rather than kept in failed/ as a dropped file is. It is the daemon's copy of bytes the
    client still has (as a reply job's prompt, deleted at `settle`), not a submitter's file:
    kept, it was up to zmq.max_attachment_bytes (16 MiB) in failed/ for each failed request
    of an anonymous client, for 30 days (the tmpfiles.d rule) or for good. The job's file and
    its error record go to failed/ as before."""

    def __init__(self, sink: Sink, spool: Spool) -> None:
        self._sink, self._spool = sink, spool

    def started(self, job: Job, sample_rate: int) -> None:
        self._sink.started(job, sample_rate)

    def chunk(self, job: Job, seq: int, samples: Samples) -> None:
        self._sink.chunk(job, seq, samples)

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str | Deferred:
        return self._sink.deliver(job, result, made, timings)  # done: released with it

    # Deleted before the failure is published, which would move it: a crash in between
    # (or a record that cannot be written) leaves the job in work/ to fail again, now as
    # prompt_audio_not_found; it was failing anyway.
    def fail_job(self, job: Job, error: JobError) -> str:
        _discard_sent_prompt(self._spool, job.id)
        return self._sink.fail_job(job, error)

    def cancelled(self, job: Job) -> None:
        _discard_sent_prompt(self._spool, job.id)
        self._sink.cancelled(job)


def _has_sent_prompt(job: Job) -> bool:
    """A spool job whose prompt audio came with a ZeroMQ `submit` (then or before a crash:
    a job recovered from work/ keeps its id, so its prompt keeps its name; one handed back
    to the inbox at a stop is a dropped file from then on, with a new id)."""
    return job.sink != SINK_REPLY and job.prompt_audio is not None and \
        Path(job.prompt_audio).name == _sent_prompt_work_name(job.id)


def _discard_sent_prompt(spool: Spool, job_id: str) -> None:
    """Delete the prompt audio a `submit` sent for `job_id`, if there is one; a dropped
    file's is named by its submitter, never after the id the daemon gives its job."""
    (spool.prompts / _sent_prompt_work_name(job_id)).unlink(missing_ok=True)


def _sent_prompt_work_name(job_id: str) -> str:
    return Claimed.named(job_id, _prompt_name(job_id)).work_name


def _prompt_name(job_id: str) -> str:
    """What a ZeroMQ job's prompt audio is called, as if it had been dropped in the inbox:
    named as audio, so that a restart claims it again, and a stop that hands the job back to
    the inbox does not make it a job of its own (soundfile reads it by its content, not by
    its name, whatever format it is)."""
    return f"{job_id}.prompt.wav"
