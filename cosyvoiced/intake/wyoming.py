"""The Wyoming intake: Home Assistant's voice pipeline, on the `wyoming` library's server.

One `AsyncEventHandler` per connection, on a loop thread of its own (`reply.LoopThread`):
- `describe` -> `info`: our voices and their languages;
- `synthesize` -> one streamed reply job (source "wyoming"): `audio-start` when it starts,
  `audio-chunk`s as they are made, `audio-stop` at its end;
- `synthesize-start` / `-chunk` / `-stop` (text streamed from an LLM): each complete
  sentence becomes a job as soon as its text is in, and the jobs' audio is sent in order,
  each as start/chunks/stop; `synthesize-stopped` ends the stream. The `synthesize` that
  Home Assistant also sends inside a stream (for older servers) is ignored.
A job that fails sends an `error` event with the drop folder's code. A malformed event gets
an `error` event too, and the connection is closed: it never just looks closed.

Limits, as nginx's for HTTP (each read from `wyoming.*` when it applies, so a reload counts):
`idle_timeout_s` closes a connection that sends no event, or takes none of our bytes, for
that long; `read_timeout_s` bounds one event once its first byte is in; `max_connections`
refuses one more connection with an `error` (busy), unless another address holds more and
one of its connections waits with nothing in hand: that one is closed instead (`crowding`);
`max_pending_per_client` bounds the requests one connection has in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from cosyvoiced import __version__, audio, cleanup, clients, logs
from cosyvoiced.config import WyomingConfig
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake.crowding import QUIET_S, AddressBook, peer_address
from cosyvoiced.intake.limits import Throttled
from cosyvoiced.intake.reply import (
    START_TIMEOUT_S,
    Chunk,
    Done,
    Exchange,
    Failed,
    ReplyIntake,
    Started,
)
from cosyvoiced.intake.unsaid import Unsaid
from cosyvoiced.job import ErrorCode
from cosyvoiced.sentences import SentenceSplitter
from cosyvoiced.untrusted import NotJSON, json_value

SOURCE = "wyoming"
SAMPLES_PER_CHUNK = 1024  # as wyoming-piper: small events keep a satellite's buffer short
MAX_LINE_BYTES = 64 << 10  # an event's JSON header line
MAX_DATA_BYTES = 64 << 10  # its data block
MAX_PAYLOAD_BYTES = 1 << 20  # its binary payload, read only to be thrown away
# None of the events a TTS server handles has a payload (only audio-chunk has one in the
# `wyoming` library; Home Assistant sends none with its TTS events): one that comes with a
# payload is refused. Another event's payload is discarded as it comes, this much at a time,
# never kept: 250 connections each holding 1 MiB of one grew the supervisor by 260 MiB.
PAYLOAD_FREE = (Describe, Ping, Synthesize, SynthesizeStart, SynthesizeChunk, SynthesizeStop)
DISCARD_BYTES = 16 << 10
# Read ahead while a connection waits on its jobs, to see a hang-up behind the events the
# client sent before it (an LLM's stream runs ahead of our speech); then no more is read.
MAX_READ_AHEAD_BYTES = 64 << 10
# A streamed text with no sentence end for this long is spoken up to its last space.
MAX_SEGMENT_CHARS = 1000
VOICE_KEYS = ("name", "language", "speaker")
# A stream's jobs in hand at once (queued, being made or being sent), at most: the next
# sentence is ready when one ends, and an LLM that writes faster than we speak waits,
# its events unread (TCP holds them back), rather than piling up jobs here.
STREAM_LOOKAHEAD = 4
_ATTRIBUTION = {
    "piper": Attribution(name="Piper", url="https://github.com/rhasspy/piper"),
    "cosyvoice": Attribution(name="CosyVoice", url="https://github.com/FunAudioLLM/CosyVoice"),
}
STOP_TIMEOUT_S = 3.0
Message = TypeVar("Message")

log = logs.get_logger("cosyvoiced.intake.wyoming")


class BadEvent(Exception):
    """A message that is not a Wyoming event (or is over our limits)."""


class IdleTimeout(Exception):
    """No event began within wyoming.idle_timeout_s."""


class Readable(Protocol):
    """What `read_event` reads: an `asyncio.StreamReader`, or a `ReadAhead`."""

    async def read(self, n: int = -1) -> bytes: ...

    async def readline(self) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


class ReadAhead:
    """A connection's bytes, those read ahead of time (`read_more`) first."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._ahead = bytearray()

    def __len__(self) -> int:
        return len(self._ahead)

    async def read_more(self, limit: int) -> bool:
        """Read ahead what has come, up to `limit` bytes held; False at the end of the
        stream (a reset raises)."""
        data = await self._reader.read(limit - len(self._ahead))
        self._ahead += data
        return bool(data)

    async def read(self, n: int = -1) -> bytes:
        if not self._ahead:
            return await self._reader.read(n)
        return self._take(len(self._ahead) if n < 0 else n)

    async def readline(self) -> bytes:
        end = self._ahead.find(b"\n")
        if end >= 0:
            return self._take(end + 1)
        return self._take(len(self._ahead)) + await self._reader.readline()

    async def readexactly(self, n: int) -> bytes:
        held = self._take(n)
        return held + await self._reader.readexactly(n - len(held)) if len(held) < n else held

    def _take(self, n: int) -> bytes:
        taken = bytes(self._ahead[:n])
        del self._ahead[:n]
        return taken


async def read_event(reader: Readable, idle_timeout_s: float | None = None,
                     read_timeout_s: float | None = None) -> Event | None:
    """The next event, or None at the end of the stream. Unlike the library's
    `async_read_event`, a malformed or oversized event raises `BadEvent`, as does one that
    is not whole within `read_timeout_s` of its first byte; `IdleTimeout` if no event
    begins within `idle_timeout_s`."""
    try:
        first = await asyncio.wait_for(reader.read(1), idle_timeout_s)
    except TimeoutError:
        raise IdleTimeout(f"no event for {idle_timeout_s:g} s") from None
    if not first:
        return None
    try:
        async with asyncio.timeout(read_timeout_s):
            return await _read_rest(reader, first)
    except TimeoutError:
        raise BadEvent(f"event: not whole within wyoming.read_timeout_s ({read_timeout_s:g} "
                       "s) of its first byte") from None


async def _read_rest(reader: Readable, first: bytes) -> Event | None:
    try:
        line = first + await reader.readline()
    except ValueError as error:  # asyncio's LimitOverrunError comes out as ValueError
        raise BadEvent(f"event header: over {MAX_LINE_BYTES} bytes") from error
    if len(line) > MAX_LINE_BYTES:  # part of it read ahead, the rest within the limit
        raise BadEvent(f"event header: over {MAX_LINE_BYTES} bytes")
    try:
        header = json_value(line)
    except NotJSON as error:
        raise BadEvent(f"event header: not JSON: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise BadEvent("event header: expected a JSON object with a string \"type\"")
    data = header.get("data") or {}
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    if payload_length and any(kind.is_type(header["type"]) for kind in PAYLOAD_FREE):
        raise BadEvent(f"{header['type']}: takes no payload (payload_length {payload_length}); "
                       "no event a TTS server takes has one")
    try:
        if data_length:
            extra = json_value(await reader.readexactly(data_length))
            if not isinstance(extra, dict) or not isinstance(data, dict):
                raise BadEvent("event data: expected a JSON object")
            data = data | extra
        await _discard(reader, payload_length)
    except asyncio.IncompleteReadError:
        return None  # the peer went away mid-event
    except NotJSON as error:
        raise BadEvent(f"event data: not JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadEvent("event data: expected a JSON object")
    return Event(type=header["type"], data=data)


async def _discard(reader: Readable, length: int) -> None:
    """Read `length` bytes (an event's payload, which we never use) and keep none."""
    while length:
        length -= len(await reader.readexactly(min(length, DISCARD_BYTES)))


def decoded(kind: Callable[[Event], Message], event: Event) -> Message:
    """`kind(event)` (a message's `from_event`), a failure being the sender's: `BadEvent`.
    The library trusts the event's data: a missing key or a wrong type raises anything."""
    text = event.data.get("text")
    if text is not None and not isinstance(text, str):
        raise BadEvent(f"{event.type}: text: expected a string")
    voice = event.data.get("voice")
    if voice is not None and not isinstance(voice, dict):
        raise BadEvent(f"{event.type}: voice: expected an object such as {{\"name\": ...}}")
    for key in VOICE_KEYS:  # the library passes them on as they are, whatever their type
        if voice and voice.get(key) is not None and not isinstance(voice[key], str):
            raise BadEvent(f"{event.type}: voice.{key}: expected a string")
    try:
        return kind(event)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        what = f"{error.args[0]}: missing" if isinstance(error, KeyError) else str(error)
        raise BadEvent(f"{event.type}: {what}") from None


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadEvent(f"event header: {key} must be a non-negative integer")
    if value > limit:
        raise BadEvent(f"event header: {key} {value} is over the limit of {limit} bytes")
    return value


class TextStream:
    """Text that arrives in pieces, handed out a whole sentence (or more) at a time: the
    sentences `sentences.SentenceSplitter` finds complete, joined up to MAX_SEGMENT_CHARS
    (one job each). A piece with nothing to say once cleaned up (an emoji, a code fence's
    line) is left out rather than failed: the client sent its stream in good faith."""

    def __init__(self, voice: SynthesizeVoice | None, unsaid: Unsaid | None = None) -> None:
        self.voice = voice
        self._splitter = SentenceSplitter(MAX_SEGMENT_CHARS)
        self._unsaid = unsaid if unsaid is not None else Unsaid()  # its connection's

    @property
    def pending(self) -> bool:
        """Text came that is not a whole sentence yet: it is spoken at the next chunks."""
        return bool(self._splitter.pending)

    def add(self, text: str) -> list[str]:
        return self._speakable(self._splitter.feed(text))

    def finish(self) -> list[str]:
        return self._speakable(self._splitter.flush())

    def _speakable(self, sentences: list[str]) -> list[str]:
        """`sentences` (each at most MAX_SEGMENT_CHARS) joined into as few texts as keep to
        that bound, those that say something (the others counted as unsaid)."""
        texts = [""]
        for sentence in sentences:
            if texts[-1] and len(texts[-1]) + len(sentence) > MAX_SEGMENT_CHARS:
                texts.append("")
            texts[-1] += sentence
        said = [text for text in texts if cleanup.says_something(text)]
        self._unsaid.add(sum(map(len, texts)) - sum(map(len, said)))
        return said


def language_tag(language: str) -> str:
    """Piper's "en-us" as Home Assistant's voices are tagged: "en_US"."""
    base, _, region = language.replace("_", "-").partition("-")
    return f"{base}_{region.upper()}" if region else base


def describe(voices: list[VoiceInfo], engine: str) -> Info:
    attribution = _ATTRIBUTION.get(engine, Attribution(name=engine, url=""))
    return Info(tts=[TtsProgram(
        name="cosyvoiced", attribution=attribution, installed=True,
        description=f"cosyvoiced ({engine})", version=__version__,
        voices=[TtsVoice(name=voice.name, attribution=attribution, installed=True,
                         description=f"{voice.name} ({voice.engine}, {voice.sample_rate} Hz)",
                         version=None,
                         languages=[language_tag(voice.language)] if voice.language else [])
                for voice in voices],
        supports_synthesize_streaming=True)])


class _Connection(AsyncEventHandler):
    def __init__(self, intake: WyomingIntake, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self._intake = intake
        self.address = peer_address(writer.get_extra_info("peername"))
        # Wyoming has no authentication: each connection is an anonymous client of its own
        # (Home Assistant's satellites come from one host), taking turns as its host.
        self._client = clients.anonymous(f"wyoming:{id(self):x}", host=self.address)
        self._jobs: set[str] = set()  # in flight: cancelled if the connection drops
        self._stream: TextStream | None = None
        self._unsaid = Unsaid()  # streamed text dropped as saying nothing: read at a pace
        self._parts: asyncio.Queue[tuple[str, Exchange] | None] = asyncio.Queue()
        self._room: asyncio.Semaphore | None = None  # the open stream's lookahead
        self._speaker: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the one running `run`
        self._waiting = False  # for the next event, with no job in hand
        self._heard_at = time.monotonic()  # when it began to wait for it
        # What is read (some of it ahead, while the connection waited on its jobs).
        self._input = ReadAhead(reader)

    async def run(self) -> None:
        """Read events until the client leaves; our bounded reader, not the library's."""
        self._task = asyncio.current_task()
        if not self._intake.connection_opened(self):
            await self._refuse()
            return
        try:
            await self._serve()
        except ConnectionError:
            # The client went away while we wrote to it, or took none of our bytes for
            # idle_timeout_s: what is left for it is dropped, not flushed (close() would
            # wait for a reader that never comes, and the connection would stay open).
            self.writer.transport.abort()
        finally:
            await self._release()

    async def _serve(self) -> None:
        while True:
            settings = self._intake.settings()
            self._waiting = not self._jobs
            self._heard_at = time.monotonic()
            try:
                event = await read_event(self._input, settings.idle_timeout_s,
                                         settings.read_timeout_s)
            except IdleTimeout as idle:
                log.info("wyoming_idle_closed", reason=str(idle))
                return
            except BadEvent as bad:
                await self._error("bad_request", str(bad))
                return
            finally:
                self._waiting = False
            if event is None or not await self._handled(event):
                return

    def can_give_way(self) -> bool:
        """Nothing in hand, and our last reply all sent (and, in an open stream, no text
        waiting for the rest of its sentence, nothing said for QUIET_S): it may be closed
        for a newcomer from a less crowded address."""
        stream = self._stream
        quiet = stream is None or (
            not stream.pending and time.monotonic() - self._heard_at >= QUIET_S)
        return self._waiting and quiet and not self.writer.transport.get_write_buffer_size()

    def give_way(self) -> None:
        """Close for a newcomer (`can_give_way`): the read in `_serve` ends the connection."""
        self._waiting = False
        self.writer.transport.abort()

    async def _handled(self, event: Event) -> bool:
        """`handle_event`, whose failures end the connection with an `error` event."""
        try:
            return await self.handle_event(event)
        except BadEvent as bad:
            await self._error("bad_request", str(bad))
        except ConnectionError:
            raise
        except Exception:
            log.error("wyoming_event_failed", type=event.type, exc_info=True)
            await self._error("internal", f"{event.type}: the event could not be handled (an "
                              "internal error; it is logged)")
        return False

    async def _refuse(self) -> None:
        limit = self._intake.settings().max_connections
        self._intake.refused(self.address, limit)
        await self._error("busy", f"{limit} connections are open (wyoming.max_connections); "
                          "retry later")
        self.writer.close()

    async def _release(self) -> None:
        """Let go of everything this connection held, at once, not at the next full GC.

        A client that leaves mid-reply makes our write raise the ConnectionResetError that
        the StreamReader keeps; its traceback holds this coroutine's frames, and so this
        handler, its reader (which holds the error: a cycle), the exchanges and the audio
        chunks in them. Dropping the traceback and our own references breaks that cycle.
        """
        speaker, self._speaker = self._speaker, None
        if speaker is not None:
            speaker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await speaker
        while not self._parts.empty():
            self._parts.get_nowait()
        self._stream = None
        for job_id in self._jobs:
            self._intake.gone(job_id)
        self._jobs.clear()
        self._intake.connection_closed(self)
        error = self.reader.exception()
        if error is not None:
            error.__traceback__ = None
        self.writer.close()

    async def stop(self) -> None:
        """The server stops: end this connection now, even mid-reply; its jobs go."""
        await super().stop()
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_TIMEOUT_S / 2)

    async def write_event(self, event: Event) -> None:
        """As the library's, but a client that takes none of our bytes for
        wyoming.idle_timeout_s is gone (nginx's send_timeout)."""
        timeout_s = self._intake.settings().idle_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await super().write_event(event)
        except TimeoutError:
            raise ConnectionAbortedError(f"the client read nothing for {timeout_s:g} s") \
                from None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            voices, engine = await self._intake.ask(lambda s: (list(s.voices), s.engine_name))
            await self.write_event(describe(voices, engine).event())
        elif Ping.is_type(event.type):
            await self.write_event(Pong(text=decoded(Ping.from_event, event).text).event())
        elif Synthesize.is_type(event.type):
            if self._stream is None:  # inside a stream it only repeats the streamed text
                synthesize = decoded(Synthesize.from_event, event)
                await self._speak_watching(self._submit(synthesize.text, synthesize.voice))
        elif SynthesizeStart.is_type(event.type):
            if self._stream is not None:
                raise BadEvent("synthesize-start: a stream is open already; end it with "
                               "synthesize-stop first")
            self._stream = TextStream(decoded(SynthesizeStart.from_event, event).voice,
                                      self._unsaid)
            self._room = asyncio.Semaphore(min(STREAM_LOOKAHEAD,
                                               self._intake.settings().max_pending_per_client))
            self._speaker = asyncio.create_task(self._speak_in_order())
        elif SynthesizeChunk.is_type(event.type) or SynthesizeStop.is_type(event.type):
            return await self._streamed(event)
        else:
            log.debug("wyoming_event_ignored", type=event.type)
        return True

    async def _streamed(self, event: Event) -> bool:
        stream = self._stream
        if stream is None:
            await self._error("bad_request", f"{event.type}: no synthesize-start before it")
            return False
        if SynthesizeChunk.is_type(event.type):
            for text in stream.add(decoded(SynthesizeChunk.from_event, event).text):
                await self._queue(text, stream.voice)
            await self._unsaid.pace(source=SOURCE, peer=self.address)
            return True
        for text in stream.finish():
            await self._queue(text, stream.voice)
        self._parts.put_nowait(None)
        if self._speaker is not None:
            await self._watching(self._speaker)
            self._speaker.result()  # raises what ended it
        self._stream = self._speaker = self._room = None
        await self.write_event(SynthesizeStopped().event())
        return True

    async def _queue(self, text: str, voice: SynthesizeVoice | None) -> None:
        """Submit one text of the open stream once fewer than its lookahead are in hand.
        A speaker that ended meanwhile (its client took none of our bytes for
        idle_timeout_s) ends the connection with its error."""
        assert self._room is not None
        assert self._speaker is not None
        room = asyncio.ensure_future(self._room.acquire())
        try:
            await self._watching(room, self._speaker)
        finally:
            room.cancel()  # a no-op once acquired
        if not room.done() or room.cancelled():
            self._speaker.result()  # raises what ended it
            raise ConnectionAbortedError("the stream ended before its synthesize-stop")
        self._parts.put_nowait(self._submit(text, voice))

    def _submit(self, text: str, voice: SynthesizeVoice | None) -> tuple[str, Exchange]:
        fields: dict[str, Any] = {"text": text}
        language = None
        if voice is not None and voice.name:
            fields["voice"] = voice.name
        elif voice is not None:
            language = voice.language
        exchange = Exchange(asyncio.get_running_loop())
        job_id = self._intake.submit(exchange, fields, self._client, language)
        self._jobs.add(job_id)
        return job_id, exchange

    async def _speak_in_order(self) -> None:
        room = self._room
        assert room is not None
        while (part := await self._parts.get()) is not None:
            await self._speak(part)
            room.release()

    async def _speak_watching(self, part: tuple[str, Exchange]) -> None:
        """`_speak`, watching for the client to leave meanwhile (`_watching`)."""
        speaking = asyncio.ensure_future(self._speak(part))
        try:
            await self._watching(speaking)
            await speaking
        finally:
            speaking.cancel()
            await asyncio.gather(speaking, return_exceptions=True)

    async def _watching(self, *awaited: asyncio.Future[Any]) -> None:
        """Wait for one of `awaited` to be done, reading the connection meanwhile: nothing
        else reads it while we wait on a job (to start, or for a stream's lookahead to have
        room), and a client that hung up then had its jobs queued and run for nobody. A
        hang-up raises ConnectionResetError. What comes before it (the events a stream sent
        ahead) is kept for `_serve`, up to MAX_READ_AHEAD_BYTES: past that the rest of the
        wait goes unwatched, and TCP holds the client back."""
        watching = asyncio.ensure_future(self._read_ahead())
        try:
            await asyncio.wait({*awaited, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done():
                watching.result()  # a hang-up raises
                await asyncio.wait(awaited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    async def _read_ahead(self) -> None:
        """Read ahead until MAX_READ_AHEAD_BYTES are held; ConnectionResetError at the end
        of the stream (a reset raises one of its own)."""
        while len(self._input) < MAX_READ_AHEAD_BYTES:
            if not await self._input.read_more(MAX_READ_AHEAD_BYTES):
                raise ConnectionResetError("the client left before its replies were sent")

    async def _speak(self, part: tuple[str, Exchange]) -> None:
        """One job's events as Wyoming events. If writing fails (the client left), the job
        stays in `_jobs`, to be cancelled (or, made whole, counted undelivered)."""
        job_id, exchange = part
        rate = 0
        while True:
            event = await exchange.next()
            if isinstance(event, Started):
                rate = event.sample_rate
                await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
            elif isinstance(event, Chunk):
                pcm = audio.to_pcm16(event.samples).tobytes()
                step = 2 * SAMPLES_PER_CHUNK
                for offset in range(0, len(pcm), step):
                    await self.write_event(AudioChunk(rate=rate, width=2, channels=1,
                                                      audio=pcm[offset:offset + step]).event())
            else:
                if isinstance(event, Done):
                    # Sent whole only with its audio-stop: a client that gets none (Home
                    # Assistant's) throws the audio it got away.
                    await self.write_event(AudioStop().event())
                else:
                    failure = event if isinstance(event, Failed) else Failed(
                        str(ErrorCode.CANCELLED), "the job was cancelled")
                    await self._error(failure.code, failure.message)
                self._jobs.discard(job_id)  # ended: nothing left to cancel
                self._intake.finished(job_id)  # no longer in flight for this client
                return

    async def _error(self, code: str, message: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.write_event(Error(text=message, code=code).event())


class WyomingIntake(ReplyIntake):
    source = SOURCE

    def __init__(self, settings: Callable[[], WyomingConfig],
                 wake: Callable[[], None]) -> None:
        super().__init__(wake, "wyoming-loop", lambda: settings().max_pending_per_client)
        self._settings = settings
        self._server: AsyncServer | None = None
        # Open now; read and changed on the loop thread only.
        self._connections: AddressBook[_Connection] = AddressBook()
        self._refused: Throttled | None = None  # its loop's, from `start`

    def refused(self, address: str, max_connections: int) -> None:
        """One connection refused at max_connections (on the loop's thread): counted, and
        logged at most once per THROTTLE_INTERVAL_S with the count, as HTTP's and ZeroMQ's
        are (a line each was a line for every connect-and-close of a flood: 300 in 2 s)."""
        assert self._refused is not None, "connections come once `start` listens"
        self._refused.count(address=address, max_connections=max_connections)

    def settings(self) -> WyomingConfig:
        """The running `[wyoming]` settings (a reload replaces them)."""
        return self._settings()

    def connection_opened(self, connection: _Connection) -> bool:
        """Count a new connection in; False (not counted) when max_connections are open
        and no other address gives one up for it."""
        if self._connections.open >= self._settings().max_connections:
            other = self._connections.make_room(connection.address, _Connection.can_give_way)
            if other is None:
                return False
            log.info("wyoming_connection_given_up", address=other.address,
                     newcomer=connection.address)
            other.give_way()
        self._connections.add(connection.address, connection)
        return True

    def connection_closed(self, connection: _Connection) -> None:
        self._connections.remove(connection.address, connection)

    def start(self) -> None:
        """Listen on wyoming.listen; an OSError (address taken, ...) names the key."""
        listen = self._settings().listen
        if not listen:
            return
        loop_thread = self.start_loop()
        self._refused = Throttled(loop_thread.loop, "wyoming_connection_refused")
        server = AsyncServer.from_uri(listen)
        try:
            loop_thread.call(server.start(self._connection), START_TIMEOUT_S)
        except OSError as error:
            self.stop_loop()
            raise OSError(error.errno, f"wyoming.listen {listen}: "
                          f"{error.strerror or error}") from error
        self._server = server
        log.info("wyoming_listening", listen=listen)

    def _connection(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> AsyncEventHandler:
        return _Connection(self, reader, writer)

    def stop(self) -> None:
        if self.loop_thread is not None and self._server is not None:
            try:
                self.loop_thread.call(self._server.stop(), STOP_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - the daemon exits anyway
                log.warning("wyoming_stop_failed", error=repr(error))
            self._server = None
        self.stop_loop()
