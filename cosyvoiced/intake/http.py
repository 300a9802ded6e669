"""The OpenAI-compatible HTTP intake: `POST /v1/audio/speech` and its neighbours, on aiohttp.

aiohttp serves on a loop thread of its own (`reply.LoopThread`), beside the ZeroMQ socket
thread. What is HTTP's is checked here: the bearer token, the body's size, its JSON,
OpenAI's field names and formats. The job itself is the supervisor's: it is handed over as
a streamed reply job (source "http") and its chunks come back through an `Exchange`, to be
encoded and written as they come in a chunked body, so a client plays the first sentence
while the rest is made. Errors are OpenAI-shaped, ``{"error": {"message", "type", "param",
"code"}}``, with the drop folder's job error codes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import HttpVersion11, web

from cosyvoiced import admission, clients, logs
from cosyvoiced.clients import Identity
from cosyvoiced.config import HttpConfig, read_api_keys
from cosyvoiced.encoding import EncodeFailed, Encoder, EncoderStream
from cosyvoiced.intake import codecs, console, elevenlabs, origins, voices
from cosyvoiced.intake.limits import (
    REFUSAL_CODE,
    ConnectionLimits,
    Throttled,
    ThrottledByClient,
    listen,
)
from cosyvoiced.intake.reply import (
    BUSY,
    START_TIMEOUT_S,
    UNRESPONSIVE,
    Chunk,
    Done,
    Exchange,
    Failed,
    ReplyIntake,
    Service,
    Started,
    Unresponsive,
)
from cosyvoiced.job import ErrorCode, JobFailure, JobResult
from cosyvoiced.untrusted import NotJSON, json_value

SOURCE = "http"
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions",
                 "stream_format", "normalize", "clone",
                 "timestamps")  # ours: normalize, clone, timestamps (README)
DEFAULT_FORMAT = "mp3"  # as OpenAI's
STREAM_FORMATS = ("audio", "sse")
# What /v1/models lists. Any model name is accepted: the engine is the daemon's, not the
# request's, and clients hard-code OpenAI's names.
MODELS = ("cosyvoiced", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# A job field -> the OpenAI request's name for it, in messages and `param`.
OPENAI_NAMES = {"text": "input", "instruct": "instructions", "format": "response_format",
                "prompt_audio": "clone", "prompt_text": "clone"}
SHUTDOWN_TIMEOUT_S = 2.0  # for the last bytes of responses in flight when the daemon stops
HEALTH_TIMEOUT_S = 2.0
RETRY_AFTER_S = 2  # told to a client that is refused for being busy (429)
REQUEST_TIMEOUT = "request_timeout"
WHOLE_PIECE_BYTES = 64 << 10  # a reply sent whole is written this much at a time

RATE_LIMITED = "rate_limit_exceeded"  # OpenAI's code for it
UNRESPONSIVE_RETRY_S = 5
_STATUS = {
    "invalid_api_key": 401,
    origins.CROSS_ORIGIN: 403,
    origins.HOST_NOT_ALLOWED: 403,
    origins.PROXIED_WITHOUT_KEYS: 403,
    "not_found": 404,
    "method_not_allowed": 405,
    REQUEST_TIMEOUT: 408,
    "request_too_large": 413,
    "expectation_failed": 417,
    BUSY: 429,
    RATE_LIMITED: 429,
    REFUSAL_CODE: 503,
    UNRESPONSIVE: 503,
    str(ErrorCode.SHUTTING_DOWN): 503,
    str(ErrorCode.CANCELLED): 503,
    str(ErrorCode.ENGINE_ERROR): 500,
    str(ErrorCode.WORKER_CRASHED): 500,
    str(ErrorCode.ENCODE_FAILED): 500,
    str(ErrorCode.INTERNAL): 500,
}
_TYPES = {401: "authentication_error", 429: "rate_limit_error"}

log = logs.get_logger("cosyvoiced.intake.http")


@dataclass(frozen=True)
class SpeechRequest:
    fields: dict[str, Any]  # job fields
    format: str
    sse: bool
    voice_optional: bool = False  # an OpenAI voice name of none of ours: the default voice
    prompt: bytes | None = None  # a one-off clone's audio file


def _openai_name(field: str | None) -> str | None:
    return None if field is None else OPENAI_NAMES.get(field, field)


def error_body(code: str, message: str, field: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object); a job field is named as the request names it."""
    param = _openai_name(field)
    if field is not None and param != field and message.startswith(f"{field}:"):
        message = f"{param}{message[len(field):]}"
    status = _STATUS.get(code, 400)
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    status, body = error_body(code, message, field)
    if status == 429:  # when to come back: a busy queue moves on within seconds
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return web.json_response(body, status=status, headers=headers)


def _shown(value: Any) -> str:
    return repr(value)[:80]


def _voice(value: Any, aliases: dict[str, str]) -> str:
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    if not isinstance(value, str) or not value:
        raise JobFailure(ErrorCode.INVALID_FIELD, "voice: expected a voice name, or "
                         "{\"id\": NAME}; got " + json.dumps(value)[:80], "voice")
    return aliases.get(value, value)


def parse_speech(body: Any, aliases: dict[str, str]) -> SpeechRequest:
    """The job fields, format and stream format of a /v1/audio/speech body."""
    if not isinstance(body, dict):
        raise JobFailure(ErrorCode.BAD_JSON, "body: expected a JSON object")
    unknown = sorted(set(body) - set(SPEECH_FIELDS))
    if unknown:
        raise JobFailure(ErrorCode.UNKNOWN_FIELD, f"{unknown[0]}: unknown field; known fields "
                         f"are: {', '.join(SPEECH_FIELDS)}", unknown[0])
    if "model" not in body:
        raise JobFailure(ErrorCode.MISSING_FIELD, "model: required field is missing", "model")
    fields, voice_optional, prompt = _speech_voice(body, aliases)
    if not isinstance(body["model"], str) or not body["model"]:
        raise JobFailure(ErrorCode.INVALID_FIELD, "model: expected a model name such as "
                         "\"tts-1\"", "model")
    # Only a missing field or null means the default: {} or "" is a mistake to report.
    fmt = _given(body, "response_format", DEFAULT_FORMAT)
    if not isinstance(fmt, str) or fmt not in codecs.FORMATS:
        raise JobFailure(ErrorCode.UNSUPPORTED_FORMAT, f"response_format: {_shown(fmt)} is "
                         f"not supported; choose one of: {', '.join(codecs.FORMATS)}",
                         "response_format")
    stream_format = _given(body, "stream_format", "audio")
    if not isinstance(stream_format, str) or stream_format not in STREAM_FORMATS:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"stream_format: {_shown(stream_format)} "
                         f"is not one of: {', '.join(STREAM_FORMATS)}", "stream_format")
    if "input" in body:
        fields["text"] = body["input"]
    if body.get("speed") is not None:  # the job's own checks refuse a non-number
        fields["speed"] = body["speed"]
    if _given(body, "instructions", "") != "":  # "" is what clients send for "none"
        fields["instruct"] = body["instructions"]
    if fmt in codecs.FIXED_RATES:
        fields["sample_rate"] = codecs.FIXED_RATES[fmt]
    if "normalize" in body:  # our extension: false reads the text as written (no clean-up)
        fields["normalize"] = body["normalize"]
    fields |= _timestamps(body, stream_format)
    return SpeechRequest(fields, fmt, stream_format == "sse", voice_optional, prompt)


def _timestamps(body: dict[str, Any], stream_format: str) -> dict[str, Any]:
    """Our extension: `timestamps` makes the reply one JSON object, audio and captions."""
    if _given(body, "timestamps", None) is None:
        return {}
    if stream_format == "sse":
        raise JobFailure(ErrorCode.INVALID_FIELD, "timestamps: the reply is one JSON object; "
                         "it cannot be combined with stream_format \"sse\"", "timestamps")
    return {"timestamps": body["timestamps"]}


def _speech_voice(body: dict[str, Any],
                  aliases: dict[str, str]) -> tuple[dict[str, Any], bool, bytes | None]:
    """(the voice's job fields, whether the voice may fall back to the default, a one-off
    clone's audio): a `clone` is the voice; OpenAI's own names not mapped in [http.voices]
    (nor one of ours) speak with the default voice."""
    if body.get("clone") is not None:
        audio, prompt_text = voices.parse_clone(body["clone"])
        return ({} if prompt_text is None else {"prompt_text": prompt_text}), False, audio
    if "voice" not in body:
        raise JobFailure(ErrorCode.MISSING_FIELD, "voice: required field is missing", "voice")
    voice = _voice(body["voice"], aliases)
    return {"voice": voice}, voice in voices.OPENAI_VOICES, None


def _given(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


class _HttpError(Exception):
    """An HTTP-level refusal; `close`: the connection ends after it (the body was not read)."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers
        self.close = close

    def response(self) -> web.Response:
        response = error_response(self.code, self.message, headers=self.headers)
        if self.close:
            response.force_close()
        return response


class _SendTimedOut(Exception):
    """The client took no bytes for http.send_timeout_s; its connection is aborted."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("send timeout")
        self.response = response


class _Keys:
    """The bearer tokens of http.api_keys_file, re-read when the file changes."""

    def __init__(self) -> None:
        self._seen: tuple[str, int] | None = None
        self._keys: dict[str, str] = {}  # token -> its name

    def current(self, path: str) -> dict[str, str]:
        try:
            seen = (path, os.stat(path).st_mtime_ns)
            if seen != self._seen:
                self._keys, self._seen = read_api_keys(path), seen
        except (OSError, UnicodeDecodeError) as error:
            # Keep serving with the keys we had; never fall open.
            log.error("api_keys_unreadable", path=path, error=str(error))
        return self._keys


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpIntake(ReplyIntake):
    source = SOURCE

    def __init__(self, settings: Callable[[], HttpConfig], wake: Callable[[], None],
                 encoder: Encoder) -> None:
        super().__init__(wake, "http-loop", lambda: settings().max_pending_per_client)
        self._settings = settings
        self._keys = _Keys()
        self._encoder = encoder
        self._limiter = clients.RateLimiter()  # on the loop thread only
        self._uploads = admission.UploadSlots()  # bodies over max_body_bytes (loop thread only)
        self._next_forget = 0.0
        self._runner: web.AppRunner | None = None
        self._listening: asyncio.AbstractServer | None = None
        self._refused_requests: Throttled | None = None  # origins.py's refusals, counted
        self._rate_limited: ThrottledByClient | None = None  # made on the loop's thread

    # -- lifecycle (supervisor thread) ------------------------------------------------------
    def start(self) -> None:
        """Listen on http.listen; an OSError (address taken, ...) names the key."""
        settings = self._settings()
        if not settings.listen:
            return
        host, _, port = settings.listen.rpartition(":")
        loop_thread = self.start_loop()
        try:
            self._runner = loop_thread.call(self._serve(host.strip("[]"), int(port), settings),
                                            START_TIMEOUT_S)
        except OSError as error:
            self.stop_loop()
            raise OSError(error.errno, f"http.listen {settings.listen}: "
                          f"{error.strerror or error}") from error
        log.info("http_listening", listen=settings.listen,
                 auth=bool(settings.api_keys_file))

    async def _serve(self, host: str, port: int, settings: HttpConfig) -> web.AppRunner:
        self._refused_requests = Throttled(asyncio.get_running_loop(), "http_requests_refused")
        app = web.Application(client_max_size=settings.max_body_bytes,
                              middlewares=[self._errors, self._unkeyed_origins])
        app.add_routes([
            web.post("/v1/audio/speech", self._speech, expect_handler=self.expect_continue),
            web.get("/v1/models", self._models),
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
        ])
        voices.VoiceRoutes(self, self._identity, self._check_rate, settings=self._settings,
                           encoder=self._encoder, uploads=self._uploads).add_routes(app)
        sockets = elevenlabs.ElevenLabsSockets(self, self._encoder)  # ElevenLabs' WebSockets
        app.add_routes(sockets.routes())
        app.on_shutdown.append(sockets.close_all)
        if settings.console:  # the web console at / (console.py)
            console.Console(self, self._identity, self._settings).add_routes(app)
        # handler_cancellation: a client that hangs up cancels its handler, which cancels
        # its job.
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        limits = ConnectionLimits(settings.header_timeout_s, settings.idle_timeout_s,
                                  settings.max_connections, settings.send_timeout_s)
        try:
            self._listening = await listen(runner, host, port, limits, "http")
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def stop(self) -> None:
        """Stop listening; let responses in flight write their last bytes (briefly)."""
        if self.loop_thread is not None and self._runner is not None:
            try:
                self.loop_thread.call(self._close(self._runner), SHUTDOWN_TIMEOUT_S + 3)
            except Exception as error:  # noqa: BLE001 - the daemon exits anyway
                log.warning("http_stop_failed", error=repr(error))
            self._runner = None
        self.stop_loop()

    async def _close(self, runner: web.AppRunner) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        await runner.cleanup()

    # -- requests (loop thread) -------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _HttpError as error:
            return error.response()
        except JobFailure as failure:
            return error_response(str(failure.error.code), failure.error.message,
                                  failure.error.field)
        except Unresponsive as late:  # not aiohttp's bare 500: what happened, and when to retry
            return error_response(UNRESPONSIVE, str(late),
                                  headers={"Retry-After": str(UNRESPONSIVE_RETRY_S)})
        except web.HTTPRequestEntityTooLarge:
            return error_response("request_too_large", f"body: over the limit of "
                                  f"{self._settings().max_body_bytes} bytes "
                                  "(http.max_body_bytes)")
        except web.HTTPNotFound:
            return error_response("not_found", f"{request.path}: no such route")
        except web.HTTPMethodNotAllowed as error:
            return error_response("method_not_allowed", f"{request.method} {request.path}: "
                                  f"allowed: {', '.join(sorted(error.allowed_methods))}")

    @web.middleware
    async def _unkeyed_origins(self, request: web.Request,
                               handler: Handler) -> web.StreamResponse:
        """Without keys, no web page of another site and no proxy acts here (origins.py)."""
        settings = self._settings()
        refused = origins.refusal(request.headers, keys_on=bool(settings.api_keys_file),
                                  allow_insecure=settings.allow_insecure,
                                  allowed_hosts=tuple(settings.allowed_hosts))
        if refused is None:
            return await handler(request)
        if self._refused_requests is not None:  # set when the loop serves
            self._refused_requests.count(code=refused.code, peer=request.remote,
                                         path=request.path[:80])
        return error_response(refused.code, refused.message)

    def _identity(self, request: web.Request) -> Identity:
        """Who is asking: their key's name when keys are on (one key, one client, on every
        connection), else an anonymous client owning its connection, counted by address."""
        return self.identity_of(request, self._authorize(request))

    def identity_of(self, request: web.Request, name: str | None) -> Identity:
        """The client of `request`, who proved to hold the key `name` (None: no keys)."""
        if name:
            settings = self._settings().keys.get(name)
            return clients.keyed("key", name, admin=settings is not None and settings.admin)
        return clients.anonymous(f"http:{id(request.transport):x}",
                                 client=f"peer:{request.remote}", host=request.remote or "")

    def _rate_limit(self, identity: Identity) -> clients.RateLimit:
        settings = self._settings()
        key = settings.keys.get(identity.name) if not identity.anonymous else None
        requests = key.rate_limit if key is not None and key.rate_limit is not None \
            else settings.rate_limit
        chars = key.chars_per_minute if key is not None and key.chars_per_minute is not None \
            else settings.chars_per_minute
        return clients.RateLimit(requests, chars)

    def _check_rate(self, identity: Identity, chars: int, requests: int = 1) -> None:
        """429 rate_limit_exceeded, with Retry-After, for a client over its limits."""
        limit = self._rate_limit(identity)
        if not limit.limited:
            return
        now = time.monotonic()
        wait_s = self._limiter.take(identity.client, limit, chars, now, requests)
        if now >= self._next_forget:
            self._limiter.forget_idle(now)
            self._next_forget = now + 60.0
        if wait_s > 0:
            retry = clients.retry_after_s(wait_s)
            # Counted, a line per client at most every few seconds: one line per refusal,
            # a client over its rate filled the journal and the console's log tail.
            if self._rate_limited is None:
                self._rate_limited = ThrottledByClient(asyncio.get_running_loop(),
                                                       "rate_limited")
            self._rate_limited.count(identity.name, retry_after_s=retry)
            raise _HttpError(RATE_LIMITED, f"this client is over its rate limit "
                             f"({limit.requests_per_minute:g} requests and "
                             f"{limit.chars_per_minute:g} characters per minute; 0 is no "
                             f"limit): retry in {retry} s", {"Retry-After": str(retry)})

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue` is answered only for a good key: a client that would be
        refused hears so before it sends its body, and we read none of it. Every POST
        route on this listener takes it as its expect_handler."""
        try:
            self._authorize(request)
        except _HttpError as error:
            error.close = True
            return error.response()
        expect = request.headers.get("Expect", "")
        if request.version != HttpVersion11:
            return None  # HTTP/1.0 knows no 100 Continue; the body just comes
        if expect.lower() != "100-continue":
            return _HttpError("expectation_failed", f"Expect: {_shown(expect)} is not "
                              "supported; only 100-continue is", close=True).response()
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not begun (as aiohttp's)
        return None

    def _authorize(self, request: web.Request) -> str | None:
        path = self._settings().api_keys_file
        if not path:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _HttpError("invalid_api_key", "Authorization: a bearer token is required "
                             "(Authorization: Bearer KEY)", {"WWW-Authenticate": "Bearer"})
        name = self.key_name(token)
        if name is None:
            raise _HttpError("invalid_api_key", "Authorization: the bearer token is not one "
                             "of http.api_keys_file", {"WWW-Authenticate": "Bearer"})
        return name

    # -- for the other protocols on this listener (elevenlabs.py) ---------------------------
    def keys_required(self) -> bool:
        return bool(self._settings().api_keys_file)

    def key_name(self, token: str) -> str | None:
        """The name of the API key `token`, or None if it is none of http.api_keys_file."""
        try:
            # aiohttp decodes header bytes with surrogateescape, and JSON may hold a lone
            # surrogate: a token UTF-8 cannot encode is none of the file's keys.
            given = token.encode()
        except UnicodeEncodeError:
            return None
        # Every key is compared, in constant time, so timing tells nothing about a match.
        matches = [name for key, name in self._keys.current(self._settings().api_keys_file)
                   .items() if hmac.compare_digest(given, key.encode())]
        return matches[0] if matches else None

    def rate_refusal(self, identity: Identity, chars: int, requests: int = 1) -> str | None:
        """Why `requests` requests of `chars` characters in all are over the client's rate
        limit; None if they are not (then they are counted)."""
        try:
            self._check_rate(identity, chars, requests)
        except _HttpError as error:
            return error.message
        return None

    def voice_aliases(self) -> dict[str, str]:
        return self._settings().voices

    def send_timeout_s(self) -> float:
        return self._settings().send_timeout_s

    def max_prompt_bytes(self) -> int:
        """As many as the uploads read at once: each waits for its turn on disk."""
        return admission.MAX_UPLOADS_AT_ONCE * self._settings().max_upload_bytes

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        identity = self._identity(request)
        settings = self._settings()
        speech = await self._speech_request(request, settings, identity.client)
        text = speech.fields.get("text")
        self._check_rate(identity, len(text) if isinstance(text, str) else 0)
        loop = asyncio.get_running_loop()
        exchange = _Held(loop) if "timestamps" in speech.fields else Exchange(loop)
        job_id = self.submit(exchange, speech.fields, identity,
                             voice_optional=speech.voice_optional, prompt=speech.prompt)
        speech = replace(speech, prompt=None)  # the supervisor keeps it now, not this reply
        gone = True  # unless the whole reply was sent: then the job is only released
        try:
            response = await self._respond(request, job_id, exchange, speech)
            gone = False
            return response
        except _SendTimedOut as timed_out:
            log.info("send_timeout", job=job_id, source=self.source,
                     send_timeout_s=self._settings().send_timeout_s)
            return timed_out.response  # aborted: aiohttp drops it without a word
        finally:  # whatever happened, the request stops counting as in flight
            (self.gone if gone else self.finished)(job_id)

    async def _speech_request(self, request: web.Request, settings: HttpConfig,
                              client: str) -> SpeechRequest:
        """The request. Its body may be over http.max_body_bytes only by a `clone`'s audio
        (`_SpeechBounds`), and only while an upload slot is free: a plain body is refused
        as soon as it is over, unparsed, and takes no slot."""
        bounds = _SpeechBounds(settings.max_body_bytes, settings.max_upload_bytes)
        if request.content_length is not None and \
                request.content_length > bounds.read_bytes:
            raise bounds.too_large(close=True)  # unread: too large even for a clone
        upload = _CloneUpload(bounds, self._uploads, client)
        try:
            body = await self._body(request, bounds.read_bytes, bounds.too_large(close=True),
                                    (bounds.body_bytes, upload.let_past)
                                    if bounds.uploads else None)
            data = _json(body) if upload.audio_start is None else \
                bounds.clone_body(body, upload.audio_start)
            return parse_speech(data, settings.voices)
        finally:
            upload.release()

    async def read_body(self, request: web.Request, limit: int, setting: str) -> bytes:
        """The whole body, within http.body_timeout_s (408) and `limit` bytes (413, naming
        `setting`, the limit's name): for the other routes on this listener (console.py)."""
        return await self._body(request, limit, _HttpError(
            "request_too_large", f"body: over the limit of {limit} bytes ({setting})",
            close=True))

    async def _body(self, request: web.Request, limit: int, too_large: _HttpError,
                    past: tuple[int, Callable[[bytearray], None]] | None = None) -> bytes:
        """The whole body, within http.body_timeout_s (a short or endless body: 408), and
        within `limit` bytes (over it: `too_large`); `past`: (a size, what to call with
        what was read once the body is over it)."""
        timeout_s = self._settings().body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await _read_within(request, limit, too_large, past)
        except TimeoutError:
            raise _HttpError(REQUEST_TIMEOUT, f"body: not received in {timeout_s:g} s "
                             "(http.body_timeout_s)", close=True) from None

    async def _respond(self, request: web.Request, job_id: str, exchange: Exchange,
                       speech: SpeechRequest) -> web.StreamResponse:
        body = _Body(request, job_id, speech, self._settings().send_timeout_s)
        stream: EncoderStream | None = None
        captioned = exchange if isinstance(exchange, _Held) else None  # sent whole, at the end
        try:
            while True:
                event = await exchange.next()
                if isinstance(event, Started):
                    # In the encoder process: native codecs never run in the supervisor.
                    stream = self._encoder.open_stream(speech.format, event.sample_rate)
                    piece = _piece(speech.format, event.sample_rate)
                elif isinstance(event, Chunk):
                    assert stream is not None, "a job starts before its first chunk"
                    for start in range(0, len(event.samples), piece or len(event.samples)):
                        data = await stream.encode(event.samples[start:start + piece]
                                                   if piece else event.samples)
                        if data and captioned is not None:
                            captioned.hold(data)
                        elif data:  # an encoder that buffers sends nothing yet: nor do we
                            await body.send(data)
                elif isinstance(event, Done):
                    assert stream is not None, "a job starts before it ends well"
                    if captioned is not None:
                        captioned.hold(await stream.finish())
                        return await body.whole(CaptionedReply.of(
                            captioned.held_audio(), speech.format, event.result))
                    return await body.finish(await stream.finish())
                else:
                    failure = event if isinstance(event, Failed) else \
                        Failed(str(ErrorCode.CANCELLED), "the job was cancelled")
                    return await body.fail(failure)
        except EncodeFailed as failed:
            log.error("encode_failed", job=job_id, source=self.source,
                      message=failed.error.message)
            self.gone(job_id)  # the rest of its audio could not be encoded either
            return await body.fail(Failed.of(failed.error))
        finally:
            if stream is not None:
                stream.close()

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "cosyvoiced"}
            for model in MODELS]})

    async def _healthz(self, _request: web.Request) -> web.StreamResponse:
        """Alive: the supervisor's loop answers (a stuck one also stops the watchdog)."""
        try:
            await self.ask(lambda _service: True, HEALTH_TIMEOUT_S)
        except TimeoutError:
            return web.json_response({"status": "unresponsive"}, status=503)
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.StreamResponse:
        """Ready for more: the engine is loaded, the daemon is not stopping, the queue has
        room. A load balancer sends elsewhere meanwhile."""
        try:
            status = await self.ask(_readiness, HEALTH_TIMEOUT_S)
        except TimeoutError:
            status = "unresponsive"
        return web.json_response({"status": status}, status=200 if status == "ready" else 503)


async def _read_within(request: web.Request, limit: int, too_large: _HttpError,
                       past: tuple[int, Callable[[bytearray], None]] | None) -> bytes:
    """The body, refused (`too_large`, the rest unread) as soon as it is over `limit`
    bytes; once it is over `past[0]`, `past[1]` is called with what was read (it may
    refuse it too)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 << 10):
        crossed = past is not None and len(data) <= past[0] < len(data) + len(chunk)
        data += chunk
        if len(data) > limit:
            raise too_large
        if crossed:
            assert past is not None
            past[1](data)
    return bytes(data)


@dataclass(frozen=True)
class _SpeechBounds:
    """A speech body is JSON of at most http.max_body_bytes, and only a `clone`'s audio
    (one string) may take it past that, up to http.max_upload_bytes. Whether it is a
    clone's is told by what was read when the body went over max_body_bytes: a string
    under an `"audio"` key must open within it; else the body is refused there, unparsed.
    What comes in full is parsed with that string cut out, and the rest must be within
    max_body_bytes, so no more than that is ever parsed (16 MiB of `[{},{},...]` were
    410 MiB of objects)."""

    body_bytes: int
    upload_bytes: int

    @property
    def uploads(self) -> bool:
        """Whether a clone's audio may take a body past max_body_bytes at all."""
        return self.upload_bytes > self.body_bytes

    @property
    def read_bytes(self) -> int:
        """The most of a body that is read: a config may set max_upload_bytes below
        max_body_bytes, and a plain body may still have max_body_bytes then."""
        return max(self.body_bytes, self.upload_bytes)

    def too_large(self, close: bool = False) -> _HttpError:
        """A body over what it may have: the same words whether it was told by its
        Content-Length, or read, chunked or not, with a clone or without."""
        clone = (f"; only a `clone`'s audio may take a body past it, up to "
                 f"{self.upload_bytes} bytes (http.max_upload_bytes)") if self.uploads else ""
        return _HttpError("request_too_large", f"body: over the limit of {self.body_bytes} "
                          f"bytes (http.max_body_bytes){clone}", close=close)

    def audio_start(self, read: bytearray) -> int:
        """Where the clone's audio string opens (its quote) in `read`, a body read past
        max_body_bytes: the longest string under an `"audio"` key that opens within
        max_body_bytes (one still open is the longest); refused (413, the rest unread)
        if there is none. It may have ended under the limit, a later field taking the
        body over (the clone's `text`; the openai SDK puts extra_body last): `clone_body`
        checks that all but the audio is within max_body_bytes. In valid JSON the key's
        quotes cannot be inside a string (a string's quotes are escaped), and the
        strings scanned do not overlap: this is one pass over `read`."""
        chosen, longest = -1, -1
        for key in _AUDIO_KEY.finditer(read, 0, self.body_bytes):
            quote = key.end() - 1
            string = _JSON_STRING.match(read, quote)
            if string is None:  # still open: the one that took the body past the limit
                return quote
            if string.end() - quote > longest:
                chosen, longest = quote, string.end() - quote
        if chosen < 0:
            raise self.too_large(close=True)
        return chosen

    def clone_body(self, body: bytes, audio_start: int) -> Any:
        """The JSON value of `body`, over max_body_bytes, whose audio's string opens at
        `audio_start`: the rest, with a placeholder for that string, must be within
        max_body_bytes and have it as its `clone`'s `audio`."""
        audio = _JSON_STRING.match(body, audio_start)
        if audio is None:
            raise JobFailure(ErrorCode.BAD_JSON, "body: not a JSON object: clone: its audio "
                             "is not one whole JSON string")
        placeholder = secrets.token_hex(16)  # no client can put it anywhere else
        rest = b"".join((body[:audio_start], b'"%s"' % placeholder.encode(),
                         body[audio.end():]))
        if len(rest) > self.body_bytes:
            raise self.too_large()
        data = _json(rest)
        clone = data.get("clone") if isinstance(data, dict) else None
        if not isinstance(clone, dict) or clone.get("audio") != placeholder:
            raise self.too_large()
        clone["audio"] = _json(audio.group())  # one string: as many bytes as it has
        return data


class _CloneUpload:
    """A speech body going past http.max_body_bytes: let past only if it is a clone's
    (`_SpeechBounds.audio_start`), holding an upload slot until `release`."""

    def __init__(self, bounds: _SpeechBounds, slots: admission.UploadSlots,
                 client: str) -> None:
        self._bounds = bounds
        self._slots = slots
        self._client = client
        self.audio_start: int | None = None  # set while a slot is held

    def let_past(self, read: bytearray) -> None:
        """Called with what was read once the body is over max_body_bytes: a plain body
        is refused here (413) and takes no slot; a clone's with none free is 429 busy."""
        start = self._bounds.audio_start(read)
        if not self._slots.take(self._client):
            raise _HttpError(BUSY, voices.BUSY_UPLOADING, close=True)
        self.audio_start = start

    def release(self) -> None:
        """The slot back, if one was taken."""
        if self.audio_start is not None:
            self._slots.give(self._client)
            self.audio_start = None


_AUDIO_KEY = re.compile(rb'"audio"\s*:\s*"')  # up to the audio string's opening quote
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')


def _json(body: bytes) -> Any:
    try:
        return json_value(body)
    except NotJSON as error:
        raise JobFailure(ErrorCode.BAD_JSON, f"body: not a JSON object: {error}") from None


def _piece(fmt: str, sample_rate: int) -> int:
    """How many samples to encode and send at a time (0: a whole chunk). A chunk can be
    seconds of audio; while the engine makes the next one it has the CPUs, so a compressed
    format is encoded and sent a slice at a time: the first bytes wait for one slice, not
    for the whole chunk."""
    return sample_rate // 4 if fmt in codecs.COMPRESSED else 0


class _Body:
    """A streamed response, begun at its first bytes: an error before them still gets its
    own status; one after them can only be told in-band. Each write must be taken by the
    client within `send_timeout_s` (nginx's send_timeout), or the connection is aborted."""

    def __init__(self, request: web.Request, job_id: str, speech: SpeechRequest,
                 send_timeout_s: float) -> None:
        self._request = request
        self._job_id = job_id
        self._sse = speech.sse
        self._send_timeout_s = send_timeout_s
        self._content_type = "text/event-stream" if speech.sse else \
            codecs.CONTENT_TYPES[speech.format]
        self._response: web.StreamResponse | None = None

    async def _sent(self, response: web.StreamResponse, write: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await write
        except TimeoutError:
            if self._request.transport is not None:
                self._request.transport.abort()  # what it has not taken is dropped
            raise _SendTimedOut(response) from None

    async def _begun(self) -> web.StreamResponse:
        if self._response is None:
            self._response = web.StreamResponse(headers={
                "Content-Type": self._content_type, "Cache-Control": "no-cache",
                "X-Cosyvoiced-Job": self._job_id})
            self._response.enable_chunked_encoding()
            await self._sent(self._response, self._response.prepare(self._request))
        return self._response

    async def send(self, data: bytes) -> None:
        response = await self._begun()
        if self._sse:
            data = _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        await self._sent(response, response.write(data))

    async def finish(self, data: bytes) -> web.StreamResponse:
        if data:
            await self.send(data)
        response = await self._begun()
        if self._sse:
            await self._sent(response, response.write(_sse({
                "type": "speech.audio.done",
                "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})))
        await self._sent(response, response.write_eof())
        return response

    async def whole(self, reply: CaptionedReply) -> web.StreamResponse:
        """A JSON reply sent at once (`timestamps`), with its length: written a piece at a
        time, each piece taken within the send timeout as a streamed reply's chunks are."""
        self._response = web.StreamResponse(headers={
            "Content-Type": "application/json", "Cache-Control": "no-cache",
            "X-Cosyvoiced-Job": self._job_id})
        self._response.content_length = reply.length
        await self._sent(self._response, self._response.prepare(self._request))
        for piece in reply.pieces():
            await self._sent(self._response, self._response.write(piece))
        await self._sent(self._response, self._response.write_eof())
        return self._response

    async def fail(self, failure: Failed) -> web.StreamResponse:
        if self._response is None:
            return error_response(failure.code, failure.message, failure.field)
        if self._sse:
            _status, body = error_body(failure.code, failure.message, failure.field)
            await self._sent(self._response, self._response.write(_sse({"type": "error",
                                                                        **body})))
            await self._sent(self._response, self._response.write_eof())
        elif self._request.transport is not None:
            # A body without its last chunk: every HTTP client reports it as an error,
            # where a clean end would pass a truncated file off as whole.
            self._request.transport.close()
        return self._response


@dataclass(frozen=True)
class CaptionedReply:
    """A `timestamps` reply's JSON: the audio in base64 with its captions (README:
    Captions), made a piece at a time as it is written. Made whole, its audio was there
    five times over (the bytes, base64 as bytes and as text, the JSON as text and bytes)."""

    audio: bytes
    rest: bytes  # the other members, as the JSON object `{...}` they make alone

    @classmethod
    def of(cls, audio: bytes, fmt: str, result: JobResult) -> CaptionedReply:
        timed = result.captions.to_dict() if result.captions is not None else \
            {"sentences": [], "words": None}
        rest = json.dumps({"audio_format": fmt, "sample_rate": result.sample_rate,
                           "duration": round(result.audio_s, 4),
                           "timestamps": timed["words"] or [], **timed})
        return cls(audio, rest.encode())

    @property
    def length(self) -> int:
        return len(_AUDIO_OPEN) + 4 * -(-len(self.audio) // 3) + len(self.rest) + 2

    def pieces(self) -> Iterator[bytes]:
        yield _AUDIO_OPEN
        for start in range(0, len(self.audio), _BASE64_PIECE):
            yield base64.b64encode(self.audio[start:start + _BASE64_PIECE])
        yield b'", ' + self.rest[1:]  # the other members, after the audio's


_AUDIO_OPEN = b'{"audio": "'
_BASE64_PIECE = WHOLE_PIECE_BYTES // 4 * 3  # whole groups of 3: the pieces join as one


class _Held(Exchange):
    """The exchange of a `timestamps` reply, which is sent whole once the job is done: the
    audio taken from it is held here until then, and still counts as this client's unread
    audio (`pending_bytes`, against reply.MAX_BUFFERED_BYTES) until the reply is written
    and the job released."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._audio: list[bytes] = []
        self._held_bytes = 0  # read by the supervisor's thread: one int, swapped whole

    @property
    def pending_bytes(self) -> int:
        return super().pending_bytes + self._held_bytes

    def hold(self, data: bytes) -> None:
        self._audio.append(data)
        self._held_bytes += len(data)

    def held_audio(self) -> bytes:
        """All the audio held, once: the pieces are let go (the total stays counted)."""
        audio, self._audio = b"".join(self._audio), []
        return audio


def _readiness(service: Service) -> str:
    if service.stopping:
        return "stopping"
    if not service.ready:
        return "loading"
    return "busy" if service.queue_full() else "ready"
