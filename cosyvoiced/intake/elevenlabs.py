"""ElevenLabs' text-to-speech WebSockets, on the HTTP listener: text comes in as an LLM
writes it, and each sentence's audio goes out as soon as it is made.

- `/v1/text-to-speech/{voice_id}/stream-input`: one stream per socket. The first message
  opens it (`text: " "`, with `voice_settings`, `generation_config`, `xi_api_key`); text
  chunks follow; `flush: true` speaks what is buffered now; `text: ""` ends the input: the
  last audio goes out, then `isFinal`, then the socket closes.
- `/v1/text-to-speech/{voice_id}/multi-stream-input`: up to MAX_CONTEXTS streams at once
  (`context_id`) on one socket, as LiveKit's and Pipecat's ElevenLabs plugins use it.
  There `text: ""` (and `keep_alive`) only keeps the context alive; `close_context` ends a
  stream: what it was sent is still spoken, then `isFinal` comes with its `contextId`;
  `close_socket` ends them all so.

Replies are JSON text messages, `{"audio": BASE64, "isFinal": false, "normalizedAlignment":
null, "alignment": null}` (cosyvoiced has no character timings: the clients read null as
none), with `contextId` on the multi-context socket. `output_format` (query) is
`pcm_RATE` or `mp3_RATE_KBPS` (ElevenLabs' names; the bitrate is the encoder's own).
`auto_mode=true` (query) says each message is a whole sentence or phrase, as Pipecat's
plugin sends them: it is spoken at once, as if flushed. Otherwise the daemon's splitter
finds the sentence ends: a sentence is spoken as soon as its end is certain ("!", "?",
"。", a "." after a plain word), else once the text after it has begun ("3.", "Dr.").

Each complete sentence is a reply job of the HTTP intake (an interactive stream, as HTTP's
and Wyoming's are), submitted as soon as its text is in. A stream keeps LOOKAHEAD_JOBS of
its sentences in flight, so the next one is made while one is sent, and sends their audio
in order through one encoder stream: the worker resamples to the format's rate (the job's
`sample_rate`), and MP3 is encoded in the encoder process, never here. A hang-up cancels
every job in flight.

The socket is read until it closes, after the input's end too (closing text,
`close_socket`): aiohttp answers a client's ping, and sees its close, only while it is read,
and a client's library drops a socket whose pings go unanswered, and its last audio with it
(`websockets`, under the ElevenLabs SDK and Pipecat, after 20 s). A hang-up then cancels
the jobs left. A message after the end is not acted on: an error would close the socket and
cut the audio still to come. Text in one is logged, once a socket
(`elevenlabs_text_after_end`), and what it sends is read at the pace of text that says
nothing (`Unsaid`).

Bounds (a hostile client gets an error message, `{"message", "error", "code": 1008}` as
ElevenLabs sends them, then a close): a message is at most MAX_MESSAGE_BYTES; a socket
that sends nothing for `inactivity_timeout` (query; ElevenLabs' default 20 s, at most
180 s) while it has nothing left to be spoken is closed; text received and not yet
spoken is at most MAX_BUFFERED_CHARS a socket; at most MAX_CONTEXTS streams are open on one
socket, besides at most MAX_ENDING_CONTEXTS closed ones still finishing what they were
sent. Other message fields than those above are let be, as a newer client may send them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from aiohttp import WSCloseCode, WSMsgType, web

from cosyvoiced import cleanup, logs
from cosyvoiced.clients import Identity
from cosyvoiced.encoding import EncodeFailed, Encoder, EncoderStream
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake import limits
from cosyvoiced.intake.crowding import QUIET_S
from cosyvoiced.intake.reply import (
    UNRESPONSIVE,
    Chunk,
    Done,
    Exchange,
    Failed,
    Service,
    Started,
    Unresponsive,
)
from cosyvoiced.intake.unsaid import Unsaid
from cosyvoiced.job import MAX_SPEED, MIN_SPEED, ErrorCode
from cosyvoiced.sentences import SentenceSplitter
from cosyvoiced.untrusted import NotJSON, json_value

SINGLE_PATH = "/v1/text-to-speech/{voice_id}/stream-input"
MULTI_PATH = "/v1/text-to-speech/{voice_id}/multi-stream-input"
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"  # as ElevenLabs'
PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
MP3_RATES = (22050, 24000, 44100)
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a control frame's 125 bytes, less the code
DEFAULT_INACTIVITY_S = 20.0  # ElevenLabs' default and ceiling for `inactivity_timeout`
MAX_INACTIVITY_S = 180.0
# A stream-input socket whose key is to come in its first message (keys on, none in the
# handshake) sends that message this soon, whatever its inactivity_timeout.
FIRST_MESSAGE_S = 10.0
MAX_MESSAGE_BYTES = 64 << 10
MAX_BUFFERED_CHARS = 20_000  # received, not yet spoken, per socket
MAX_CONTEXTS = 5  # ElevenLabs' limit for one multi-context socket
# Closed contexts still finishing what they were sent: out of MAX_CONTEXTS, as ElevenLabs
# frees a context's place at its close_context (a barge-in closes one and opens the next
# at once), but bounded: each holds its sentences in flight and an encoder stream.
MAX_ENDING_CONTEXTS = 10
LOOKAHEAD_JOBS = 2  # sentences of one stream in flight: one is sent while the next is made
SEND_PIECE_S = 0.25  # audio per message: a long chunk goes out in pieces
POLICY = int(WSCloseCode.POLICY_VIOLATION)  # 1008, ElevenLabs' code for a refusal
DEFAULT_CONTEXT = ""  # the stream-input socket's one stream, and a message with no id
_MOST_DIGITS = 6  # in an output_format's rate or bit rate
_CONTEXT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # fullmatch: "$" takes a last "\n"
T = TypeVar("T")

log = logs.get_logger("cosyvoiced.intake.elevenlabs")


class ProtocolError(Exception):
    """A request or message the protocol refuses: `code` names it for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- pure decisions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputFormat:
    name: str
    codec: str  # one of codecs.FORMATS: "pcm" or "mp3"
    sample_rate: int


def output_format(value: str | None) -> OutputFormat:
    """ElevenLabs' `output_format` name as our codec and rate."""
    name = value or DEFAULT_OUTPUT_FORMAT
    parts = name.split("_")
    rate = int(parts[1]) if len(parts) > 1 and _ascii_digits(parts[1]) else 0
    if parts[0] == "pcm" and len(parts) == 2 and rate in PCM_RATES:
        return OutputFormat(name, "pcm", rate)
    if parts[0] == "mp3" and len(parts) == 3 and _ascii_digits(parts[2]) and \
            rate in MP3_RATES:
        return OutputFormat(name, "mp3", rate)
    supported = [f"pcm_{r}" for r in PCM_RATES] + [f"mp3_{r}_KBPS" for r in MP3_RATES]
    raise ProtocolError("unsupported_format", f"output_format: {name[:40]!r} is not "
                        f"supported; choose one of: {', '.join(supported)}")


def _ascii_digits(text: str) -> bool:
    """A rate or a bit rate: a few of 0-9 (str.isdigit() also takes "²", and int() refuses
    more than 4,300 digits: each was a 500)."""
    return text.isascii() and text.isdigit() and len(text) <= _MOST_DIGITS


def inactivity_timeout(value: str | None) -> float:
    """The query's `inactivity_timeout` (seconds), within ElevenLabs' ceiling."""
    if value is None:
        return DEFAULT_INACTIVITY_S
    try:
        # float() reads other scripts' digits too: only ASCII is a number here.
        seconds = float(value) if value.isascii() else -1.0
    except ValueError:
        seconds = -1.0
    if not 1 <= seconds <= MAX_INACTIVITY_S:
        raise ProtocolError("invalid_inactivity_timeout", f"inactivity_timeout: {value[:20]!r}"
                            f" is not a number of seconds in 1..{MAX_INACTIVITY_S:g}")
    return seconds


def close_reason(message: str) -> bytes:
    """A close frame's reason: at most 123 bytes of UTF-8, cut between characters (a client
    fails on a frame whose reason is not UTF-8)."""
    return message.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()


def query_flag(name: str, value: str | None) -> bool:
    """A true/false query parameter (`auto_mode`)."""
    if value is None or value.lower() == "false":
        return False
    if value.lower() == "true":
        return True
    raise ProtocolError("invalid_query", f"{name}: expected true or false, got "
                        f"{value[:20]!r}")


def handshake_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The API key a handshake carries: ElevenLabs' `xi-api-key` (header or query), the
    `authorization` query, or the HTTP API's bearer token."""
    for value in (headers.get("xi-api-key"), query.get("xi-api-key"),
                  query.get("authorization"), headers.get("Authorization")):
        if value:
            scheme, _, rest = value.strip().partition(" ")
            return rest.strip() if scheme.lower() == "bearer" and rest.strip() else \
                value.strip()
    return None


@dataclass(frozen=True)
class Message:
    """One client message, checked."""

    context: str = DEFAULT_CONTEXT
    text: str = ""
    flush: bool = False
    close_context: bool = False
    close_socket: bool = False
    token: str | None = None  # xi_api_key / authorization, on a first message
    speed: float | None = None  # voice_settings.speed


def parse_message(data: str, multi: bool) -> Message:
    """A text frame as a `Message`; ProtocolError for what is not one."""
    try:
        body = json_value(data)
    except NotJSON as error:
        raise ProtocolError("invalid_message", f"message: not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError("invalid_message", "message: expected a JSON object")
    # Other fields (generation_config, try_trigger_generation, keep_alive, pronunciation
    # dictionaries, ones a newer client adds) change nothing here: they are let be.
    text = body.get("text", "")
    if not isinstance(text, str):
        raise ProtocolError("invalid_message", "text: expected a string")
    context = body.get("context_id", DEFAULT_CONTEXT) if multi else DEFAULT_CONTEXT
    if not isinstance(context, str) or (context and not _CONTEXT_ID.fullmatch(context)):
        raise ProtocolError("invalid_message", "context_id: expected 1 to 128 letters, "
                            "digits or _.:-")
    token = body.get("xi_api_key") or body.get("authorization")
    return Message(context=context, text=text, flush=_flag(body, "flush"),
                   close_context=_flag(body, "close_context"),
                   close_socket=_flag(body, "close_socket"),
                   token=token if isinstance(token, str) else None,
                   speed=_speed(body.get("voice_settings")))


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError("invalid_message", f"{name}: expected true or false")
    return value


def _speed(settings: Any) -> float | None:
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ProtocolError("invalid_message", "voice_settings: expected an object")
    speed = settings.get("speed")
    if speed is None:
        return None
    if isinstance(speed, bool) or not isinstance(speed, int | float):
        raise ProtocolError("invalid_message", "voice_settings.speed: expected a number")
    try:
        return float(speed)
    except OverflowError:  # an integer of hundreds of digits (the socket was dropped)
        raise ProtocolError("invalid_message", "voice_settings.speed: out of range; "
                            f"{MIN_SPEED}..{MAX_SPEED}") from None


def resolve_voice(voice_id: str, aliases: Mapping[str, str],
                  voices: list[VoiceInfo]) -> str:
    """Our voice for an ElevenLabs voice id: by http.voices, else by name."""
    voice = aliases.get(voice_id, voice_id)
    names = sorted(v.name for v in voices)
    if voices and voice not in names:
        raise ProtocolError("voice_not_found", f"voice_id: {voice_id[:64]!r} is not a voice "
                            f"here; use one of: {', '.join(names)}, or map it in "
                            "[http.voices]")
    return voice


# -- what the socket needs of the HTTP intake --------------------------------------------------
class Host(Protocol):
    def submit(self, exchange: Exchange, fields: dict[str, Any], identity: Identity,
               voice_language: str | None = None) -> str: ...

    def gone(self, job_id: str) -> None: ...

    def finished(self, job_id: str) -> None: ...

    async def ask(self, question: Callable[[Service], T], timeout_s: float = ...) -> T: ...

    def keys_required(self) -> bool: ...

    def key_name(self, token: str) -> str | None: ...

    def identity_of(self, request: web.Request, key_name: str | None) -> Identity: ...

    def rate_refusal(self, identity: Identity, chars: int,
                     requests: int = 1) -> str | None: ...

    def voice_aliases(self) -> dict[str, str]: ...

    def send_timeout_s(self) -> float: ...


def error_reply(status: int, code: str, message: str) -> web.Response:
    """A refused handshake, in ElevenLabs' HTTP error shape."""
    return web.json_response({"detail": {"status": code, "message": message}}, status=status)


# -- one socket --------------------------------------------------------------------------------
class SocketClosed(Exception):
    """The socket is gone, or is being closed: nothing more is sent on it."""


@dataclass
class _Stream:
    """One context: its text, its sentences waiting for a job, its jobs in order."""

    context: str
    speed: float | None = None
    # Opened with its first audio: a context that ends with none (a keep-alive, text that
    # says nothing) costs the encoder process nothing, as its bytes would be none.
    encoder: EncoderStream | None = None
    sentences: SentenceSplitter = field(default_factory=SentenceSplitter)
    waiting: deque[str] = field(default_factory=deque)
    jobs: deque[tuple[str, Exchange]] = field(default_factory=deque)
    # Jobs that ended done whose last bytes the encoder still holds (MP3 keeps a frame or
    # two until more audio comes): sent whole only once audio after them is sent, or the
    # stream's last bytes; a hang-up before that leaves their replies undelivered.
    unsent: list[str] = field(default_factory=list)
    ended: bool = False  # no more text will come (closing text, close_context)
    # A sentence of it the rate limit refused: the stream fails with it once the sentences
    # before it are sent, and only this stream (the socket's others go on).
    refused: ProtocolError | None = None
    ignored: bool = False  # text came after that, and was logged (once a context)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def buffered(self) -> int:
        return len(self.sentences.pending) + sum(len(text) for text in self.waiting)


def _check_contexts(streams: Iterable[_Stream]) -> None:
    """Room for one more context: MAX_CONTEXTS open, and MAX_ENDING_CONTEXTS closed ones
    still finishing what they were sent (else the `max_active_conversations` error)."""
    open_, ending = 0, 0
    for stream in streams:
        ending += stream.ended
        open_ += not stream.ended
    if open_ >= MAX_CONTEXTS:
        raise ProtocolError("max_active_conversations", f"{MAX_CONTEXTS} contexts are "
                            "open on this socket; close one (close_context) first")
    if ending >= MAX_ENDING_CONTEXTS:
        raise ProtocolError("max_active_conversations", f"{ending} closed contexts are "
                            "still finishing what they were sent on this socket; wait "
                            "for an isFinal first")


def _ignore_after_close(stream: _Stream, message: Message) -> None:
    """Text for a context whose input is closed is not spoken (an error would close the
    socket, and end its other contexts too), but it is said in the log, once a context."""
    if message.text.strip() and not stream.ignored:
        stream.ignored = True
        log.info("elevenlabs_text_after_close", context=stream.context,
                 chars=len(message.text), message="text for a context whose input was "
                 "closed is not spoken; send it under a new context_id")


class _Socket:
    def __init__(self, host: Host, encoder: Encoder, ws: web.WebSocketResponse,
                 request: web.Request, *, fmt: OutputFormat, voice: str, multi: bool,
                 auto_mode: bool) -> None:
        self._host, self._encoder, self._ws = host, encoder, ws
        self._request, self._fmt, self._voice, self._multi = request, fmt, voice, multi
        self._auto_mode = auto_mode
        self._identity: Identity | None = None
        self._streams: dict[str, _Stream] = {}
        self._send_lock = asyncio.Lock()
        self._closing = False
        self._told_after_end = False  # text came after the input's end: logged once
        self._unsaid = Unsaid()  # text dropped as saying nothing: read at a pace
        self._heard_at = time.monotonic()  # its client's last message
        limits.session_may_give_way(request, self._idle)

    async def run(self, identity: Identity | None, idle_s: float) -> None:
        self._identity = identity
        try:
            await self._read(idle_s)
            await self._finish_streams()
        except SocketClosed:
            pass
        except ProtocolError as refused:
            await self._refuse(refused)
        finally:
            await self._release()

    async def _read(self, idle_s: float) -> None:
        while not self._closing:
            await self._unsaid.pace(source="elevenlabs", peer=self._request.remote)
            wait_s = idle_s if self._identity is not None else min(idle_s, FIRST_MESSAGE_S)
            try:
                # Our own deadline, over aiohttp's: it starts afresh with every ping or pong
                # it answers, and a client that only pinged was never idle.
                async with asyncio.timeout(wait_s):
                    frame = await self._ws.receive()
            except TimeoutError:
                if self._identity is None:
                    raise ProtocolError("input_timeout_exceeded", "no first message for "
                                        f"{wait_s:g} s: it carries the key (xi_api_key)"
                                        ) from None
                if any(stream.jobs or stream.waiting for stream in self._streams.values()):
                    continue  # still speaking what it was sent: its client listens
                await self._send_held()
                raise ProtocolError("input_timeout_exceeded", f"no message for {idle_s:g} s "
                                    "(inactivity_timeout)") from None
            self._heard_at = time.monotonic()
            if frame.type == WSMsgType.TEXT:
                self._take(parse_message(frame.data, self._multi))
            elif frame.type == WSMsgType.BINARY:
                raise ProtocolError("invalid_message", "message: expected JSON text, got a "
                                    "binary frame")
            elif frame.type == WSMsgType.ERROR:
                # aiohttp has closed it: 1009 for a message over MAX_MESSAGE_BYTES.
                log.info("elevenlabs_bad_frame", error=str(frame.data)[:200],
                         close_code=self._ws.close_code)
                raise SocketClosed()
            else:  # CLOSE, CLOSING, CLOSED: the client hung up
                raise SocketClosed()

    def _idle(self) -> bool:
        """Nothing being made or sent (a context that ended is still sending its last bytes
        and its final), nothing said for QUIET_S: its connection may be closed for another
        host's at the cap (crowding.py), as an idle HTTP one may."""
        return time.monotonic() - self._heard_at >= QUIET_S and not any(
            stream.jobs or stream.buffered() or stream.ended
            for stream in self._streams.values())

    def _take(self, message: Message) -> None:
        if self._identity is None:
            self._identity = self._authorized(message.token)
        if message.close_socket:
            self._closing = True
            for stream in self._streams.values():
                self._end(stream)
            return
        found = self._streams.get(message.context)
        if found is not None and found.ended:  # it is finishing what it was sent
            _ignore_after_close(found, message)
            return
        if found is None and not message.text and (message.close_context or self._multi):
            return  # a keep-alive or close for a context that is not open (any more)
        stream = found if found is not None else self._open(message)
        if message.text:
            self._check_room(len(message.text))
            stream.waiting.extend(stream.sentences.feed(message.text))
        if message.flush or (self._auto_mode and message.text.strip()):
            stream.waiting.extend(stream.sentences.flush())
        if message.close_context or (not self._multi and message.text == "" and
                                     not message.flush):
            self._end(stream)
            self._closing = not self._multi
        self._top_up(stream)

    def _authorized(self, token: str | None) -> Identity:
        """Who sends: the first message may carry the key (stream-input's xi_api_key)."""
        name = self._host.key_name(token) if token else None
        if name is None:
            raise ProtocolError("invalid_api_key", "an API key is required: the xi-api-key "
                                "header, or xi_api_key in the first message" if not token
                                else "the API key is not one of http.api_keys_file")
        identity = self._host.identity_of(self._request, name)
        refusal = self._host.rate_refusal(identity, 0)
        if refusal is not None:
            raise ProtocolError("rate_limit_exceeded", refusal)
        return identity

    def _open(self, message: Message) -> _Stream:
        _check_contexts(self._streams.values())
        stream = _Stream(message.context, speed=message.speed)
        stream.task = asyncio.create_task(self._speak(stream))
        self._streams[message.context] = stream
        return stream

    def _check_room(self, more: int) -> None:
        held = sum(stream.buffered() for stream in self._streams.values())
        if held + more > MAX_BUFFERED_CHARS:
            raise ProtocolError("buffer_full", f"{held + more} characters are not spoken yet,"
                                f" over the limit of {MAX_BUFFERED_CHARS}: send text at the "
                                "pace it is spoken")

    def _end(self, stream: _Stream) -> None:
        stream.waiting.extend(stream.sentences.flush())
        stream.ended = True
        self._top_up(stream)

    def _top_up(self, stream: _Stream) -> None:
        """Submit waiting sentences, up to LOOKAHEAD_JOBS in flight for this stream. Jobs
        made but not yet sent whole (`unsent`) are still in flight for their client, and
        take the place of one: at most LOOKAHEAD_JOBS are counted against its
        max_pending_per_client (and a job that made no audio never holds the next back)."""
        while stream.waiting and stream.refused is None and \
                len(stream.jobs) + min(len(stream.unsent), 1) < LOOKAHEAD_JOBS:
            text = stream.waiting.popleft()
            if not cleanup.says_something(text):
                self._unsaid.add(len(text))  # an emoji, a code fence: no error either
                continue
            try:
                stream.jobs.append(self._submit(stream, text))
            except ProtocolError as refused:
                # Raised here, it reached run() whenever the reader submitted, and closed
                # the socket with every context's jobs; the stream's task fails it alone.
                stream.refused = refused
        if stream.refused is not None:
            stream.waiting.clear()  # never spoken: the stream fails before them
        stream.wake.set()

    def _submit(self, stream: _Stream, text: str) -> tuple[str, Exchange]:
        assert self._identity is not None, "a stream opens only once the client is known"
        fields: dict[str, Any] = {"text": text, "voice": self._voice,
                                  "sample_rate": self._fmt.sample_rate}
        if stream.speed is not None:
            fields["speed"] = stream.speed
        # The socket was the request (counted at its handshake); a sentence is characters:
        # each counted as a request, a 14-sentence answer on a key of rate_limit = 10 was
        # refused partway.
        refusal = self._host.rate_refusal(self._identity, len(text), requests=0)
        if refusal is not None:
            raise ProtocolError("rate_limit_exceeded", refusal)
        exchange = Exchange(asyncio.get_running_loop())
        return self._host.submit(exchange, fields, self._identity), exchange

    # -- sending (one task per stream) --------------------------------------------------------
    async def _speak(self, stream: _Stream) -> None:
        try:
            await self._speak_all(stream)
        except ProtocolError as refused:  # this stream's job failed: the others go on
            # The socket may be closing meanwhile: a SocketClosed raised here escaped the
            # task, which, forgotten below, nothing awaited ("Task exception was never
            # retrieved").
            with contextlib.suppress(SocketClosed, ConnectionError):
                await self._fail(stream, refused)
        except (SocketClosed, ConnectionError):
            pass
        finally:
            self._forget(stream)

    async def _speak_all(self, stream: _Stream) -> None:
        """The stream's sentences in order, then its final; ProtocolError: it failed."""
        while True:
            if stream.jobs:
                await self._play(stream, stream.jobs[0])
                stream.jobs.popleft()
                self._top_up(stream)
            elif stream.refused is not None:
                raise stream.refused
            elif stream.ended:
                await self._send_last_bytes(stream)
                await self._send(stream, {"isFinal": True})
                return
            else:
                stream.wake.clear()
                await stream.wake.wait()

    async def _fail(self, stream: _Stream, refused: ProtocolError) -> None:
        if stream.unsent:  # the sentences before it were made: all of their audio first
            with contextlib.suppress(ProtocolError):
                await self._send_last_bytes(stream)
        await self._send(stream, {"message": refused.message, "error": refused.code,
                                  "code": POLICY})
        if not self._multi:
            await self._close(POLICY, refused.message)

    async def _play(self, stream: _Stream, job: tuple[str, Exchange]) -> None:
        job_id, exchange = job
        piece = max(1, int(self._fmt.sample_rate * SEND_PIECE_S))
        made = 0  # samples: a job that made none has no frame for the encoder to hold
        while True:
            event = await exchange.next()
            if isinstance(event, Chunk):
                made += len(event.samples)
                for start in range(0, len(event.samples), piece):
                    data = await self._encoded(stream, event.samples[start:start + piece])
                    await self._send_audio(stream, data)
            elif isinstance(event, Done):
                # PCM holds no byte back, and a job that made nothing (a "[pause:0]") has
                # none held: sent whole now. Held in `unsent` it stayed in flight for its
                # client until later audio came, and 16 of them made the client `busy`.
                if self._fmt.codec == "pcm" or not made:
                    self._host.finished(job_id)
                else:
                    stream.unsent.append(job_id)
                return
            elif not isinstance(event, Started):
                self._host.finished(job_id)
                failure = event if isinstance(event, Failed) else \
                    Failed(str(ErrorCode.CANCELLED), "the job was cancelled")
                raise ProtocolError(failure.code, failure.message)

    async def _encoded(self, stream: _Stream,
                       samples: npt.NDArray[np.float32] | None) -> bytes:
        """The bytes for `samples`; None: the last bytes of the stream."""
        if stream.encoder is None:
            if samples is None:
                return b""  # no audio at all: PCM and MP3 of nothing are no bytes
            stream.encoder = self._encoder.open_stream(self._fmt.codec, self._fmt.sample_rate)
        try:
            if samples is None:
                return await stream.encoder.finish()
            return await stream.encoder.encode(samples)
        except EncodeFailed as failed:
            raise ProtocolError(str(failed.error.code), failed.error.message) from None

    async def _send_audio(self, stream: _Stream, data: bytes) -> None:
        if data:
            await self._send(stream, {"audio": base64.b64encode(data).decode(),
                                      "isFinal": False, "normalizedAlignment": None,
                                      "alignment": None})
            # Bytes of later audio (a piece, over the encoder's delay): the frames it
            # held of the jobs before went out first.
            self._sent_whole(stream)

    async def _send_last_bytes(self, stream: _Stream) -> None:
        """The stream's last bytes (the frames MP3 holds back): its jobs are sent whole."""
        await self._send_audio(stream, await self._encoded(stream, None))
        self._sent_whole(stream)

    async def _send_held(self) -> None:
        """The socket is closed for want of input: the frames the encoder holds of the
        sentences made go out first (a client that waits for more hears all it was sent).
        A stream that ended sends its own, on its task."""
        for stream in list(self._streams.values()):
            if stream.unsent and not stream.ended:
                with contextlib.suppress(ProtocolError, ConnectionError):
                    await self._send_last_bytes(stream)

    def _sent_whole(self, stream: _Stream) -> None:
        """The jobs whose last bytes waited in the encoder are sent whole now: the next
        sentence may go in."""
        if not stream.unsent:
            return
        for job_id in stream.unsent:
            self._host.finished(job_id)
        stream.unsent.clear()
        self._top_up(stream)

    async def _send(self, stream: _Stream | None, reply: dict[str, Any]) -> None:
        if self._multi and stream is not None:
            reply = reply | {"contextId": stream.context}
        if self._ws.closed:
            raise SocketClosed()
        timeout_s = self._host.send_timeout_s()
        async with self._send_lock:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ws.send_str(json.dumps(reply))
            except TimeoutError:  # the client takes none of our bytes (nginx's send_timeout)
                if self._request.transport is not None:
                    self._request.transport.abort()
                raise SocketClosed() from None

    # -- the end ------------------------------------------------------------------------------
    async def _finish_streams(self) -> None:
        """The input ended well (closing text, close_socket): the streams send all, while
        the socket is read (its pings answered): a hang-up cancels what is left."""
        streams = asyncio.gather(*(s.task for s in self._streams.values()
                                   if s.task is not None), return_exceptions=True)
        reading = asyncio.create_task(self._read_after_end())
        either: list[asyncio.Future[Any]] = [streams, reading]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()  # no-op once it ended (and it raises nothing but this)
            await asyncio.wait([reading])
        hung_up = not reading.cancelled() and reading.result()  # read whichever came first
        if hung_up and not streams.done():
            raise SocketClosed()  # the client hung up: run() releases the jobs left
        await streams  # done, or ending: a stream's own refusal closes the socket
        if not self._ws.closed:
            await self._ws.close()

    async def _read_after_end(self) -> bool:
        """Reads the socket until nothing more can be read: True when its client hung up (a
        close frame, the connection lost, a message over MAX_MESSAGE_BYTES) or the reading
        failed, False when our own close, on a stream's task, reads the rest."""
        try:
            return await self._read_until_closed()
        except ConnectionError:  # a pong to a connection lost
            return True
        except Exception:
            # Our fault (aiohttp returns what a client sends wrong as a frame): unread, the
            # socket's pings and close go unseen, so it ends as a hang-up would, and says so
            # here (raised, it escaped run() to aiohttp's handler log, or, once the streams
            # had ended, it was never seen: cancel() on a task that ended silences it).
            log.error("elevenlabs_read_after_end_failed", exc_info=True, message="the "
                      "socket could not be read after its input's end (an internal error): "
                      "it is closed and the jobs left are cancelled")
            return True

    async def _read_until_closed(self) -> bool:
        while True:
            # While the pace sleeps (after a flood of the client's own) nothing is read: a
            # ping behind the flood is answered, and a close seen, only after it. Bounded:
            # the sleep starts once FREE_CHARS are left and a message adds at most
            # MAX_MESSAGE_BYTES, so one is at most 66 s (unsaid.CHARS_PER_S); the streams
            # send meanwhile (to a client that left, until its library drops the
            # connection). A client that sends nothing after its end never waits.
            await self._unsaid.pace(source="elevenlabs", peer=self._request.remote)
            frame = await self._ws.receive()
            if frame.type == WSMsgType.CLOSING:
                return False
            if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return True
            self._after_end(frame.data)

    def _after_end(self, data: str | bytes) -> None:
        """A message after the input's end is not acted on (a keep-alive, a late text, a
        bad frame): its characters are read at the pace of text that says nothing, and the
        first with text is logged."""
        self._unsaid.add(len(data))
        if self._told_after_end or not _has_text(data, self._multi):
            return
        self._told_after_end = True
        log.info("elevenlabs_text_after_end", chars=len(data), message="a message sent "
                 "after the input's end (text \"\" on stream-input, close_socket) is not "
                 "acted on; send more text on a new socket")

    async def _refuse(self, refused: ProtocolError) -> None:
        log.info("elevenlabs_refused", code=refused.code, message=refused.message)
        with contextlib.suppress(SocketClosed, ConnectionError):
            await self._send(None, {"message": refused.message, "error": refused.code,
                                    "code": POLICY})
        await self._close(POLICY, refused.message)

    async def _close(self, code: int, message: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.close(code=code, message=close_reason(message))

    def _forget(self, stream: _Stream) -> None:
        """The stream is done with: its jobs not yet sent whole are cancelled (those that
        ended done are counted undelivered)."""
        for job_id in [*stream.unsent, *(job_id for job_id, _exchange in stream.jobs)]:
            self._host.gone(job_id)
        stream.unsent.clear()
        stream.jobs.clear()
        stream.waiting.clear()
        if stream.encoder is not None:
            stream.encoder.close()
        if self._streams.get(stream.context) is stream:
            del self._streams[stream.context]

    async def _release(self) -> None:
        """Whatever ended the socket (a hang-up included), every stream's jobs go."""
        streams = list(self._streams.values())
        for stream in streams:
            if stream.task is not None:
                stream.task.cancel()
        await asyncio.gather(*(s.task for s in streams if s.task is not None),
                             return_exceptions=True)
        for stream in streams:
            self._forget(stream)


def _has_text(data: str | bytes, multi: bool) -> bool:
    """Whether a message says anything: not a keep-alive or a repeated close (a frame that
    is no message at all is counted as one that does)."""
    if isinstance(data, bytes):
        return True
    try:
        return bool(parse_message(data, multi).text.strip())
    except ProtocolError:
        return True


class ElevenLabsSockets:
    """The two WebSocket routes, for the HTTP intake's application."""

    def __init__(self, host: Host, encoder: Encoder) -> None:
        self._host = host
        self._encoder = encoder
        self._open: set[web.WebSocketResponse] = set()

    def routes(self) -> list[web.RouteDef]:
        return [web.get(SINGLE_PATH, self._single), web.get(MULTI_PATH, self._multi)]

    async def close_all(self, _app: web.Application) -> None:
        """The daemon stops: every socket is closed (its jobs are cancelled)."""
        for ws in list(self._open):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the daemon is stopping")

    async def _single(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, multi=False)

    async def _multi(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, multi=True)

    async def _serve(self, request: web.Request, multi: bool) -> web.StreamResponse:
        try:
            fmt = output_format(request.query.get("output_format"))
            idle_s = inactivity_timeout(request.query.get("inactivity_timeout"))
            auto_mode = query_flag("auto_mode", request.query.get("auto_mode"))
            identity = self._identity(request, multi)
            voices = await self._host.ask(lambda service: list(service.voices))
            voice = resolve_voice(request.match_info["voice_id"], self._host.voice_aliases(),
                                  voices)
        except ProtocolError as refused:
            status = 401 if refused.code == "invalid_api_key" else \
                429 if refused.code == "rate_limit_exceeded" else 400
            return error_reply(status, refused.code, refused.message)
        except Unresponsive as late:
            return error_reply(503, UNRESPONSIVE, str(late))
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=True)
        await ws.prepare(request)
        self._open.add(ws)
        log.info("elevenlabs_socket", multi=multi, voice=voice, output_format=fmt.name,
                 client=identity.name if identity is not None else None)
        try:
            await _Socket(self._host, self._encoder, ws, request, fmt=fmt, voice=voice,
                          multi=multi, auto_mode=auto_mode).run(identity, idle_s)
        finally:
            self._open.discard(ws)
        return ws

    def _identity(self, request: web.Request, multi: bool) -> Identity | None:
        """Who connects; None when the key may still come in the first message."""
        token = handshake_token(request.headers, request.query)
        if not self._host.keys_required():
            identity = self._host.identity_of(request, None)
        elif token is None and not multi:
            return None  # stream-input may carry xi_api_key in its first message
        else:
            name = self._host.key_name(token) if token else None
            if name is None:
                raise ProtocolError("invalid_api_key", "the API key is not one of "
                                    "http.api_keys_file" if token else "an API key is "
                                    "required: the xi-api-key header or query parameter")
            identity = self._host.identity_of(request, name)
        refusal = self._host.rate_refusal(identity, 0)
        if refusal is not None:
            raise ProtocolError("rate_limit_exceeded", refusal)
        return identity
