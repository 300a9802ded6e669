"""What the HTTP and Wyoming intakes share: an asyncio loop on a thread of its own, and
reply jobs whose events the supervisor's thread hands to that loop.

The supervisor stays the one owner of state. A connection handler (on the loop) never
touches the queue: it puts a `Submission`, `Query` or `Gone` on the intake's inbound queue
and wakes the supervisor, whose thread validates the job with `build_job`, enqueues it and
later calls the Sink methods; each of those posts one event to the handler's `Exchange`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from cosyvoiced import logs
from cosyvoiced.admission import PerClient, holds_too_much, reply_fits
from cosyvoiced.clients import Identity
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake.limits import Throttled
from cosyvoiced.intake.service import IntakeService
from cosyvoiced.intake.tickbudget import TickBudget
from cosyvoiced.job import (
    REPLY_FORMATS,
    SINK_REPLY,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    ResultAudio,
    new_job_id,
)
from cosyvoiced.jobspec import Limits, build_job
from cosyvoiced.tally import Tally

T = TypeVar("T")
# The job fields a reply intake may set (the format is the intake's own business: it
# encodes the chunks itself).
JOB_FIELDS = ("text", "voice", "speed", "sample_rate", "instruct", "prompt_text",
              "normalize", "timestamps")
BUSY = "busy"  # not a job error: the request was never queued
START_TIMEOUT_S = 10.0
QUERY_TIMEOUT_S = 5.0
MAX_BUFFERED_BYTES = 64 << 20  # per client: about 12 minutes of 22 kHz float32 audio

log = logs.get_logger("cosyvoiced.intake.reply")


UNRESPONSIVE = "unresponsive"  # the error code of `Unresponsive`, as /healthz says it


class Unresponsive(TimeoutError):
    """The supervisor did not answer a question in time: its tick is stuck, or far behind.
    Its text is the client's error message."""


class Service(IntakeService, Protocol):
    """What a reply intake needs from the supervisor (read on the supervisor's thread)."""

    stopping: bool
    limits: Limits

    def check_prompt(self, prompt: bytes | None) -> None: ...

    def queue_full(self) -> bool: ...


# -- what a job's handler hears, in order: Started, Chunk..., then one ending event --------
@dataclass(frozen=True)
class Started:
    sample_rate: int


@dataclass(frozen=True)
class Chunk:
    samples: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Done:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    """The job failed (an `ErrorCode`), or was refused before it was queued (`BUSY`)."""

    code: str
    message: str
    field: str | None = None

    @classmethod
    def of(cls, error: JobError) -> Failed:
        return cls(str(error.code), error.message, error.field)


@dataclass(frozen=True)
class Cancelled:
    pass


Event = Started | Chunk | Done | Failed | Cancelled


class Exchange:
    """One job's events, posted from the supervisor's thread, read on the loop. It counts
    the audio bytes posted and not yet taken: what a slow reader leaves in our memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = threading.Lock()
        self._pending_bytes = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _count(self, event: Event, sign: int) -> None:
        if isinstance(event, Chunk):
            with self._lock:
                self._pending_bytes += sign * event.samples.nbytes

    def post(self, event: Event) -> None:
        self._count(event, +1)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> Event:
        event = await self._events.get()
        self._count(event, -1)
        return event


@dataclass(frozen=True)
class Submission:
    job_id: str
    fields: dict[str, Any]
    identity: Identity  # who asks: owns the job, and its requests in flight are counted
    exchange: Exchange
    # Wyoming may ask for a voice by language only: the first voice that speaks it.
    voice_language: str | None = None
    # A voice name the client cannot know we lack (OpenAI's own): the default voice then.
    voice_optional: bool = False
    # A one-off clone's audio file (HTTP): kept in prompts/ for the worker to read.
    prompt: bytes | None = None


@dataclass(frozen=True)
class Released:
    """The handler of this job is done with it: the reply was sent whole (`gone` False),
    or the client went away first (`gone` True: the job is cancelled if not ended)."""

    job_id: str
    gone: bool


@dataclass
class Query:
    """Ask something of the supervisor, on its thread; the answer resolves `future`. Either
    the tick takes it or its asker, tired of waiting, abandons it, never both: a question
    that changes something (remove a voice) and was answered 503 never runs later."""

    ask: Callable[[Service], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(repr=False)
    _claim: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _claimed_by: str = ""  # "tick" or "asker"

    def take(self) -> bool:
        """The tick's: may it run the question (its asker still waits)?"""
        return self._claimed("tick")

    def abandon(self) -> bool:
        """The asker's, at its timeout: True if the question will never run; False if the
        tick took it (its answer is on its way)."""
        return self._claimed("asker")

    def _claimed(self, by: str) -> bool:
        with self._claim:
            if not self._claimed_by:
                self._claimed_by = by
            return self._claimed_by == by

    def answer(self, value: Any) -> None:
        def resolve() -> None:
            if not self.future.done():
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(resolve)


Inbound = Submission | Released | Query


# What asyncio says when accept() fails for want of file descriptors or memory (EMFILE,
# ENFILE, ENOBUFS, ENOMEM). It retries a second later, up to its backlog times per retry:
# without a filter, hundreds of identical lines a second while the shortage lasts.
ACCEPT_FAILED = "socket.accept() out of system resource"


class LoopThread:
    """An asyncio loop running on a daemon thread; `call` runs a coroutine on it and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._accept_failures = Throttled(self.loop, "accept_failed", thread=name)
        self.loop.set_exception_handler(self._on_loop_error)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_FAILED:
            self._accept_failures.count(error=str(context.get("exception")))
        else:
            loop.default_exception_handler(context)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):  # stopping must not fail the daemon's exit
            self.call(self.loop.shutdown_default_executor(), 2.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


def voice_names(voices: list[VoiceInfo]) -> list[str]:
    return sorted(v.name for v in voices)


def _language_key(tag: str) -> str:
    return tag.replace("_", "-").lower()


def voice_for_language(language: str, voices: list[VoiceInfo]) -> str | None:
    """The first voice that speaks `language` (en_US = en-us; "en" matches en-us)."""
    wanted = _language_key(language)
    for exact in (True, False):
        for voice in voices:
            have = _language_key(voice.language)
            if have == wanted or (not exact and have.split("-")[0] == wanted.split("-")[0]):
                return voice.name
    return None


def _voice_fields(submission: Submission, voices: list[VoiceInfo]) -> dict[str, Any]:
    """The job's fields with its voice resolved: by language (Wyoming), or left to the
    default (an OpenAI name that is none of ours)."""
    fields, voice = submission.fields, submission.fields.get("voice")
    if voice is None and submission.voice_language:
        found = voice_for_language(submission.voice_language, voices)
        return fields | ({"voice": found} if found else {})
    if submission.voice_optional and voice not in voice_names(voices):
        return {name: value for name, value in fields.items() if name != "voice"}
    return fields


@dataclass
class _Route:
    exchange: Exchange
    identity: Identity
    ended: bool = False  # its last event is posted; the handler may still be sending it
    done: bool = False  # that last event was Done: the job's audio was all made


class ReplyIntake:
    """The supervisor's side of an asyncio intake: admits jobs and routes their events."""

    source = "reply"

    def __init__(self, wake: Callable[[], None], thread_name: str,
                 max_pending_per_client: Callable[[], int]) -> None:
        """`max_pending_per_client`: the intake's own setting of that name, read live."""
        self._wake = wake
        self._thread_name = thread_name
        self._max_pending_per_client = max_pending_per_client
        self._inbound: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # job id -> its handler (supervisor thread)
        self._overflowed: list[str] = []  # jobs whose client left too much audio unread
        self._slow: set[str] = set()  # clients cut for that, until they read what is left
        self._prompts = Tally()  # prompt audio submitted, not yet kept in the spool
        self.loop_thread: LoopThread | None = None

    def max_buffered_bytes(self) -> int:
        """Audio made for one client and not yet sent to it, at most."""
        return MAX_BUFFERED_BYTES

    def max_prompt_bytes(self) -> int:
        """Prompt audio handed to the supervisor and not yet kept in the spool, at most."""
        return 0  # one prompt at a time, for an intake that takes none of its own

    # -- the loop's side --------------------------------------------------------------------
    def submit(self, exchange: Exchange, fields: dict[str, Any], identity: Identity,
               voice_language: str | None = None, *, voice_optional: bool = False,
               prompt: bytes | None = None) -> str:
        """Hand a job to the supervisor; returns its id. Events come on `exchange`; the
        handler calls `finished` or `gone` when it is done with them, whatever happens.
        Busy (`JobFailure`) while max_prompt_bytes of prompts wait for the supervisor: each
        is written to the spool on its thread, and uploads came faster than that."""
        if prompt is not None and not self._prompts.take(len(prompt), self.max_prompt_bytes()):
            raise JobFailure(ErrorCode.BUSY, f"{self._prompts.held} bytes of voice prompts "
                             "wait to be kept; retry later")
        job_id = new_job_id()
        self._put(Submission(job_id, fields, identity, exchange, voice_language,
                             voice_optional, prompt))
        return job_id

    def gone(self, job_id: str) -> None:
        """The client went away: its job is cancelled, queued or running."""
        self._put(Released(job_id, gone=True))

    def finished(self, job_id: str) -> None:
        """The reply was sent whole: the request no longer counts as in flight."""
        self._put(Released(job_id, gone=False))

    async def ask(self, question: Callable[[Service], T],
                  timeout_s: float = QUERY_TIMEOUT_S) -> T:
        """`question(service)`, evaluated on the supervisor's thread."""
        loop = asyncio.get_running_loop()
        query = Query(question, loop, loop.create_future())
        self._put(query)
        with contextlib.suppress(TimeoutError):
            answer: T = await asyncio.wait_for(asyncio.shield(query.future), timeout_s)
            return answer
        if not query.abandon():  # the tick took it meanwhile: its answer is on its way
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(query.future, timeout_s)
                return answer
        raise Unresponsive(f"the daemon did not answer in {timeout_s:g} s; retry in a moment")

    def _put(self, message: Inbound) -> None:
        self._inbound.put(message)
        self._wake()

    # -- the supervisor's side --------------------------------------------------------------
    def start_loop(self) -> LoopThread:
        self.loop_thread = LoopThread(self._thread_name)
        self.loop_thread.start()
        return self.loop_thread

    def failure(self) -> str | None:
        """Why this intake's loop thread is gone, if it died while serving."""
        if self.loop_thread is not None and not self.loop_thread.alive():
            return f"the {self.source} intake's loop thread stopped"
        return None

    def stop_loop(self) -> None:
        if self.loop_thread is not None:
            self.loop_thread.stop()
            self.loop_thread = None

    def inbound(self) -> Iterator[Inbound]:
        while True:
            try:
                yield self._inbound.get_nowait()
            except queue.Empty:
                return

    def handle_inbound(self, service: Service, budget: TickBudget) -> None:
        """The jobs of clients too slow to read them, cancelled (whatever the budget: their
        audio piles up here); then the messages the loop thread passed on, within what is
        left of the tick's budget (the rest at the next tick, which comes at once)."""
        self._cancel_overflowed(service)
        if budget.spent:
            if not self._inbound.empty():
                self._wake()
            return
        for message in self.inbound():
            try:
                self._handle(message, service)
            except Exception:  # one client's message must not end the supervisor's tick
                log.error("intake_message_failed", source=self.source,
                          message=type(message).__name__, exc_info=True)
                if isinstance(message, Submission):
                    message.exchange.post(Failed(str(ErrorCode.INTERNAL), "the request could "
                                                 "not be handled (an internal error; it is "
                                                 "logged)"))
            text = message.fields.get("text") if isinstance(message, Submission) else None
            if not budget.spend(text):
                if not self._inbound.empty():
                    self._wake()
                break

    def _cancel_overflowed(self, service: Service) -> None:
        for job_id in self._overflowed:
            log.warning("client_too_slow", job=job_id, source=self.source,
                        max_buffered_bytes=self.max_buffered_bytes())
            # One that ended in that tick (a cache hit, played whole) was made, not heard.
            if not service.cancel(job_id):
                service.undelivered(job_id, self.source)
        self._overflowed.clear()

    def _handle(self, message: Inbound, service: Service) -> None:
        if isinstance(message, Submission):
            try:
                self._admit(message, service)
            finally:
                if message.prompt is not None:
                    self._prompts.give(len(message.prompt))
        elif isinstance(message, Released):
            route = self._routes.pop(message.job_id, None)
            service.in_flight.done(message.job_id)
            if route is not None and not self._buffered(route.identity.client):
                self._slow.discard(route.identity.client)  # nothing of it is held now
            if message.gone and route is not None and not route.ended:
                log.info("client_gone", job=message.job_id, source=self.source)
                service.cancel(message.job_id)
            elif message.gone and route is not None and route.done:
                service.undelivered(message.job_id, self.source)
        elif message.take():  # else its asker gave up: it was told to ask again
            message.answer(message.ask(service))

    def _admit(self, submission: Submission, service: Service) -> None:
        refusal = self._refusal(submission, service)
        if refusal is not None:
            log.info("request_refused", source=self.source, code=refusal.code,
                     message=refusal.message)
            submission.exchange.post(refusal)
            return
        try:
            fields = _voice_fields(submission, service.voices)
            service.check_voice(fields.get("voice"))
            service.check_prompt(submission.prompt)  # every intake's one rule
            job = build_job(fields, job_id=submission.job_id, source=self.source,
                            origin=submission.job_id, default_output=submission.job_id,
                            limits=service.limits, known=JOB_FIELDS, formats=REPLY_FORMATS,
                            sink=SINK_REPLY, stream=True)
            if submission.prompt is not None:  # removed when the job closes (settle)
                job = replace(job, prompt_audio=service.keep_prompt(job.id, submission.prompt))
        except JobFailure as failure:
            log.info("request_refused", source=self.source, code=str(failure.error.code),
                     message=failure.error.message)
            submission.exchange.post(Failed.of(failure.error))
            return
        except OSError as error:  # the prompt could not be kept (disk full, ...)
            log.error("prompt_not_kept", source=self.source, error=str(error))
            submission.exchange.post(Failed(str(ErrorCode.INTERNAL), "the prompt audio could "
                                            f"not be kept: {error}"))
            return
        identity = submission.identity
        self._routes[job.id] = _Route(submission.exchange, identity)
        service.in_flight.add(job.id, identity)
        service.enqueue(identity.stamp(job))

    def _refusal(self, submission: Submission, service: Service) -> Failed | None:
        per_client = PerClient(f"{self.source}.max_pending_per_client",
                               self._max_pending_per_client())
        error = service.refusal(submission.identity, per_client)
        if error is not None:  # shutting_down, or busy
            return Failed.of(error)
        client = submission.identity.client
        buffered, total = self._unread(client)
        if not buffered:
            self._slow.discard(client)
        if client in self._slow or holds_too_much(buffered, self.max_buffered_bytes(), total):
            return Failed(BUSY, f"{buffered >> 20} MiB of audio made for this client is not "
                          "read yet; read it, then retry")
        return None

    def _unread(self, client: str) -> tuple[int, int]:
        """The audio made for `client` and not yet sent to it, and every client's together
        (one pass over the routes: this runs for every chunk)."""
        own = total = 0
        for route in self._routes.values():
            pending = route.exchange.pending_bytes
            total += pending
            if route.identity.client == client:
                own += pending
        return own, total

    def _buffered(self, client: str) -> int:
        return self._unread(client)[0]

    def _overflows(self, route: _Route, nbytes: int) -> bool:
        """Whether a chunk would take its client's unread audio past the bound, or every
        client's together past theirs (`admission.reply_fits`)."""
        buffered, total = self._unread(route.identity.client)
        return not reply_fits(buffered, nbytes, self.max_buffered_bytes(), total)

    def _post(self, job: Job, event: Event, last: bool = False) -> None:
        route = self._routes.get(job.id)
        if route is None or route.ended:
            return
        if isinstance(event, Chunk) and self._overflows(route, event.samples.nbytes):
            # The client does not read: its audio would pile up here. End the job.
            route.ended = True
            self._overflowed.append(job.id)
            self._slow.add(route.identity.client)
            route.exchange.post(Failed(BUSY, "the client did not read its audio fast "
                                       "enough; the job was cancelled"))
            return
        route.ended = last
        route.done = last and isinstance(event, Done)
        route.exchange.post(event)

    # -- Sink: a reply job's events (supervisor thread) --------------------------------------
    def started(self, job: Job, sample_rate: int) -> None:
        self._post(job, Started(sample_rate))

    def chunk(self, job: Job, seq: int, samples: npt.NDArray[np.float32]) -> None:
        self._post(job, Chunk(samples))

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str:
        self._post(job, Done(result), last=True)
        return f"reply:{job.id}"

    def fail_job(self, job: Job, error: JobError) -> str:
        self._post(job, Failed.of(error), last=True)
        return f"reply:{job.id}"

    def cancelled(self, job: Job) -> None:
        self._post(job, Cancelled(), last=True)
