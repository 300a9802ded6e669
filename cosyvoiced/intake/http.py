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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from cosyvoiced import logs
from cosyvoiced.config import HttpConfig, read_api_keys
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake import codecs
from cosyvoiced.intake.reply import (
    BUSY,
    START_TIMEOUT_S,
    Chunk,
    Done,
    Exchange,
    Failed,
    ReplyIntake,
    Service,
    Started,
)
from cosyvoiced.job import ErrorCode, JobFailure

SOURCE = "http"
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions",
                 "stream_format")
DEFAULT_FORMAT = "mp3"  # as OpenAI's
STREAM_FORMATS = ("audio", "sse")
# What /v1/models lists. Any model name is accepted: the engine is the daemon's, not the
# request's, and clients hard-code OpenAI's names.
MODELS = ("cosyvoiced", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# A job field -> the OpenAI request's name for it, in messages and `param`.
OPENAI_NAMES = {"text": "input", "instruct": "instructions", "format": "response_format"}
SHUTDOWN_TIMEOUT_S = 2.0  # for the last bytes of responses in flight when the daemon stops
HEALTH_TIMEOUT_S = 2.0

_STATUS = {
    "invalid_api_key": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_too_large": 413,
    BUSY: 429,
    str(ErrorCode.SHUTTING_DOWN): 503,
    str(ErrorCode.CANCELLED): 503,
    str(ErrorCode.ENGINE_ERROR): 500,
    str(ErrorCode.WORKER_CRASHED): 500,
    str(ErrorCode.INTERNAL): 500,
}
_TYPES = {401: "authentication_error", 429: "rate_limit_error"}

log = logs.get_logger("cosyvoiced.intake.http")


@dataclass(frozen=True)
class SpeechRequest:
    fields: dict[str, Any]  # job fields
    format: str
    sse: bool


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
    return web.json_response(body, status=status, headers=headers)


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
    for name in ("model", "voice"):
        if name not in body:
            raise JobFailure(ErrorCode.MISSING_FIELD, f"{name}: required field is missing", name)
    if not isinstance(body["model"], str) or not body["model"]:
        raise JobFailure(ErrorCode.INVALID_FIELD, "model: expected a model name such as "
                         "\"tts-1\"", "model")
    fmt = body.get("response_format") or DEFAULT_FORMAT
    if fmt not in codecs.FORMATS:
        raise JobFailure(ErrorCode.UNSUPPORTED_FORMAT, f"response_format: {fmt!r} is not "
                         f"supported; choose one of: {', '.join(codecs.FORMATS)}",
                         "response_format")
    stream_format = body.get("stream_format") or "audio"
    if stream_format not in STREAM_FORMATS:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"stream_format: {stream_format!r} is not "
                         f"one of: {', '.join(STREAM_FORMATS)}", "stream_format")
    fields: dict[str, Any] = {"voice": _voice(body["voice"], aliases)}
    if "input" in body:
        fields["text"] = body["input"]
    if body.get("speed") is not None:
        fields["speed"] = body["speed"]
    if body.get("instructions"):  # "" is what clients send for "none"
        fields["instruct"] = body["instructions"]
    if fmt in codecs.FIXED_RATES:
        fields["sample_rate"] = codecs.FIXED_RATES[fmt]
    return SpeechRequest(fields, fmt, stream_format == "sse")


class _HttpError(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> web.Response:
        return error_response(self.code, self.message, headers=self.headers)


class _Keys:
    """The bearer tokens of http.api_keys_file, re-read when the file changes."""

    def __init__(self) -> None:
        self._seen: tuple[str, int] | None = None
        self._keys: frozenset[str] = frozenset()

    def current(self, path: str) -> frozenset[str]:
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


def _voice_entry(voice: VoiceInfo) -> dict[str, Any]:
    return {"id": voice.name, "name": voice.name, "language": voice.language,
            "sample_rate": voice.sample_rate, "engine": voice.engine, "kind": voice.kind}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpIntake(ReplyIntake):
    source = SOURCE

    def __init__(self, settings: Callable[[], HttpConfig], wake: Callable[[], None]) -> None:
        super().__init__(wake, "http-loop")
        self._settings = settings
        self._keys = _Keys()
        self._runner: web.AppRunner | None = None

    def max_pending_per_client(self) -> int:
        return self._settings().max_pending_per_client

    # -- lifecycle (supervisor thread) ------------------------------------------------------
    def start(self) -> None:
        """Listen on http.listen; an OSError (address taken, ...) names the key."""
        settings = self._settings()
        if not settings.listen:
            return
        host, _, port = settings.listen.rpartition(":")
        loop_thread = self.start_loop()
        try:
            self._runner = loop_thread.call(
                self._serve(host.strip("[]"), int(port), settings.max_body_bytes),
                START_TIMEOUT_S)
        except OSError as error:
            self.stop_loop()
            raise OSError(error.errno, f"http.listen {settings.listen}: "
                          f"{error.strerror or error}") from error
        log.info("http_listening", listen=settings.listen,
                 auth=bool(settings.api_keys_file))

    async def _serve(self, host: str, port: int, max_body_bytes: int) -> web.AppRunner:
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors])
        app.add_routes([
            web.post("/v1/audio/speech", self._speech),
            web.get("/v1/audio/voices", self._voices),
            web.get("/v1/models", self._models),
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
        ])
        # handler_cancellation: a client that hangs up cancels its handler, which cancels
        # its job.
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def stop(self) -> None:
        """Stop listening; let responses in flight write their last bytes (briefly)."""
        if self.loop_thread is not None and self._runner is not None:
            try:
                self.loop_thread.call(self._runner.cleanup(), SHUTDOWN_TIMEOUT_S + 3)
            except Exception as error:  # noqa: BLE001 - the daemon exits anyway
                log.warning("http_stop_failed", error=repr(error))
            self._runner = None
        self.stop_loop()

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
        except web.HTTPRequestEntityTooLarge:
            return error_response("request_too_large", f"body: over the limit of "
                                  f"{self._settings().max_body_bytes} bytes "
                                  "(http.max_body_bytes)")
        except web.HTTPNotFound:
            return error_response("not_found", f"{request.path}: no such route")
        except web.HTTPMethodNotAllowed as error:
            return error_response("method_not_allowed", f"{request.method} {request.path}: "
                                  f"allowed: {', '.join(sorted(error.allowed_methods))}")

    def _client(self, request: web.Request) -> str:
        """Who is asking: their key when keys are on (one key, one client), else the peer."""
        token = self._authorize(request)
        return f"key:{hash(token)}" if token else f"peer:{request.remote}"

    def _authorize(self, request: web.Request) -> str | None:
        path = self._settings().api_keys_file
        if not path:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _HttpError("invalid_api_key", "Authorization: a bearer token is required "
                             "(Authorization: Bearer KEY)", {"WWW-Authenticate": "Bearer"})
        # Every key is compared, in constant time, so timing tells nothing about a match.
        matches = [hmac.compare_digest(token.encode(), key.encode())
                   for key in self._keys.current(path)]
        if not any(matches):
            raise _HttpError("invalid_api_key", "Authorization: the bearer token is not one "
                             "of http.api_keys_file", {"WWW-Authenticate": "Bearer"})
        return token

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        client = self._client(request)
        body = await request.read()
        try:
            data = json.loads(body)
        except ValueError as error:  # UnicodeDecodeError included
            raise JobFailure(ErrorCode.BAD_JSON, f"body: not a JSON object: {error}") from None
        speech = parse_speech(data, self._settings().voices)
        exchange = Exchange(asyncio.get_running_loop())
        job_id = self.submit(exchange, speech.fields, client)
        try:
            return await self._respond(request, job_id, exchange, speech)
        except (asyncio.CancelledError, ConnectionError):
            self.gone(job_id)  # the client hung up: its job is cancelled, queued or running
            raise

    async def _respond(self, request: web.Request, job_id: str, exchange: Exchange,
                       speech: SpeechRequest) -> web.StreamResponse:
        body = _Body(request, job_id, speech)
        encoder: codecs.StreamEncoder | None = None
        piece = 0
        while True:
            event = await exchange.next()
            if isinstance(event, Started):
                encoder = codecs.encoder(speech.format, event.sample_rate)
                # A chunk can be seconds of audio; while the engine makes the next one it
                # has the CPUs, so a compressed format is encoded and sent a slice at a
                # time: the first bytes wait for one slice, not for the whole chunk.
                piece = event.sample_rate // 4 if speech.format in codecs.COMPRESSED else 0
            elif isinstance(event, Chunk):
                assert encoder is not None, "a job starts before its first chunk"
                for start in range(0, len(event.samples), piece or len(event.samples)):
                    data = await _encode(encoder, speech.format,
                                         event.samples[start:start + piece] if piece else
                                         event.samples)
                    if data:  # an encoder that buffers sends nothing yet: nor do we
                        await body.send(data)
            elif isinstance(event, Done):
                assert encoder is not None, "a job starts before it ends well"
                return await body.finish(await _encode(encoder, speech.format, None))
            else:
                failure = event if isinstance(event, Failed) else \
                    Failed(str(ErrorCode.CANCELLED), "the job was cancelled")
                return await body.fail(failure)

    async def _voices(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        voices = await self.ask(lambda service: list(service.voices))
        return web.json_response({"voices": [_voice_entry(v) for v in voices],
                                  "aliases": self._settings().voices})

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


async def _encode(encoder: codecs.StreamEncoder, fmt: str,
                  samples: npt.NDArray[np.float32] | None) -> bytes:
    """The bytes for `samples`, or the file's last bytes (None)."""
    def run() -> bytes:
        return encoder.finish() if samples is None else encoder.encode(samples)

    if fmt in codecs.COMPRESSED:  # milliseconds of CPU: keep the loop free meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, run)
    return run()


class _Body:
    """A streamed response, begun at its first bytes: an error before them still gets its
    own status; one after them can only be told in-band."""

    def __init__(self, request: web.Request, job_id: str, speech: SpeechRequest) -> None:
        self._request = request
        self._job_id = job_id
        self._sse = speech.sse
        self._content_type = "text/event-stream" if speech.sse else \
            codecs.CONTENT_TYPES[speech.format]
        self._response: web.StreamResponse | None = None

    async def _begun(self) -> web.StreamResponse:
        if self._response is None:
            self._response = web.StreamResponse(headers={
                "Content-Type": self._content_type, "Cache-Control": "no-cache",
                "X-Cosyvoiced-Job": self._job_id})
            self._response.enable_chunked_encoding()
            await self._response.prepare(self._request)
        return self._response

    async def send(self, data: bytes) -> None:
        response = await self._begun()
        if self._sse:
            data = _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        await response.write(data)

    async def finish(self, data: bytes) -> web.StreamResponse:
        if data:
            await self.send(data)
        response = await self._begun()
        if self._sse:
            await response.write(_sse({"type": "speech.audio.done", "usage": {
                "input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}))
        await response.write_eof()
        return response

    async def fail(self, failure: Failed) -> web.StreamResponse:
        if self._response is None:
            return error_response(failure.code, failure.message, failure.field)
        if self._sse:
            _status, body = error_body(failure.code, failure.message, failure.field)
            await self._response.write(_sse({"type": "error", **body}))
            await self._response.write_eof()
        elif self._request.transport is not None:
            # A body without its last chunk: every HTTP client reports it as an error,
            # where a clean end would pass a truncated file off as whole.
            self._request.transport.close()
        return self._response


def _readiness(service: Service) -> str:
    if service.stopping:
        return "stopping"
    if not service.ready:
        return "loading"
    return "busy" if service.queue_full() else "ready"
