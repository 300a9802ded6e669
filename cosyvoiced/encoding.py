"""The encoder process: native codecs run here, so a codec that crashes costs one result.

libsndfile, LAME, libopus and libvorbis are C code fed with whatever a job produced; one of
them crashing (libsndfile 1.2.2's Vorbis encoder did, on long files) must not take the
supervisor down with it (STYLE.md: privilege separation). `Encoder` keeps ONE child process,
started with `spawn` (the supervisor never forks; the child imports numpy, soundfile, soxr
and the codecs, nothing else), and hands it work one step at a time:

- whole files (drop folder, ZeroMQ): `submit()`, then `completed()` once `wake()` was called.
  A file goes in blocks of FILE_STEP_FRAMES, joined from the result's chunks on the sending
  thread and resampled in the child when the file's rate is not the engine's (neither on the
  tick), so a stream's call waits for one block, not for a whole long file. If the child
  dies with a file in hand, a new child starts and the file is tried once more from its
  start; a second death ends it with ENCODE_FAILED.
- streams (HTTP): `open_stream()`; their encoder state lives in the child, so a child that
  dies breaks every open stream (EncodeFailed): the bytes already sent cannot be re-made.
  PCM and WAV streams are numpy only and are encoded in the calling thread.
- uploaded voice audio (a voice to register): `read_prompt()` decodes and checks it here,
  the one untrusted file the daemon itself decodes. A child that dies on it fails that
  upload (prompt_audio_unreadable), and only it.

Memory: the parent holds each queued file's chunks until its last block is answered (a
retry needs them): 4 bytes a sample, 141 MB for 1,600 s at 22050 Hz (a long one mapped from
the spool's disk, replyaudio.py: the pages of the blocks sent leave its memory). One
message crosses a pipe at a time: a block of at most FILE_STEP_FRAMES (4 MiB) or one stream
call's samples down; one call's bytes, or one reply file's bytes (at most the size of its
WAV), up. A drop-folder file (`submit`'s staging) is written by the child where it goes,
block by block: its bytes never come up.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType

import numpy as np
import numpy.typing as npt

from cosyvoiced import audio, lifeline, logs, speakers
from cosyvoiced.intake import codecs
from cosyvoiced.job import REPLY_FORMATS, ErrorCode, JobError, JobFailure, ResultAudio, Staging

log = logs.get_logger("cosyvoiced.encoding")

FILE_STEP_FRAMES = 1 << 20  # 47 s at 22050 Hz: a Vorbis block takes well under a second
STEP_TIMEOUT_S = 120.0  # one step of a child that answers nothing for this long: it is hung
MAX_ATTEMPTS = 2  # children that may die with one file in hand
IN_PROCESS_STREAMS = ("pcm", "wav")  # numpy only: no native code, no pipe round trip
_POLL_S = 0.25  # how often the reader (and the idle sender) look at the clock for a hung step
_REAP_S = 5.0  # how long a child whose pipe closed may take to be reaped, before SIGKILL
_QUICK_DEATH_S = 2.0  # a child that dies younger than this delays its successor
_MAX_RESTART_DELAY_S = 5.0


# -- what crosses the pipes --------------------------------------------------------------------
@dataclass(frozen=True)
class _FileBlock:
    step: int
    file: int
    fmt: str
    sample_rate: int  # the file's
    made_rate: int  # the samples': the child resamples when the two differ
    samples: npt.NDArray[np.float32]
    first: bool
    last: bool
    into: str | None = None  # with the first block: the file to write (else its bytes come back)


@dataclass(frozen=True)
class _StreamBlock:
    step: int
    stream: int
    fmt: str
    sample_rate: int
    samples: npt.NDArray[np.float32] | None  # None: finish the stream


@dataclass(frozen=True)
class _StreamClose:
    step: int
    stream: int


@dataclass(frozen=True)
class _PromptRead:
    step: int
    audio: bytes


_Request = _FileBlock | _StreamBlock | _StreamClose | _PromptRead


@dataclass(frozen=True)
class _Ack:
    """The child took this step in hand."""

    step: int


@dataclass(frozen=True)
class _Reply:
    step: int
    data: bytes
    error: str | None = None  # a Python exception: deterministic, so never retried
    failure: JobError | None = None  # what is wrong with the input (a prompt's audio)


# -- the child ---------------------------------------------------------------------------------
def _child_main(requests: Connection, replies: Connection) -> None:
    """Entry point of the encoder process: serve steps until the request pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    lifeline.die_with_parent()  # a SIGKILLed supervisor takes the encoder too
    files: dict[int, _FileInHand] = {}
    streams: dict[int, codecs.StreamEncoder] = {}
    try:
        while True:
            request: _Request = requests.recv()
            replies.send(_Ack(request.step))
            try:
                reply = _Reply(request.step, _serve(request, files, streams))
            except JobFailure as failure:
                reply = _Reply(request.step, b"", failure=failure.error)
            except Exception as error:  # noqa: BLE001 - the parent fails that one request
                _forget(request, files, streams)
                reply = _Reply(request.step, b"", f"{type(error).__name__}: {error}")
            replies.send(reply)
    except (EOFError, OSError):
        return  # the parent closed the pipe, or is gone


class _FileInHand:
    """A file the child is making: its writer, and its resampler when the audio was made at
    another rate than the file's."""

    def __init__(self, block: _FileBlock) -> None:
        self.writer = audio.FileWriter(block.sample_rate, block.fmt, block.into)
        self.resampler = audio.stream_resampler(block.made_rate, block.sample_rate)

    def write(self, block: _FileBlock) -> None:
        samples = block.samples
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples, last=block.last)
        self.writer.write(samples)


def _serve(request: _Request, files: dict[int, _FileInHand],
           streams: dict[int, codecs.StreamEncoder]) -> bytes:
    if isinstance(request, _PromptRead):
        return speakers.prepare(request.audio)
    if isinstance(request, _FileBlock):
        if request.first:
            files.clear()  # one file at a time: one begun earlier was abandoned
            files[request.file] = _FileInHand(request)
        files[request.file].write(request)
        return files.pop(request.file).writer.finish() if request.last else b""
    if isinstance(request, _StreamBlock):
        encoder = streams.get(request.stream)
        if encoder is None:
            encoder = streams[request.stream] = codecs.encoder(request.fmt, request.sample_rate)
        if request.samples is None:
            del streams[request.stream]
            return encoder.finish()
        return encoder.encode(request.samples)
    streams.pop(request.stream, None)
    return b""


def _forget(request: _Request, files: dict[int, _FileInHand],
            streams: dict[int, codecs.StreamEncoder]) -> None:
    if isinstance(request, _FileBlock):
        files.pop(request.file, None)
    elif not isinstance(request, _PromptRead):
        streams.pop(request.stream, None)


# -- the parent --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """A whole file's outcome: its bytes, or why there are none."""

    key: str
    data: bytes | None
    error: JobError | None


class EncodeFailed(Exception):
    """A stream cannot go on (its encoder process died, or its codec refused the samples)."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(eq=False)
class _File:
    key: str
    made: ResultAudio
    fmt: str
    id: int
    staging: Staging | None  # the file the child writes itself, if any
    into: str | None = None  # its path, once created
    sent: int = 0  # frames (as made) handed to the current child
    attempts: int = 0  # children that died with it in hand

    @property
    def audio_s(self) -> float:
        return self.made.made_frames / self.made.made_rate

    def describe(self) -> str:
        return f"{self.fmt} ({self.audio_s:.1f} s at {self.made.rate} Hz)"


@dataclass(eq=False)
class _Stream:
    id: int
    fmt: str
    sample_rate: int
    generation: int | None = None  # the child that holds its state, once it has any
    failure: JobError | None = None
    ended: bool = False  # finish() called or closed: no more calls
    closed: bool = False  # abandoned: calls still queued are not sent


@dataclass(eq=False)
class _Read:
    """An uploaded voice's audio, to be decoded and checked in the child."""

    audio: bytes
    future: Future[bytes]


@dataclass(eq=False)
class _Call:
    stream: _Stream
    samples: npt.NDArray[np.float32] | None  # None: finish
    future: Future[bytes] | None  # None: close


@dataclass(eq=False)
class _InFlight:
    step: int
    owner: _File | _Stream | _Read
    future: Future[bytes] | None
    sent_at: float
    last: bool = False  # a file's last block, a stream's finish: the child lets it go
    acked: bool = False


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is None:
        return "it could not be reaped"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _resolve(future: Future[bytes] | None, data: bytes | None = None,
             error: BaseException | None = None) -> None:
    if future is None:
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(data or b"")
    except InvalidStateError:
        pass  # its caller gave up waiting (cancelled): nobody wants the answer


class _Book:
    """What waits for the child and what it has in hand: no processes, no lock of its own
    (the Encoder's lock guards it). Methods append to `settle` what must run outside that
    lock: futures resolved, the supervisor woken."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.ids = itertools.count(1)
        self.files: deque[_File] = deque()  # the first one is the one the child may hold
        self.calls: deque[_Call] = deque()
        self.reads: deque[_Read] = deque()
        self.streams: dict[int, _Stream] = {}  # those whose state the child holds
        self.in_flight: _InFlight | None = None
        self.completed: list[Encoded] = []
        self.saving: deque[_File] = deque()  # written by the child, for the saving thread

    def has_work(self) -> bool:
        return bool(self.files or self.calls or self.reads)

    def busy_key(self) -> str | None:
        flight = self.in_flight
        if flight is not None and flight.acked and isinstance(flight.owner, _File):
            return flight.owner.key
        return None

    # -- sending -----------------------------------------------------------------------------
    def next_request(self, generation: int, settle: list[Callable[[], None]]) -> _Request | None:
        """The next step to send (streams first: they are waited on live), now in flight."""
        while self.calls:
            request = self._stream_request(self.calls.popleft(), generation, settle)
            if request is not None:
                return request
        if self.reads:  # a client waits for each, as for a stream
            read, step = self.reads.popleft(), next(self.ids)
            self.in_flight = _InFlight(step, read, read.future, time.monotonic())
            return _PromptRead(step, read.audio)
        if not self.files:
            return None
        file = self.files[0]
        if file.staging is not None and file.into is None:
            try:
                file.into = file.staging.create()
            except OSError as error:
                self.finish_file(file, None, JobError(
                    ErrorCode.INTERNAL, f"could not write the result: {error}"), settle)
                return None
        # Joined here, on the sending thread, one block at a time: never on the tick.
        file.made.let_read_pages_go(file.sent)  # the blocks before: sent
        block = audio.frames_from(file.made.chunks, file.sent, FILE_STEP_FRAMES)
        first = file.sent == 0
        file.sent += len(block)
        last = file.sent >= file.made.made_frames
        step = next(self.ids)
        self.in_flight = _InFlight(step, file, None, time.monotonic(), last=last)
        return _FileBlock(step, file.id, file.fmt, file.made.rate, file.made.made_rate, block,
                          first, last, file.into if first else None)

    def _stream_request(self, call: _Call, generation: int,
                        settle: list[Callable[[], None]]) -> _Request | None:
        stream, step = call.stream, next(self.ids)
        if call.future is None:  # close
            if self.streams.pop(stream.id, None) is None:
                return None  # finished already, or the child that held it is gone
            self.in_flight = _InFlight(step, stream, None, time.monotonic())
            return _StreamClose(step, stream.id)
        if stream.failure is None and (call.future.cancelled() or stream.closed):
            stream.failure = JobError(ErrorCode.ENCODE_FAILED, "the stream was abandoned")
        if stream.failure is not None:
            settle.append(functools.partial(_resolve, call.future,
                                            error=EncodeFailed(stream.failure)))
            return None
        if stream.generation is None:
            stream.generation = generation
            self.streams[stream.id] = stream
        self.in_flight = _InFlight(step, stream, call.future, time.monotonic(),
                                   last=call.samples is None)
        return _StreamBlock(step, stream.id, stream.fmt, stream.sample_rate, call.samples)

    # -- answers -----------------------------------------------------------------------------
    def receive(self, message: _Ack | _Reply, settle: list[Callable[[], None]]) -> bool:
        """Take the child's message in; True when it answered the step in flight."""
        flight = self.in_flight
        if flight is None or message.step != flight.step:
            return False  # an answer to a step already written off
        if isinstance(message, _Ack):
            flight.acked = True
            return False
        self.in_flight = None
        if isinstance(flight.owner, _File):
            self._file_answered(flight.owner, flight.last, message, settle)
        elif isinstance(flight.owner, _Read):
            settle.append(functools.partial(_resolve, flight.future, message.data,
                                            _read_failure(message)))
        else:
            self._stream_answered(flight, flight.owner, message, settle)
        return True

    def _file_answered(self, file: _File, last: bool, reply: _Reply,
                       settle: list[Callable[[], None]]) -> None:
        if reply.error is not None:
            self.finish_file(file, None, JobError(
                ErrorCode.ENCODE_FAILED, f"encoding {file.describe()} failed: {reply.error}"),
                settle)
        elif last:
            self.finish_file(file, reply.data, None, settle)

    def _stream_answered(self, flight: _InFlight, stream: _Stream, reply: _Reply,
                         settle: list[Callable[[], None]]) -> None:
        if reply.error is not None:
            stream.failure = JobError(ErrorCode.ENCODE_FAILED,
                                      f"encoding the {stream.fmt} stream failed: {reply.error}")
            self.streams.pop(stream.id, None)  # the child dropped it
            settle.append(functools.partial(_resolve, flight.future,
                                            error=EncodeFailed(stream.failure)))
            return
        if flight.future is not None and flight.future.cancelled() and stream.failure is None:
            # Its caller gave up on these bytes: the rest of the stream would not play.
            stream.failure = JobError(ErrorCode.ENCODE_FAILED, "the stream was abandoned")
        if flight.last:
            self.streams.pop(stream.id, None)  # finished: the child has let it go
        settle.append(functools.partial(_resolve, flight.future, reply.data))

    def finish_file(self, file: _File, data: bytes | None, error: JobError | None,
                    settle: list[Callable[[], None]]) -> None:
        if file in self.files:
            self.files.remove(file)
        if error is not None:
            log.warning("encode_failed", key=file.key, format=file.fmt, code=str(error.code),
                        message=error.message)
            if file.staging is not None:
                settle.append(file.staging.discard)
        elif file.staging is not None and data is not None:
            self.saving.append(file)  # the saving thread completes it
            return
        self.completed.append(Encoded(file.key, data, error))
        settle.append(self._wake)

    # -- a child that died -------------------------------------------------------------------
    def in_hand(self) -> _File | _Stream | _Read | None:
        """What the child was working on: the step in flight's owner, else a file it has begun
        (between two of its blocks)."""
        if self.in_flight is not None:
            return self.in_flight.owner
        return next((file for file in self.files if file.sent), None)

    def charge_death(self, how: str, settle: list[Callable[[], None]]) -> None:
        """Fail what cannot survive the child's death (the file in hand at its second death,
        every open stream); put every other file back to its start."""
        in_hand = self.in_hand()
        flight, self.in_flight = self.in_flight, None
        if isinstance(in_hand, _File):
            in_hand.attempts += 1
            if in_hand.attempts >= MAX_ATTEMPTS:
                self.finish_file(in_hand, None, JobError(
                    ErrorCode.ENCODE_FAILED, f"the encoder process died {in_hand.attempts} "
                    f"times encoding this result as {in_hand.describe()}; last: {how}"), settle)
        for file in self.files:
            file.sent = 0  # the next child starts each file afresh
        broken = JobError(ErrorCode.ENCODE_FAILED, f"the encoder process died ({how}) while "
                          "this stream was open; a stream cannot be resumed")
        for stream in self.streams.values():
            stream.failure = broken
        self.streams.clear()
        if flight is not None and isinstance(flight.owner, _Stream):
            flight.owner.failure = broken
            settle.append(functools.partial(_resolve, flight.future,
                                            error=EncodeFailed(broken)))
        if flight is not None and isinstance(flight.owner, _Read):
            # Never tried again: the audio that killed one child would kill the next.
            settle.append(functools.partial(_resolve, flight.future, error=JobFailure(
                ErrorCode.PROMPT_AUDIO_UNREADABLE, f"prompt_audio: decoding it ended the "
                f"decoder process ({how})", "prompt_audio")))
        self._fail_calls_of_broken_streams(settle)

    def fail_everything(self, error: JobError, settle: list[Callable[[], None]]) -> None:
        """On stop: every file and stream call still waiting ends with `error`."""
        for file in [*self.files, *self.saving]:
            self.finish_file(file, None, error, settle)
        self.saving.clear()
        for stream in [*self.streams.values(), *(call.stream for call in self.calls)]:
            stream.failure = error
        flight, self.in_flight = self.in_flight, None
        if flight is not None and isinstance(flight.owner, _Stream):
            settle.append(functools.partial(_resolve, flight.future, error=EncodeFailed(error)))
        reads = [*self.reads, *([flight.owner] if flight is not None and
                                isinstance(flight.owner, _Read) else [])]
        self.reads.clear()
        for read in reads:
            settle.append(functools.partial(_resolve, read.future, error=JobFailure(
                error.code, error.message)))
        self._fail_calls_of_broken_streams(settle)

    def _fail_calls_of_broken_streams(self, settle: list[Callable[[], None]]) -> None:
        keep: deque[_Call] = deque()
        for call in self.calls:
            failure = call.stream.failure
            if failure is None:
                keep.append(call)
            elif call.future is not None:
                settle.append(functools.partial(_resolve, call.future,
                                                error=EncodeFailed(failure)))
        self.calls = keep


def _read_failure(reply: _Reply) -> JobFailure | None:
    if reply.failure is not None:
        return JobFailure(reply.failure.code, reply.failure.message, reply.failure.field)
    if reply.error is not None:
        return JobFailure(ErrorCode.PROMPT_AUDIO_UNREADABLE, f"prompt_audio: not an audio "
                          f"file soundfile can read ({reply.error})", "prompt_audio")
    return None


def _describe(owner: _File | _Stream | _Read | None) -> dict[str, object]:
    """What the child had in hand, as log fields."""
    if isinstance(owner, _File):
        return {"encoding": "file", "key": owner.key, "format": owner.fmt,
                "audio_s": round(owner.audio_s, 1),
                "attempt": owner.attempts + 1}
    if isinstance(owner, _Stream):
        return {"encoding": "stream", "stream": owner.id, "format": owner.fmt}
    if isinstance(owner, _Read):
        return {"encoding": "prompt_audio", "bytes": len(owner.audio)}
    return {"encoding": None}


def _settle(settle: list[Callable[[], None]]) -> None:
    """Resolve futures and wake the supervisor outside the lock: a callback may call in."""
    for action in settle:
        action()


class Encoder:
    """Encodes files and streams in one child process; thread-safe.

    `wake` is called (from the encoder's receiving thread, or from `submit`/`stop`) each time
    a file's outcome is ready; `completed()` then returns it. It must be quick, never block.
    """

    def __init__(self, wake: Callable[[], None], step_timeout_s: float = STEP_TIMEOUT_S) -> None:
        self._wake = wake
        self._step_timeout_s = step_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Condition()
        self._book = _Book(self._call_wake)
        self._process: BaseProcess | None = None
        self._requests: Connection | None = None  # parent -> child
        self._replies: Connection | None = None  # child -> parent
        self._generation = 0
        self._started_at = 0.0
        self._quick_deaths = 0
        self._sending = False
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # -- life --------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn()
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._send_loop,),
                             name="cosyvoiced-encoder-send", daemon=True),
            threading.Thread(target=self._guarded, args=(self._receive_loop,),
                             name="cosyvoiced-encoder-receive", daemon=True),
            threading.Thread(target=self._guarded, args=(self._save_loop,),
                             name="cosyvoiced-encoder-save", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop the child and the threads; returns within `timeout_s`, killing if need be.

        Files not yet encoded come back from `completed()` as SHUTTING_DOWN; open streams'
        calls raise EncodeFailed with the same code."""
        deadline = time.monotonic() + timeout_s
        settle: list[Callable[[], None]] = []
        with self._lock:
            self._stopping = True
            self._book.fail_everything(
                JobError(ErrorCode.SHUTTING_DOWN, "the encoder is stopping"), settle)
            process = self._process
            self._lock.notify_all()
        _settle(settle)
        if process is not None and process.is_alive():
            process.terminate()
            self._join_threads(time.monotonic() + (deadline - time.monotonic()) / 2)
            if process.is_alive():  # SIGTERM did not end it (uninterruptible sleep): SIGKILL
                process.kill()
        self._join_threads(deadline)
        log.info("encoder_stopped", pid=process.pid if process else None)

    def _join_threads(self, deadline: float) -> None:
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def pid(self) -> int | None:
        """The current child's pid (a new one after each restart)."""
        with self._lock:
            return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        """Serving: started, not stopped, and its threads run. A child that died and is being
        replaced does not make it False; a thread that died does."""
        with self._lock:
            return bool(self._threads) and not self._stopping and \
                all(thread.is_alive() for thread in self._threads)

    def failure(self) -> str | None:
        """Why the encoder stopped serving, if its threads died (the supervisor stops)."""
        return None if self.alive() else "the encoder's threads stopped"

    def busy_key(self) -> str | None:
        """The key of the file the child has taken in hand, if it is encoding one now."""
        with self._lock:
            return self._book.busy_key()

    # -- whole files -------------------------------------------------------------------------
    def submit(self, key: str, made: ResultAudio, fmt: str,
               staging: Staging | None = None) -> None:
        """Encode `made` as a file of `fmt` (REPLY_FORMATS) at its rate; the outcome comes
        back from `completed()` under `key`. Never blocks, never copies the audio.

        With `staging`, the child writes the file where it goes, block by block (its bytes
        never come back), the saving thread fsyncs it (a second on a slow disk for a long
        result, never on the tick) and the outcome's data is empty; an OSError fails the
        file, and what there is of it is discarded."""
        if fmt not in REPLY_FORMATS:
            raise ValueError(f"no file format {fmt!r}")
        file = _File(key, made, fmt, next(self._book.ids), staging)
        settle: list[Callable[[], None]] = []
        with self._lock:
            self._book.files.append(file)
            if self._stopping:
                self._book.finish_file(file, None, JobError(
                    ErrorCode.SHUTTING_DOWN, "the encoder is stopping"), settle)
            self._lock.notify_all()
        _settle(settle)

    def backlog_bytes(self) -> int:
        """The audio this holds for the files waiting to be encoded, being encoded, or
        written and waiting to be fsynced."""
        with self._lock:
            return sum(file.made.nbytes for file in [*self._book.files, *self._book.saving])

    def completed(self) -> list[Encoded]:
        """The files whose outcome came in since the last call."""
        with self._lock:
            done, self._book.completed = self._book.completed, []
            return done

    # -- streams -----------------------------------------------------------------------------
    def open_stream(self, fmt: str, sample_rate: int) -> EncoderStream:
        """A stream of `fmt` (codecs.FORMATS). Close it when done or abandoned."""
        if fmt not in codecs.FORMATS:
            raise ValueError(f"no stream format {fmt!r}")
        if fmt in IN_PROCESS_STREAMS:
            return EncoderStream(self, None, codecs.encoder(fmt, sample_rate))
        return EncoderStream(self, _Stream(next(self._book.ids), fmt, sample_rate), None)

    # -- uploaded voice audio ----------------------------------------------------------------
    def read_prompt(self, audio_file: bytes) -> Future[bytes]:
        """Decode and check a voice's audio file in the child: the future gives its stored
        form (`speakers.prepare`), or raises `JobFailure` with the drop folder's
        prompt_audio codes (shutting_down while stopping)."""
        future: Future[bytes] = Future()
        with self._lock:
            if self._stopping:
                future.set_exception(JobFailure(ErrorCode.SHUTTING_DOWN,
                                                "the daemon is stopping"))
                return future
            self._book.reads.append(_Read(audio_file, future))
            self._lock.notify_all()
        return future

    def _call(self, stream: _Stream, samples: npt.NDArray[np.float32] | None) -> Future[bytes]:
        future: Future[bytes] = Future()
        with self._lock:
            if stream.failure is not None:
                raise EncodeFailed(stream.failure)
            if self._stopping:
                raise EncodeFailed(JobError(ErrorCode.SHUTTING_DOWN, "the encoder is stopping"))
            if stream.ended:
                raise EncodeFailed(JobError(ErrorCode.ENCODE_FAILED, f"the {stream.fmt} "
                                            "stream is closed"))
            stream.ended = samples is None
            self._book.calls.append(_Call(stream, samples, future))
            self._lock.notify_all()
        return future

    def _close(self, stream: _Stream) -> None:
        with self._lock:
            stream.ended = stream.closed = True
            if stream.id in self._book.streams:  # the child holds its state: let it go
                self._book.calls.append(_Call(stream, None, None))
                self._lock.notify_all()

    # -- the sending thread ------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            settle: list[Callable[[], None]] = []
            with self._lock:
                due = self._lock.wait_for(lambda: self._stopping or (
                    self._book.in_flight is None and self._requests is not None and
                    self._book.has_work()), _POLL_S)
                if self._stopping:
                    return
                if due:
                    request = self._book.next_request(self._generation, settle)
                    pipe = self._requests
                    self._sending = request is not None
            if not due:
                # The receiving thread looks at the clock only between two reads: a child
                # that stops partway through a reply holds it in that read. This thread is
                # idle whenever a step is in flight, so it looks too.
                self._kill_if_hung()
                continue
            _settle(settle)
            if request is not None and pipe is not None:
                self._send(pipe, request)

    def _send(self, pipe: Connection, request: _Request) -> None:
        try:
            pipe.send(request)
        except (OSError, ValueError):
            pass  # the child is gone: the receiving thread replaces it
        finally:
            with self._lock:
                self._sending = False
                self._lock.notify_all()

    # -- the saving thread -------------------------------------------------------------------
    def _save_loop(self) -> None:
        """Files the child wrote (`submit`'s staging), fsynced one at a time: a slow disk
        holds up neither the tick nor the streams' replies."""
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or bool(self._book.saving))
                if self._stopping:
                    return  # a drop-folder job not saved is made again at the next start
                file = self._book.saving.popleft()
            assert file.staging is not None, "only files with a staging are queued"
            error: JobError | None = None
            try:
                file.staging.settle()
            except OSError as failure:
                error = JobError(ErrorCode.INTERNAL, f"could not write the result: {failure}")
                file.staging.discard()
            with self._lock:
                self._book.completed.append(Encoded(file.key, b"" if error is None else None,
                                                    error))
            self._call_wake()

    # -- the receiving thread ----------------------------------------------------------------
    def _receive_loop(self) -> None:
        while True:
            with self._lock:
                replies = self._replies
            if replies is None:
                return
            try:
                if not replies.poll(_POLL_S):
                    self._kill_if_hung()
                    continue
                message: _Ack | _Reply = replies.recv()
            except (EOFError, OSError):
                if not self._replace_child():
                    return
                continue
            self._receive(message)

    def _receive(self, message: _Ack | _Reply) -> None:
        settle: list[Callable[[], None]] = []
        with self._lock:
            if self._book.receive(message, settle):
                self._quick_deaths = 0
                self._lock.notify_all()
        _settle(settle)

    def _kill_if_hung(self) -> None:
        with self._lock:
            flight, process = self._book.in_flight, self._process
            if flight is None or process is None or \
                    time.monotonic() - flight.sent_at < self._step_timeout_s:
                return
            flight.sent_at = float("inf")  # once
        log.error("encoder_hung", pid=process.pid, step_timeout_s=self._step_timeout_s,
                  **_describe(flight.owner))
        process.kill()  # its pipe closes: the receiving thread replaces it

    # -- a child that died -------------------------------------------------------------------
    def _replace_child(self) -> bool:
        """Reap the dead child, charge what it had in hand, start the next. False: stopping."""
        with self._lock:
            process = self._process
        exitcode = _reap(process)
        how = _how_it_died(exitcode)
        settle: list[Callable[[], None]] = []
        with self._lock:
            self._lock.wait_for(lambda: not self._sending, _REAP_S)  # it fails fast: EPIPE
            self._close_pipes()
            if self._stopping:
                return False
            log.error("encoder_lost", pid=process.pid if process else None, exitcode=exitcode,
                      how=how, generation=self._generation, **_describe(self._book.in_hand()))
            self._book.charge_death(how, settle)
            delay = self._restart_delay()
        _settle(settle)
        with self._lock:
            if self._lock.wait_for(lambda: self._stopping, delay):
                return False
        self._spawn()
        return True

    def _close_pipes(self) -> None:
        for pipe in (self._requests, self._replies):
            if pipe is not None:
                pipe.close()
        self._requests = self._replies = None

    def _restart_delay(self) -> float:
        """No delay after one death; a child that keeps dying young waits longer each time."""
        if time.monotonic() - self._started_at >= _QUICK_DEATH_S:
            self._quick_deaths = 0
            return 0.0
        self._quick_deaths += 1
        if self._quick_deaths < 2:
            return 0.0
        return float(min(0.1 * 2 ** (self._quick_deaths - 2), _MAX_RESTART_DELAY_S))

    def _spawn(self) -> None:
        requests_out, requests_in = self._context.Pipe(duplex=False)
        replies_out, replies_in = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_child_main, args=(requests_out, replies_in),
                                        name="cosyvoiced-encoder", daemon=True)
        process.start()
        requests_out.close()  # the child's ends: its death closes them
        replies_in.close()
        with self._lock:
            self._generation += 1
            self._process, self._requests, self._replies = process, requests_in, replies_out
            self._started_at = time.monotonic()
            self._lock.notify_all()
        log.info("encoder_started", pid=process.pid, generation=self._generation)

    # -- helpers -----------------------------------------------------------------------------
    def _call_wake(self) -> None:
        try:
            self._wake()
        except Exception:  # the next wake, or the tick, still drains it
            log.exception("encoder_wake_failed")

    def _guarded(self, loop: Callable[[], None]) -> None:
        """A thread that dies says so loudly; `alive()` turns False for the supervisor."""
        try:
            loop()
        except Exception:
            log.critical("encoder_thread_died", thread=threading.current_thread().name,
                         exc_info=True)
            raise


def _reap(process: BaseProcess | None) -> int | None:
    if process is None:
        return None
    process.join(_REAP_S)
    if process.is_alive():  # it closed its pipe yet lives on: it is no use now
        process.kill()
        process.join(_REAP_S)
    return process.exitcode


class EncoderStream:
    """One streamed file. Await each call before the next; `close()` when done or abandoned
    (idempotent; `async with` does it)."""

    def __init__(self, encoder: Encoder, stream: _Stream | None,
                 local: codecs.StreamEncoder | None) -> None:
        self._encoder = encoder
        self._stream = stream
        self._local = local
        self._closed = False

    async def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        """The bytes to send for these samples (may be empty while the codec buffers)."""
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if self._stream is None:
            return self._local_call(samples)
        return await asyncio.wrap_future(self._encoder._call(self._stream, samples))

    async def finish(self) -> bytes:
        """The last bytes of the file."""
        if self._stream is None:
            return self._local_call(None)
        return await asyncio.wrap_future(self._encoder._call(self._stream, None))

    def _local_call(self, samples: npt.NDArray[np.float32] | None) -> bytes:
        assert self._local is not None, "a stream is local or in the child"
        if self._closed:
            raise EncodeFailed(JobError(ErrorCode.ENCODE_FAILED, "the stream is closed"))
        if samples is None:
            self._closed = True
            return self._local.finish()
        return self._local.encode(samples)

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._encoder._close(self._stream)

    async def __aenter__(self) -> EncoderStream:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.close()
