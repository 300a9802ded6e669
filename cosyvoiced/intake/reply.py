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
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from cosyvoiced import logs
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import (
    REPLY_FORMATS,
    SINK_REPLY,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    new_job_id,
)
from cosyvoiced.jobspec import Limits, build_job

T = TypeVar("T")
# The job fields a reply intake may set (the format is the intake's own business: it
# encodes the chunks itself).
JOB_FIELDS = ("text", "voice", "speed", "sample_rate", "instruct")
BUSY = "busy"  # not a job error: the request was never queued
START_TIMEOUT_S = 10.0
QUERY_TIMEOUT_S = 5.0

log = logs.get_logger("cosyvoiced.intake.reply")


class Service(Protocol):
    """What a reply intake needs from the supervisor (read on the supervisor's thread)."""

    ready: bool
    stopping: bool
    voices: list[VoiceInfo]
    engine_name: str
    limits: Limits

    def queue_full(self) -> bool: ...

    def enqueue(self, job: Job) -> None: ...

    def cancel(self, job_id: str) -> bool: ...


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
    """One job's events, posted from the supervisor's thread, read on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def post(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> Event:
        return await self._events.get()


@dataclass(frozen=True)
class Submission:
    job_id: str
    fields: dict[str, Any]
    client: str  # whose in-flight requests count against max_pending_per_client
    exchange: Exchange
    # Wyoming may ask for a voice by language only: the first voice that speaks it.
    voice_language: str | None = None


@dataclass(frozen=True)
class Gone:
    """The client of this job went away: cancel it."""

    job_id: str


@dataclass
class Query:
    """Read something from the supervisor on its thread; the answer resolves `future`."""

    ask: Callable[[Service], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(repr=False)

    def answer(self, value: Any) -> None:
        def resolve() -> None:
            if not self.future.done():
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(resolve)


Inbound = Submission | Gone | Query


class LoopThread:
    """An asyncio loop running on a daemon thread; `call` runs a coroutine on it and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()

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


def unknown_voice(voice: str, voices: list[VoiceInfo]) -> JobFailure:
    """The worker's own error for a voice it does not have, raised before queueing."""
    return JobFailure(ErrorCode.UNKNOWN_VOICE, f"voice: {voice!r} is not available; choose "
                      f"one of: {', '.join(voice_names(voices))}", "voice")


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


@dataclass
class _Route:
    exchange: Exchange
    client: str


class ReplyIntake:
    """The supervisor's side of an asyncio intake: admits jobs and routes their events."""

    source = "reply"

    def __init__(self, wake: Callable[[], None], thread_name: str) -> None:
        self._wake = wake
        self._thread_name = thread_name
        self._inbound: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # job id -> its handler (supervisor thread)
        self.loop_thread: LoopThread | None = None

    def max_pending_per_client(self) -> int:
        return 16

    # -- the loop's side --------------------------------------------------------------------
    def submit(self, exchange: Exchange, fields: dict[str, Any], client: str,
               voice_language: str | None = None) -> str:
        """Hand a job to the supervisor; returns its id. Events come on `exchange`."""
        job_id = new_job_id()
        self._put(Submission(job_id, fields, client, exchange, voice_language))
        return job_id

    def gone(self, job_id: str) -> None:
        self._put(Gone(job_id))

    async def ask(self, question: Callable[[Service], T],
                  timeout_s: float = QUERY_TIMEOUT_S) -> T:
        """`question(service)`, evaluated on the supervisor's thread."""
        loop = asyncio.get_running_loop()
        query = Query(question, loop, loop.create_future())
        self._put(query)
        answer: T = await asyncio.wait_for(query.future, timeout_s)
        return answer

    def _put(self, message: Inbound) -> None:
        self._inbound.put(message)
        self._wake()

    # -- the supervisor's side --------------------------------------------------------------
    def start_loop(self) -> LoopThread:
        self.loop_thread = LoopThread(self._thread_name)
        self.loop_thread.start()
        return self.loop_thread

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

    def handle_inbound(self, service: Service) -> None:
        for message in self.inbound():
            if isinstance(message, Submission):
                self._admit(message, service)
            elif isinstance(message, Gone):
                if message.job_id in self._routes:
                    log.info("client_gone", job=message.job_id, source=self.source)
                    service.cancel(message.job_id)
            else:
                message.answer(message.ask(service))

    def _admit(self, submission: Submission, service: Service) -> None:
        refusal = self._refusal(submission, service)
        if refusal is not None:
            log.info("request_refused", source=self.source, code=refusal.code,
                     message=refusal.message)
            submission.exchange.post(refusal)
            return
        fields = submission.fields
        if fields.get("voice") is None and submission.voice_language:
            voice = voice_for_language(submission.voice_language, service.voices)
            fields = fields | ({"voice": voice} if voice else {})
        try:
            voice = fields.get("voice")
            if isinstance(voice, str) and service.voices and \
                    voice not in voice_names(service.voices):
                raise unknown_voice(voice, service.voices)
            job = build_job(fields, job_id=submission.job_id, source=self.source,
                            origin=submission.job_id, default_output=submission.job_id,
                            limits=service.limits, known=JOB_FIELDS, formats=REPLY_FORMATS,
                            sink=SINK_REPLY, stream=True)
        except JobFailure as failure:
            log.info("request_refused", source=self.source, code=str(failure.error.code),
                     message=failure.error.message)
            submission.exchange.post(Failed.of(failure.error))
            return
        self._routes[job.id] = _Route(submission.exchange, submission.client)
        service.enqueue(job)

    def _refusal(self, submission: Submission, service: Service) -> Failed | None:
        if service.stopping:
            return Failed(str(ErrorCode.SHUTTING_DOWN), "the daemon is stopping; send the "
                          "request again")
        if service.queue_full():
            return Failed(BUSY, "the queue is full (zmq.max_pending); retry later")
        limit = self.max_pending_per_client()
        in_flight = sum(1 for route in self._routes.values()
                        if route.client == submission.client)
        if in_flight >= limit:
            return Failed(BUSY, f"{in_flight} requests of this client are in flight "
                          f"(max_pending_per_client = {limit}); retry later")
        return None

    def _post(self, job: Job, event: Event, last: bool = False) -> None:
        route = self._routes.pop(job.id, None) if last else self._routes.get(job.id)
        if route is not None:
            route.exchange.post(event)

    # -- Sink: a reply job's events (supervisor thread) --------------------------------------
    def started(self, job: Job, sample_rate: int) -> None:
        self._post(job, Started(sample_rate))

    def chunk(self, job: Job, seq: int, samples: npt.NDArray[np.float32]) -> None:
        self._post(job, Chunk(samples))

    def deliver(self, job: Job, result: JobResult, samples: npt.NDArray[np.float32],
                timings: dict[str, float]) -> str:
        self._post(job, Done(result), last=True)
        return f"reply:{job.id}"

    def fail_job(self, job: Job, error: JobError) -> str:
        self._post(job, Failed.of(error), last=True)
        return f"reply:{job.id}"

    def cancelled(self, job: Job) -> None:
        self._post(job, Cancelled(), last=True)
