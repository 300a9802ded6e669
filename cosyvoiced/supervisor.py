"""The supervisor: the one owner of the queue, the worker and every job's outcome.

Signal handlers only record the signal. One tick acts, always in the same order:
signals -> intake (drop folder claims, ZeroMQ, HTTP and Wyoming requests) -> the cluster's
jobs and events (sharing.py) -> worker messages and exits -> dispatch -> jobs wanted from
the cluster -> inbox rescan -> shutdown progress -> STATUS= -> WATCHDOG=1. Because the watchdog
ping comes from the tick, a supervisor that stops ticking stops pinging, and systemd
restarts it.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import queue
import signal
import socket
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from zmq import ZMQError

from cosyvoiced import (
    __version__,
    audio,
    clients,
    clusterwire,
    config,
    logs,
    policy,
    reload,
    report,
    scheduler,
)
from cosyvoiced import segments as text_segments
from cosyvoiced.clients import LOCAL_ADMIN, Identity
from cosyvoiced.config import Config
from cosyvoiced.encoding import Encoder
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake import http as http_intake
from cosyvoiced.intake import wyoming as wyoming_intake
from cosyvoiced.intake import zmq as zmq_intake
from cosyvoiced.intake.inbox import QUIET_S, InboxIntake
from cosyvoiced.intake.inbox import SOURCE as INBOX_SOURCE
from cosyvoiced.job import (
    SINK_REPLY,
    Deferred,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    Sink,
)
from cosyvoiced.jobspec import Limits, build_job
from cosyvoiced.ledger import Ledger, Running
from cosyvoiced.messages import (
    AudioChunkReady,
    CancelJob,
    EngineLoadFailed,
    EngineReady,
    EngineWarming,
    FromWorker,
    Heartbeat,
    JobCancelled,
    JobFailed,
    LogLine,
    RunSegment,
    SegmentFinished,
    SegmentStarted,
)
from cosyvoiced.metrics import Metrics
from cosyvoiced.notify import Notifier
from cosyvoiced.pool import WorkerPool
from cosyvoiced.protocol import Request
from cosyvoiced.resultcache import ResultCache
from cosyvoiced.sharing import Sharing
from cosyvoiced.speakers import SpeakerStore
from cosyvoiced.spool import Claimed, Spool
from cosyvoiced.workerhandle import WorkerHandle, WorkerState

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_LISTEN = 1  # an address to listen on is taken or not ours
EXIT_WORKER_START = 3  # the engine failed to load `worker.max_start_failures` times in a row
EXIT_INTAKE_DIED = 4  # an intake's thread died: systemd restarts the whole service
EXTEND_TIMEOUT_S = 15.0  # asked for, again and again, while the engine loads before READY

MAX_ATTEMPTS = policy.MAX_ATTEMPTS  # a job that kills two workers (or the daemon twice)
CLAIM_RETRY_S = 1.0  # a claim that failed for want of descriptors or memory is retried
CLAIM_RETRIES = 60  # ...this many times before it fails as unreadable
# Errors of this process's state (descriptors, memory), not of the file: they pass.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                              errno.EINTR, errno.ENOBUFS})
MAX_TICK_S = 1.0
ENCODER_STOP_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logs.get_logger("cosyvoiced.supervisor")


@dataclass
class _Encoding:
    """A finished job whose file the encoder is making."""

    job: Job
    deferred: Deferred
    result: JobResult
    status: dict[str, Any]
    summary: dict[str, Any]
    since: float


class Supervisor:
    def __init__(self, config: Config, config_path: str | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.reload_error: str | None = None
        self.metrics = Metrics()
        self.next_extend = 0.0
        self.spool = Spool(config.spool.dir)
        self.notifier = notifier or Notifier()
        self.limits = Limits(config.spool.max_text_chars, config.spool.default_format)
        self._wake_receiver, self._wake_sender = socket.socketpair()
        for end in (self._wake_receiver, self._wake_sender):
            end.setblocking(False)
        self._claims: queue.SimpleQueue[Claimed] = queue.SimpleQueue()
        self._claim_retries: list[tuple[float, int, Claimed]] = []  # (due, tries, claim)
        self.inbox = InboxIntake(self.spool, self._claims, self.wake)
        self.zmq = zmq_intake.ZmqIntake(config.zmq, lambda: self.limits, self.wake)
        self.encoder = Encoder(self.wake)  # native codecs, in a process of their own
        self.http = http_intake.HttpIntake(lambda: self.config.http, self.wake, self.encoder)
        self.wyoming = wyoming_intake.WyomingIntake(lambda: self.config.wyoming, self.wake)
        self.ledger = Ledger()
        self.pool = WorkerPool(lambda: self.config, self.metrics)
        self.voices: list[VoiceInfo] = []
        self.engine_name = config.engine.name
        self.engine_features: frozenset[str] = frozenset()
        self.native_rate = 0
        self.speakers = SpeakerStore(config.engine.cosyvoice.speakers_file)
        self.cache = ResultCache(config, self.speakers, self.metrics)
        self.sharing = Sharing(config.cluster, self)
        self._encoding: dict[str, _Encoding] = {}
        self.ready = False
        self.stopping = False
        self.stop_deadline = 0.0
        self.next_scan = 0.0
        self.started_at = time.monotonic()
        self.exit_code: int | None = None
        self.intake_failure: str | None = None  # an intake thread that died, and why
        self.admin_token = ""  # written to the spool at start: a local cosyvoicectl's
        self._signals: list[int] = []

    # -- process plumbing ---------------------------------------------------------------
    def wake(self) -> None:
        """Make the loop tick now (safe from any thread)."""
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            self._wake_sender.send(b"\0")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)  # only record it: the tick acts (no logging here)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_sender.fileno(), warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        self._install_signals()
        self.spool.ensure()
        self.admin_token = self.spool.new_admin_token()
        self.encoder.start()
        log.info("starting", version=__version__, spool=str(self.spool.root),
                 engine=self.config.engine.name, rss_limit=self.config.worker.rss_limit)
        self.sharing.connect()  # first: jobs left in work/ may be on the shared stream
        self._recover()
        self.pool.resize(time.monotonic())
        self.pool.warn_if_gpus_unused()
        self.pool.spawn_due(time.monotonic())
        try:
            self.zmq.start()
            self.http.start()
            self.wyoming.start()
            if self.config.metrics.listen:
                self.metrics.serve(self.config.metrics)
        except (OSError, ZMQError) as error:
            log.critical("listen_failed", error=str(error),
                         message="cannot listen on a zmq.bind or metrics.listen address")
            for worker in self.pool.handles():
                worker.kill_now()
            return EXIT_LISTEN
        self.inbox.start()
        self.sharing.start()
        while self.exit_code is None:
            self.tick(time.monotonic())
            if self.exit_code is None:
                self._wait(self._timeout(time.monotonic()))
        self.sharing.stop()  # after the outcomes of the jobs served for others have gone
        self.encoder.stop(ENCODER_STOP_S)
        self.zmq.stop()
        self.http.stop()
        self.wyoming.stop()
        log.info("stopped", exit_code=self.exit_code, **self.ledger.counts)
        return self.exit_code

    def _timeout(self, now: float) -> float:
        deadlines = [self.next_scan, now + MAX_TICK_S, *self.pool.deadlines(self.stopping),
                     *(due for due, _tries, _claimed in self._claim_retries)]
        watchdog = self.notifier.next_watchdog_at()
        if watchdog is not None:
            deadlines.append(watchdog)
        return max(0.0, min(deadlines) - now)

    def _wait(self, timeout: float) -> None:
        waitables: list[object] = [self._wake_receiver]
        for handle in self.pool.handles():
            waitables.append(handle.sentinel)
            if not handle.conn.closed:
                waitables.append(handle.conn)
        ready = wait(waitables, timeout)  # type: ignore[arg-type]
        if self._wake_receiver in ready:
            with contextlib.suppress(BlockingIOError):
                while self._wake_receiver.recv(4096):
                    pass

    # -- the tick -----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._handle_signals(now)
        self._admit_claims(now)
        self._handle_requests()
        self._watch_intakes(now)
        self.sharing.poll(now)
        self._drain_encoded(now)
        self._handle_workers(now)
        self._dispatch(now)
        self.sharing.offer()
        self._rescan(now)
        self._progress_stop(now)
        self._report(now)

    def _report(self, now: float) -> None:
        self.notifier.status(self.status_line())
        if not self.ready and not self.stopping and now >= self.next_extend:
            self.notifier.extend_timeout(EXTEND_TIMEOUT_S)
            self.next_extend = now + EXTEND_TIMEOUT_S / 3
        if self.notifier.watchdog_due(now) and self._healthy(now):
            self.notifier.watchdog(now)
            self.metrics.watchdog_pings.inc()
        self.metrics.queue_depth.set(len(self.ledger.queued()))
        self.metrics.jobs_in_progress.set(sum(self.ledger.in_progress().values()))
        self.metrics.workers.set(len(self.pool.slots))
        self.metrics.worker_generation.set(self.pool.generation)
        for worker in self.pool.workers():
            self.metrics.worker(worker.slot, worker.placement.device, worker.memory,
                                worker.job_id is not None)

    def _handle_signals(self, now: float) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in STOP_SIGNALS:
                self._begin_stop(now, signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self.stopping:
                self._reload()

    def _reload(self) -> None:
        """Re-read the config; apply what can change live; keep the old one if it is bad."""
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise config.ConfigError("no config file to re-read")
            loaded = config.load(self.config_path)
        except config.ConfigError as error:
            self.reload_error = str(error)
            log.error("reload_failed", error=str(error), message="keeping the running config")
            self.notifier.ready()
            return
        plan = reload.plan(self.config, loaded)
        self.config, self.reload_error = plan.config, None
        self.limits = Limits(plan.config.spool.max_text_chars, plan.config.spool.default_format)
        self.cache.configure(plan.config)  # a changed engine or model invalidates entries
        self.zmq.settings = plan.config.zmq
        self.zmq.reload_keys()  # authorized client keys may have changed on disk
        logs.set_level(plan.config.log.level)
        if plan.engine_changed:
            self.pool.reload_pending = set(range(len(self.pool.slots)))
        self.pool.resize(time.monotonic())  # worker.devices, worker.per_device
        log.info("reloaded", applied=plan.applied, restart_required=plan.restart_required,
                 recycle_worker=plan.engine_changed, workers=len(self.pool.slots))
        if plan.restart_required:
            log.warning("restart_required", keys=plan.restart_required,
                        message="these keys keep their old values until a restart")
        self.notifier.ready()

    def _admit_claims(self, now: float) -> None:
        retries, self._claim_retries = self._claim_retries, []
        for due, tries, claimed in retries:
            if due > now:
                self._claim_retries.append((due, tries, claimed))
            else:
                self._claim(claimed, now, tries)
        while True:
            try:
                claimed = self._claims.get_nowait()
            except queue.Empty:
                return
            self._claim(claimed, now)

    def _claim(self, claimed: Claimed, now: float, tries: int = 0) -> None:
        if self.stopping:
            self._hand_back(claimed)
            return
        try:
            self._admit(claimed)
        except OSError as error:
            if error.errno in TRANSIENT_ERRNOS and tries < CLAIM_RETRIES:
                log.warning("claim_retry", work_name=claimed.work_name, error=str(error),
                            tries=tries + 1)
                self._claim_retries.append((now + CLAIM_RETRY_S, tries + 1, claimed))
            else:
                log.error("claim_unreadable", work_name=claimed.work_name, error=str(error))
                self._reject(claimed, JobError(ErrorCode.UNREADABLE,
                                               f"the job file could not be read: {error}"))

    def _admit(self, claimed: Claimed) -> None:
        """Parse and queue a claimed job; OSError if it cannot be read now."""
        try:
            job = self.inbox.admit(claimed, self.limits, self.config.spool.max_file_bytes)
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
            job = replace(job, owner=clients.INBOX, share=clients.INBOX)
        self.enqueue(job)

    def _reject(self, claimed: Claimed, error: JobError) -> None:
        """A drop-folder file that is not a valid job: failed/ and counted, never dropped."""
        try:
            where = self.inbox.fail(claimed, error)
        except OSError as failure:
            log.critical("outcome_unwritable", job=claimed.job_id, error=str(failure))
            return
        self._close(claimed.job_id, INBOX_SOURCE, "failed", owner=clients.INBOX,
                    status={"error": error.to_dict()},
                    code=str(error.code), message=error.message, failed=where)

    def _handle_requests(self) -> None:
        self.http.handle_inbound(self)
        self.wyoming.handle_inbound(self)
        for message in self.zmq.inbound():
            if isinstance(message, Request):
                self.zmq.handle(message, self)
            else:
                for job_id in self.zmq.jobs_of(message.client):
                    log.info("client_gone", job=job_id)
                    self.cancel(job_id)

    def _watch_intakes(self, now: float) -> None:
        """A dead intake thread is never silent: the daemon says so (STATUS=, /readyz, the
        ready metric) and stops with its own exit code, so that systemd restarts it."""
        if self.intake_failure is not None:
            return
        for intake in (self.inbox, self.zmq, self.http, self.wyoming, self):
            failure = intake.failure()
            if failure is not None:
                self.intake_failure = failure
                self.metrics.ready.set(0)
                log.critical("intake_died", reason=failure, exit_code=EXIT_INTAKE_DIED,
                             message="stopping so that the service manager restarts it")
                self._begin_stop(now, failure)  # jobs in progress still finish
                return

    def failure(self) -> str | None:
        """The encoder's threads (the one part of the data path on threads of its own)."""
        return None if self.encoder.alive() else "the encoder's threads stopped"

    def _recover(self) -> None:
        left = self.spool.claimed()
        if left:
            log.info("recovering", jobs=len(left))
        orphans = self.spool.discard_orphan_prompts()
        if orphans:
            log.info("orphan_prompts_removed", prompts=orphans)
        temp_files = self.spool.remove_temp_files() + self.speakers.remove_temp_files()
        if temp_files:
            log.info("temp_files_removed", files=temp_files,
                     message="left by writes that a crash cut short; never results")
        self.spool.discard_orphan_attempts()
        now = time.monotonic()
        for claimed in left:
            self._claim(claimed, now)

    def _rescan(self, now: float) -> None:
        if self.stopping or (now < self.next_scan and not self.inbox.rescan_requested.is_set()):
            return
        deferred = self.inbox.scan()
        self.next_scan = now + (QUIET_S if deferred else self.config.spool.rescan_interval_s)

    # -- what the ZeroMQ ops ask of the supervisor (zmq_intake.Service) -------------------
    def queue_full(self) -> bool:
        """Jobs waiting to start are bounded here; those in progress by the scheduler."""
        return self.ledger.unstarted() >= self.config.zmq.max_pending or self.stopping

    def refusal(self, identity: Identity) -> JobError | None:
        """The one admission rule of every intake, before a job is queued: not while
        stopping, not when the queue is full, and anonymous clients all together in at
        most their part of it (so that clients with keys always find room)."""
        if self.stopping:
            return JobError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping; send the "
                            "request again")
        max_pending = self.config.zmq.max_pending
        if self.ledger.unstarted() >= max_pending:
            return JobError(ErrorCode.BUSY, "the queue is full (zmq.max_pending); retry later")
        room = clients.anonymous_room(max_pending)
        if identity.anonymous and self.ledger.unstarted_of(clients.ANONYMOUS) >= room:
            return JobError(ErrorCode.BUSY, f"the {room} places of anonymous clients in the "
                            "queue are taken (half of zmq.max_pending); retry later, or use "
                            "an API key or a CURVE key")
        return None

    def enqueue(self, job: Job, share: bool = True) -> None:
        """Queue a job: on the cluster's shared stream if there is one, else here."""
        if self._serve_cached(job):
            return
        settings = self.config.scheduling
        segments = text_segments.split(job.text, settings.max_segment_chars,
                                       settings.first_segment_words if job.stream else 0,
                                       settings.pack_segment_chars)
        running = self.ledger.enqueue(job, segments, time.monotonic())
        shared = share and self.sharing.share(running)
        log.debug("job_queued", job=job.id, source=job.source, segments=len(segments),
                  depth=len(self.ledger), shared=shared)

    # -- what the cluster asks of the supervisor (sharing.Sharing) -------------------------
    def enqueue_here(self, job: Job) -> None:
        """Another host's job, taken from the shared stream."""
        self.enqueue(job, share=False)

    def serve_here(self, running: Running) -> None:
        """A job of this host's that was on the shared stream is served here after all."""
        running.remote = False
        if running.served_by:  # started elsewhere, taken back: it starts again here
            running.served_by, running.dispatched, running.sample_rate = "", False, 0
        self.wake()

    def idle_workers(self) -> int:
        return len(self.pool.idle())

    def sink_of(self, job: Job) -> Sink:
        return self._sink(job)

    def end_job(self, running: Running, error: JobError | None) -> None:
        self._end(running, error)

    def finish_remote(self, running: Running, event: clusterwire.Event) -> None:
        """The audio of a job received here, made by another host."""
        detail = event.detail
        running.voice, running.sample_rate = detail["voice"], detail["sample_rate"]
        running.samples, running.synth_s = detail["samples"], detail["synth_s"]
        running.first_chunk_s = detail["first_chunk_s"]
        running.started_at = detail["timings"].get("started_at", running.started_at)
        running.served_by = event.sender
        running.chunks = [] if running.job.stream else [event.samples]
        running.done = len(running.segments)
        self._finish(running)

    def _serve_cached(self, job: Job) -> bool:
        """A repeat is served from the result cache, with no worker (all may be busy or
        restarting); False on a miss, which is then recorded for the cache."""
        try:
            served = self.cache.serve(job, self._sink(job), record=not self.pool.reload_pending)
        except OSError as error:  # the sink could not write the result, as in _finish
            self._end(Running(job, [], time.monotonic()),
                      JobError(ErrorCode.INTERNAL, f"could not write the result: {error}"))
            return True
        if served is None:
            return False
        summary = {k: v for k, v in served.summary.items() if k != "output"}
        self._delivered(job, served.output, served.result, {"cached": True}, summary)
        return True

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
        if prompt is not None:
            fields = fields | {"prompt_audio": _prompt_name(job_id)}
            job = replace(job, prompt_audio=self.keep_prompt(job_id, prompt))
        self.spool.write_claimed(job_id, name, json.dumps(fields).encode())
        job = replace(job, owner=identity.owner, share=identity.share)
        self.enqueue(job)
        return job

    def keep_prompt(self, job_id: str, prompt: bytes) -> str:
        return str(self.spool.write_prompt(job_id, _prompt_name(job_id), prompt))

    def register_voice(self, name: Any, prompt_text: Any, audio: bytes) -> VoiceInfo:
        if "prompt_audio" not in self.engine_features:
            raise JobFailure(ErrorCode.NOT_SUPPORTED, f"the {self.engine_name} engine cannot "
                             "clone voices (or has not started yet); registering one needs "
                             "engine.name = \"cosyvoice\"")
        if any(v.name == name and v.kind == "builtin" for v in self.voices):
            raise JobFailure(ErrorCode.INVALID_FIELD, f"name: {name!r} is a built-in voice of "
                             "the model; choose another name", "name")
        self.speakers.add(name, prompt_text, audio)
        self.cache.voices_changed()  # a replaced voice's entries go
        voice = VoiceInfo(name, "", self.native_rate, self.engine_name, kind="registered")
        self.voices = [v for v in self.voices if v.name != name] + [voice]
        log.info("voice_registered", voice=name)
        return voice

    def remove_voice(self, name: str) -> bool:
        if not self.speakers.remove(name):
            return False
        self.cache.voices_changed()  # its entries go
        self.voices = [v for v in self.voices if not (v.name == name and v.kind == "registered")]
        log.info("voice_removed", voice=name)
        return True

    def is_admin_token(self, token: Any) -> bool:
        return isinstance(token, str) and bool(self.admin_token) and \
            hmac.compare_digest(token.encode(), self.admin_token.encode())

    def visible(self, job_id: str, identity: Identity = LOCAL_ADMIN) -> bool:
        """May `identity` see this job? Another client's job is as if unknown."""
        owner = self.ledger.owner_of(job_id)
        return owner is not None and identity.may_see(owner)

    def job_status(self, job_id: str,
                   identity: Identity = LOCAL_ADMIN) -> dict[str, Any] | None:
        return self.ledger.status(job_id) if self.visible(job_id, identity) else None

    def cancel(self, job_id: str, identity: Identity = LOCAL_ADMIN) -> bool:
        running = self.ledger.get(job_id)
        if running is None or not identity.may_see(running.job.owner):
            return False
        if running.holder is None:  # queued, or between two segments
            self._end(running, None)
        elif not running.cancel_requested:
            running.cancel_requested = True
            running.holder.send(CancelJob(job_id))
        return True

    def _record_cancel(self, job: Job) -> None:
        self._close(job.id, job.source, "cancelled", owner=job.owner, chars=job.chars)

    def _close(self, job_id: str, source: str, outcome: str, *, owner: str = "",
               share: str = "", status: dict[str, Any] | None = None,
               result: JobResult | None = None, **summary: Any) -> None:
        """A job has ended: remember it for `status`, count it, and log its summary line."""
        self.ledger.record(job_id, source, outcome, owner, **(status or {}))
        self.spool.discard_prompts(job_id)  # a reply job's; a spool job's are settled
        self.sharing.ended(job_id)
        self.metrics.job_ended(source, outcome, result, share, summary.get("chars", 0))
        log.info("job", job=job_id, source=source, outcome=outcome, **summary)

    def stats(self, identity: Identity = LOCAL_ADMIN) -> dict[str, Any]:
        return report.stats(self._snapshot(), time.monotonic() - self.started_at,
                            lambda job_id: self.visible(job_id, identity))

    def _snapshot(self) -> report.Snapshot:
        return report.Snapshot(
            self.ledger, self.pool, self.engine_name, self.config.engine.name, self.ready,
            self.stopping, self.intake_failure, self.reload_error, self.cache.figures(),
            self.sharing.figures(), self.sharing.status())

    # -- the workers --------------------------------------------------------------------
    def _handle_workers(self, now: float) -> None:
        for handle, message in self.pool.messages(now):
            self._on_message(handle, message, now)
        self.pool.reap(now, lambda handle, message: self._on_message(handle, message, now))
        if self.pool.spare_failed(now):
            self._count_start_failure(now, None)
        for worker in self.pool.workers():
            self._watch(worker, now)
        if not self.stopping:
            self.pool.promote_spare(now)
            self.pool.drain_leaving(now)
            self.pool.spawn_due(now)

    def _watch(self, worker: WorkerHandle, now: float) -> None:
        settings = self.config.worker
        running = self.ledger.held_by(worker)
        if not worker.alive():
            for message in worker.messages(now):  # whatever it sent before it died
                self._on_message(worker, message, now)
            self._lose(worker, now, "exited")
        elif not worker.ready and now - worker.started_at > settings.start_timeout_s:
            self.pool.last_load_error = (f"engine did not load within "
                                         f"{settings.start_timeout_s:g} s")
            self._lose(worker, now, "start_timeout")
        elif running is not None and policy.hung(running.last_progress, now,
                                                 len(running.segments[running.done]),
                                                 settings):
            self._lose(worker, now, "job_timeout")
        elif worker.ready and policy.silent(worker.last_heard, now, settings):
            self._lose(worker, now, "heartbeat_timeout")

    def _lose(self, worker: WorkerHandle, now: float, reason: str) -> None:
        """A serving worker died or must die: settle its segment, plan a new worker."""
        never_ready = worker.state in (WorkerState.STARTING, WorkerState.WARMING)
        running = self.ledger.held_by(worker)
        self.pool.lose(worker, now, reason)
        if not self.stopping:
            log.error("worker_lost", reason=reason, generation=worker.generation,
                      slot=worker.slot, worker_pid=worker.pid, exitcode=worker.exitcode(),
                      during="start" if never_ready else "service")
        if running is not None:
            self._release(worker, running, now)
            self._after_crash(running, reason)
        if never_ready and not self.stopping:
            self._count_start_failure(now, worker)

    def _on_message(self, worker: WorkerHandle, message: FromWorker, now: float) -> None:
        if isinstance(message, LogLine):
            logs.forward(message.levelno, message.line)
        elif isinstance(message, Heartbeat):
            worker.memory = message.memory
            if worker.job_id is None and not self.stopping:
                self.pool.recycle_if_due(worker, now)
        elif isinstance(message, EngineWarming | EngineReady | EngineLoadFailed):
            self._on_engine(worker, message)
        else:
            running = self.ledger.held_by(worker)
            if running is not None:  # else a late message of a job that has ended
                self._on_job_message(worker, running, message, now)

    def _on_engine(self, worker: WorkerHandle,
                   message: EngineWarming | EngineReady | EngineLoadFailed) -> None:
        match message:
            case EngineWarming(load_s):
                worker.set_state(WorkerState.WARMING, load_s=load_s)
            case EngineReady():
                self._on_ready(worker, message)
            case EngineLoadFailed(reason):
                self.pool.last_load_error = reason

    def _on_job_message(self, worker: WorkerHandle, running: Running, message: FromWorker,
                        now: float) -> None:
        running.last_progress = now
        match message:
            case SegmentStarted() if not running.sample_rate:
                self.sharing.started_here(running.job.id)
                running.started_at = message.started_at
                running.voice, running.sample_rate = message.voice, message.sample_rate
                self._sink(running.job).started(running.job, message.sample_rate)
            case AudioChunkReady():
                self._on_chunk(running, message)
            case SegmentFinished():
                self._on_segment_done(worker, running, message, now)
            case JobFailed(_job_id, error):
                self._release(worker, running, now)
                self._end(running, error)
            case JobCancelled():
                self._release(worker, running, now)
                self._end(running, None)

    def _on_chunk(self, running: Running, message: AudioChunkReady) -> None:
        running.segment_chunks += 1
        if running.job.stream:
            self._sink(running.job).chunk(running.job, running.chunks_sent, message.audio)
            running.chunks_sent += 1
        else:
            running.segment_audio.append(message.audio)

    def _on_segment_done(self, worker: WorkerHandle, running: Running,
                         message: SegmentFinished, now: float) -> None:
        running.done += 1
        running.samples += message.samples
        running.synth_s += message.synth_s
        if running.done == 1:
            running.first_chunk_s = message.first_chunk_s
        running.chunks.extend(running.segment_audio)
        running.segment_audio = []
        self._release(worker, running, now)
        if running.cancel_requested:  # asked after its last chunk: still cancelled
            self._end(running, None)
        elif running.done == len(running.segments):
            self._dispatch(now)  # hand over the next segment before writing this job's output
            self._finish(running)

    def _release(self, worker: WorkerHandle, running: Running, now: float) -> None:
        """The worker no longer has the job's segment in hand (done, failed or lost)."""
        running.holder = None
        running.ready_since = now
        worker.job_id = None
        if worker.state != WorkerState.BUSY:
            return
        worker.segments_served += 1
        worker.set_state(WorkerState.IDLE)
        if not self.stopping:
            self.pool.recycle_if_due(worker, now)
            self.pool.promote_spare(now)

    def _on_ready(self, worker: WorkerHandle, message: EngineReady) -> None:
        self.pool.start_failures = 0
        self.voices = message.voices
        self.engine_name = message.engine
        self.engine_features = message.features
        self.native_rate = message.native_rate
        worker.set_state(WorkerState.IDLE, engine=message.engine, load_s=message.load_s,
                         warmup_s=message.warmup_s, voices=[v.name for v in message.voices])
        if not self.ready:
            self.ready = True
            self.metrics.ready.set(1)
            self.notifier.ready()
            log.info("ready", engine=message.engine, default_voice=message.default_voice,
                     workers=len(self.pool.slots))

    def _count_start_failure(self, now: float, worker: WorkerHandle | None) -> None:
        if not self.pool.start_failed(now, worker):
            return
        failures = self.pool.start_failures
        log.critical("worker_start_failed", failures=failures, reason=self.pool.last_load_error,
                     exit_code=EXIT_WORKER_START,
                     message=f"the engine failed to start {failures} times in a row; giving up "
                             "so that systemd's restart limits apply")
        self._begin_stop(now, "worker start failures")
        self.exit_code = EXIT_WORKER_START

    def _after_crash(self, running: Running, reason: str) -> None:
        job = running.job
        crashes = self.ledger.count_crash(job)
        timeout_s = policy.job_timeout_s(len(running.segments[running.done]),
                                         self.config.worker)
        what = f"hung (no progress for {timeout_s:g} s)" if reason == "job_timeout" else "died"
        if running.cancel_requested:
            self._end(running, None)
        elif crashes >= MAX_ATTEMPTS or (job.stream and running.segment_chunks):
            # Chunks of the segment already streamed cannot be made again without
            # duplicating audio; a segment boundary can (the next worker starts there).
            self._end(running, JobError(ErrorCode.WORKER_CRASHED, f"the worker {what} while "
                                        f"synthesizing this job ({crashes} time(s)); it is not "
                                        "retried again"))
        else:
            log.warning("job_retry", job=job.id, crashes=crashes, reason=reason,
                        segment=running.done)
            running.retry = True
            running.segment_audio = []

    # -- jobs ---------------------------------------------------------------------------
    def _sink(self, job: Job) -> Sink:
        """The job's intake; for a cache miss, with the cache's recorder in front."""
        return self.cache.sink(job, self._intake_sink(job))

    def _intake_sink(self, job: Job) -> Sink:
        remote = self.sharing.sinks.get(job.id)
        if remote is not None:
            return remote
        if job.sink != SINK_REPLY:
            return self.inbox
        return {http_intake.SOURCE: self.http,
                wyoming_intake.SOURCE: self.wyoming}.get(job.source, self.zmq)

    def _dispatch(self, now: float) -> None:
        """Hand the next segments to the idle workers, in the scheduler's order."""
        idle = self.pool.idle()
        if not idle:
            return
        waiting = self.ledger.waiting()
        if self.stopping:  # finish what is in progress; start nothing new
            waiting = [w for w in waiting if w.started]
        for choice in scheduler.assign(waiting, sorted(idle), self.ledger.in_progress(),
                                       self.config.scheduling.max_active_jobs,
                                       self.ledger.shares_in_progress(),
                                       self.ledger.last_turn):
            running = self.ledger.jobs[choice.job_id]
            self._hand_segment(running, idle[choice.slot], now)

    def _hand_segment(self, running: Running, worker: WorkerHandle, now: float) -> None:
        index = running.done
        if not running.dispatched and self._persisted(running.job):
            self.spool.count_attempt(running.job.id)  # durable before the job is in hand
        if not worker.send(RunSegment(self.cache.worker_job(running.job), index,
                                      len(running.segments), running.segments[index])):
            return  # the worker is gone; handled next tick, the job waits
        running.holder, running.last_slot, running.retry = worker, worker.slot, False
        self.ledger.turn_taken(running.job.share, now)
        running.dispatched = True
        running.last_progress = now
        running.segment_chunks = 0
        worker.job_id = running.job.id
        worker.set_state(WorkerState.BUSY, job=running.job.id, segment=index)

    def _persisted(self, job: Job) -> bool:
        """The job lives in this host's work/ (and is run again after a crash)."""
        return job.sink != SINK_REPLY and job.id not in self.sharing.sinks

    def _finish(self, running: Running) -> None:
        self.ledger.pop(running.job.id)
        job = running.job
        result = JobResult(job.id, running.voice, running.sample_rate, running.samples,
                           running.synth_s, running.first_chunk_s,
                           served_by=running.served_by or self.sharing.name)
        timings = {
            "received_at": round(job.received_at, 6),
            "started_at": round(running.started_at, 6),
            "queue_wait_s": round(max(0.0, running.started_at - job.received_at), 4),
            "first_chunk_s": round(result.first_chunk_s, 4),
            "synth_s": round(result.synth_s, 4),
        }
        written = time.monotonic()
        try:
            output = self._sink(job).deliver(job, result, audio.join(running.chunks), timings)
        except OSError as error:
            self._end(running, JobError(ErrorCode.INTERNAL,
                                        f"could not write the result: {error}"))
            return
        served = {"served_by": result.served_by} if result.served_by else {}
        self._delivered(job, output, result, served, served | {
            "voice": result.voice, "chars": job.chars, "segments": len(running.segments),
            "audio_s": round(result.audio_s, 3), "synth_s": round(result.synth_s, 3),
            "queue_wait_s": timings["queue_wait_s"], "first_chunk_s": timings["first_chunk_s"],
            "write_s": round(time.monotonic() - written, 4)})

    def _delivered(self, job: Job, output: str | Deferred, result: JobResult,
                   status: dict[str, Any], summary: dict[str, Any]) -> None:
        """A job's audio went to its sink: it is done, or its file is being encoded (in
        the encoder process; `_drain_encoded` finishes it)."""
        if isinstance(output, Deferred):
            self.encoder.submit(job.id, output.samples, output.sample_rate, output.format)
            self._encoding[job.id] = _Encoding(job, output, result, status, summary,
                                               time.monotonic())
            self.ledger.writing(job)
            return
        self._close(job.id, job.source, "done", owner=job.owner, share=job.share,
                    status=status | {"output": output}, result=result,
                    **(summary | {"output": output}))

    def _drain_encoded(self, now: float) -> None:
        """Publish the files the encoder finished; a file it could not make fails its job
        (encode_failed), and the daemon goes on."""
        for encoded in self.encoder.completed():
            pending = self._encoding.pop(encoded.key, None)
            if pending is None:
                continue
            job = pending.job
            if encoded.error is not None or encoded.data is None:
                self._end(Running(job, [], now), encoded.error or JobError(
                    ErrorCode.ENCODE_FAILED, "the encoder returned nothing"))
                continue
            try:
                output = pending.deferred.publish(encoded.data)
            except OSError as error:
                self._end(Running(job, [], now), JobError(
                    ErrorCode.INTERNAL, f"could not write the result: {error}"))
                continue
            summary = pending.summary | {"encode_s": round(now - pending.since, 4)}
            self._delivered(job, output, pending.result, pending.status, summary)

    def _end(self, running: Running, error: JobError | None) -> None:
        """Record a job that ends without audio: failed with `error`, or cancelled (None)."""
        job = running.job
        self.ledger.pop(job.id)
        sink = self._sink(job)
        try:
            if error is None:
                sink.cancelled(job)
            else:
                where = sink.fail_job(job, error)
        except OSError as failure:
            # Left in work/: the next start tries it again rather than lose it.
            log.critical("outcome_unwritable", job=job.id, error=str(failure))
            return
        if error is None:
            self._record_cancel(job)
            return
        self._close(job.id, job.source, "failed", owner=job.owner,
                    status={"error": error.to_dict()},
                    chars=job.chars, code=str(error.code), message=error.message, failed=where)

    # -- stopping -----------------------------------------------------------------------
    def _begin_stop(self, now: float, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = now + self.config.worker.drain_timeout_s
        self.notifier.stopping()
        log.info("stopping", reason=reason, queued=len(self.ledger.queued()),
                 running=[r.job.id for r in self.ledger.in_hand()])
        self.inbox.stop()

    def _hand_back(self, claimed: Claimed) -> None:
        if not self.spool.hand_back(claimed):
            log.warning("hand_back_deferred", work_name=claimed.work_name,
                        message="the inbox has a new file of that name; the job stays in "
                                "work/ and runs at the next start")

    def _release_unstarted(self, running: Running) -> None:
        job = running.job
        if self.sharing.release(running):
            return
        if job.sink == SINK_REPLY:
            self._end(running, JobError(ErrorCode.SHUTTING_DOWN,
                                        "the daemon is stopping; send the request again"))
        else:
            self.ledger.pop(job.id)
            self._hand_back(Claimed(job.origin))

    def _progress_stop(self, now: float) -> None:
        if not self.stopping:
            return
        for running in list(self.ledger.jobs.values()):
            if not running.started or running.remote:
                self._release_unstarted(running)
        left = list(self.ledger.jobs.values())
        if (left or self._encoding) and now < self.stop_deadline:
            return  # let the jobs in progress finish
        abandoned = set()
        for running in left:
            log.warning("drain_timeout", job=running.job.id, **running.progress())
            if running.holder is not None:
                abandoned.add(running.holder.generation)
            self._release_unstarted(running)
        self.pool.retire_all(now, abandoned)
        if not self.pool.retiring and self.exit_code is None:
            self.exit_code = EXIT_OK if self.intake_failure is None else EXIT_INTAKE_DIED

    # -- reporting ----------------------------------------------------------------------
    def _healthy(self, now: float) -> bool:
        """Every worker is busy with progress, idle and answering, or (re)starting in time."""
        settings = self.config.worker
        for worker in self.pool.workers():
            if not worker.ready:
                continue  # (re)starting is progress; the start timeout bounds it
            running = self.ledger.held_by(worker)
            if running is not None:
                if policy.hung(running.last_progress, now,
                               len(running.segments[running.done]), settings):
                    return False
            elif policy.silent(worker.last_heard, now, settings):
                return False
        return True

    def status_line(self) -> str:
        return report.status_line(self._snapshot())


def _prompt_name(job_id: str) -> str:
    """What a ZeroMQ job's prompt audio is called, as if it had been dropped in the inbox."""
    return f"{job_id}.prompt"
