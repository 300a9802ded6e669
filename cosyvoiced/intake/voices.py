"""Voices over HTTP: OpenAI's `/v1/audio/voices`, on the one store every intake uses.

- `POST /v1/audio/voices` (multipart: `name`, `audio`, `text` = what the audio says,
  optional `language`) registers a voice from 1-30 s of audio, as ZeroMQ's
  `register_voice` does: into `engine.cosyvoice.speakers_file`, so it survives restarts and
  ZeroMQ, Wyoming and the drop folder speak with it too (and this API with theirs).
  OpenAI's own form is taken too (`client.audio.voices.create`): `audio_sample` for
  `audio`, `type` ("audio_sample" only), and `consent`, which is accepted and not checked
  (there is no consent recording here); `text` then comes in `extra_body`.
- `GET /v1/audio/voices` lists every voice; `GET` / `DELETE /v1/audio/voices/{name}` reads
  one, or removes a registered one.
- `POST /v1/audio/speech` takes a one-off clone, `clone: {"audio": BASE64, "text": ...}`
  (`parse_clone`), spoken without registering anything.

The upload is read here within http.max_upload_bytes and http.body_timeout_s, and at most
MAX_UPLOADS_AT_ONCE bodies over http.max_body_bytes are read at once (`UploadSlots`: the
supervisor's memory stays bounded however many clients upload; at most
MAX_UPLOADS_PER_CLIENT of them one client's), but it is never decoded
here: the audio is decoded and checked in the encoder process
(`Encoder.read_prompt`), and bad audio gets the drop folder's prompt_audio codes, with the
field named as this API names it (`audio`). Keys and rate limits are those of speech.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from cosyvoiced import logs
from cosyvoiced.admission import MAX_UPLOADS_AT_ONCE, MAX_UPLOADS_PER_CLIENT, UploadSlots
from cosyvoiced.clients import Identity
from cosyvoiced.config import HttpConfig
from cosyvoiced.encoding import Encoder
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake.reply import Service
from cosyvoiced.job import ErrorCode, JobError, JobFailure

T = TypeVar("T")
# OpenAI's own voice names: a client that sends one (Open WebUI sends "alloy") hears the
# default voice, unless [http.voices] maps it or a voice of ours has that name.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse")
AUDIO_PARTS = ("audio", "audio_sample")  # ours, and OpenAI's name for it
TEXT_PARTS = ("name", "text", "language", "type", "consent")  # type, consent: OpenAI's
UPLOAD_TYPE = "audio_sample"  # OpenAI's other type, "prompt", designs a voice from words
MAX_TEXT_PART_BYTES = 16 << 10  # a name, a transcript or a language tag
BUSY_RETRY_S = 2
CLONE_FIELDS = ("audio", "text")
# The store's field names -> this API's, in errors.
_UPLOAD_NAMES = {"prompt_text": "text", "prompt_audio": "audio"}
_STATUS = {"not_found": 404, "request_timeout": 408, "request_too_large": 413,
           "unsupported_media_type": 415, "busy": 429, str(ErrorCode.NOT_OWNER): 403,
           str(ErrorCode.TOO_MANY_VOICES): 403, str(ErrorCode.SHUTTING_DOWN): 503,
           str(ErrorCode.INTERNAL): 500}

log = logs.get_logger("cosyvoiced.intake.voices")


class Host(Protocol):
    """What the routes need of the HTTP intake."""

    async def ask(self, question: Callable[[Service], T], timeout_s: float = ...) -> T: ...

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None: ...


BUSY_UPLOADING = (f"{MAX_UPLOADS_AT_ONCE} uploads over http.max_body_bytes (at most "
                  f"{MAX_UPLOADS_PER_CLIENT} of one client's) are being read now; retry in a "
                  "moment")


@dataclass(frozen=True)
class Upload:
    name: str
    text: str
    language: str
    audio: bytes


class _Refused(Exception):
    """An OpenAI-shaped error answer; `close`: the body was not read to its end."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.close = code, message, param, close

    @classmethod
    def of(cls, error: JobError) -> _Refused:
        """A store's or decoder's error, with its field named as this API names it."""
        field = error.field
        param = _UPLOAD_NAMES.get(field, field) if field is not None else None
        message = error.message
        if field is not None and param != field and message.startswith(f"{field}:"):
            message = f"{param}{message[len(field):]}"
        return cls(str(error.code), message, param)

    def response(self) -> web.Response:
        status = _STATUS.get(self.code, 400)
        kind = {429: "rate_limit_error"}.get(status, "server_error" if status >= 500
                                             else "invalid_request_error")
        response = web.json_response({"error": {"message": self.message, "type": kind,
                                                "param": self.param, "code": self.code}},
                                     status=status, headers={"Retry-After": str(BUSY_RETRY_S)}
                                     if status == 429 else None)
        if self.close:
            response.force_close()
        return response


def voice_entry(voice: VoiceInfo) -> dict[str, Any]:
    return {"id": voice.name, "object": "audio.voice", "name": voice.name,
            "language": voice.language, "sample_rate": voice.sample_rate,
            "engine": voice.engine, "kind": voice.kind}


def parse_clone(value: Any) -> tuple[bytes, str | None]:
    """A speech request's `clone`: (its audio file's bytes, what the audio says or None)."""
    if not isinstance(value, dict) or "audio" not in value:
        raise JobFailure(ErrorCode.INVALID_FIELD, "clone: expected {\"audio\": BASE64 of an "
                         "audio file, \"text\": what it says (optional)}", "clone")
    unknown = sorted(set(value) - set(CLONE_FIELDS))
    if unknown:
        raise JobFailure(ErrorCode.UNKNOWN_FIELD, f"clone: unknown field {unknown[0]!r}; "
                         f"known fields are: {', '.join(CLONE_FIELDS)}", "clone")
    text = value.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise JobFailure(ErrorCode.INVALID_FIELD, "clone: text is the words spoken in the "
                         "audio, a non-empty string (or leave it out)", "clone")
    encoded = value["audio"]
    try:
        if not isinstance(encoded, str):
            raise TypeError(type(encoded).__name__)
        audio = base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError) as error:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"clone: audio is not base64 ({error})"[:200],
                         "clone") from None
    return audio, text.strip() if isinstance(text, str) else None


class VoiceRoutes:
    def __init__(self, host: Host, identify: Callable[[web.Request], Identity],
                 check_rate: Callable[[Identity, int], None], *,
                 settings: Callable[[], HttpConfig], encoder: Encoder,
                 uploads: UploadSlots) -> None:
        """`identify` and `check_rate` are the speech route's: they raise the intake's
        own 401 and 429 answers. `uploads` are shared with the speech route's clones."""
        self._host = host
        self._identify = identify
        self._check_rate = check_rate
        self._settings = settings
        self._encoder = encoder
        self._uploads = uploads

    def add_routes(self, app: web.Application) -> None:
        app.add_routes([
            web.get("/v1/audio/voices", self._list),
            # 100 Continue only for a good key, as speech: a refused upload is never sent.
            web.post("/v1/audio/voices", self._register,
                     expect_handler=self._host.expect_continue),
            web.get("/v1/audio/voices/{name}", self._one),
            web.delete("/v1/audio/voices/{name}", self._remove),
        ])

    async def _list(self, request: web.Request) -> web.StreamResponse:
        self._identify(request)
        voices = await self._host.ask(lambda service: list(service.voices))
        entries = [voice_entry(voice) for voice in voices]
        return web.json_response({"object": "list", "data": entries, "voices": entries,
                                  "aliases": self._settings().voices})

    async def _one(self, request: web.Request) -> web.StreamResponse:
        self._identify(request)
        name = request.match_info["name"]
        voices = await self._host.ask(lambda service: list(service.voices))
        found = next((voice for voice in voices if voice.name == name), None)
        if found is None:
            return _Refused("not_found", f"name: no voice {name!r}", "name").response()
        return web.json_response(voice_entry(found))

    async def _remove(self, request: web.Request) -> web.StreamResponse:
        identity = self._identify(request)
        self._check_rate(identity, 0)
        name = request.match_info["name"]
        refusal = await self._host.ask(lambda service: service.catalog.remove_voice(identity, name))
        if refusal is not None and refusal.code == ErrorCode.UNKNOWN_VOICE:
            return _Refused("not_found", refusal.message, "name").response()
        if refusal is not None:
            return _Refused.of(refusal).response()
        log.info("voice_removed_over_http", voice=name, client=identity.name)
        return web.json_response({"id": name, "object": "audio.voice.deleted",
                                  "deleted": True})

    async def _register(self, request: web.Request) -> web.StreamResponse:
        identity = self._identify(request)
        self._check_rate(identity, 0)
        if not self._uploads.take(identity.client):
            return _Refused("busy", BUSY_UPLOADING, close=True).response()
        try:
            return await self._registered(request, identity)
        finally:
            self._uploads.give(identity.client)

    async def _registered(self, request: web.Request, identity: Identity) -> web.Response:
        try:
            upload = await self._read_upload(request)
            refusal = await self._host.ask(lambda service: service.catalog.registration_refusal(
                identity, upload.name, upload.text, upload.language))
            if refusal is not None:
                raise _Refused.of(refusal)
            prepared = await asyncio.wrap_future(self._encoder.read_prompt(upload.audio))
            stored = await self._host.ask(lambda service: service.catalog.store_voice(
                identity, upload.name, upload.text, prepared, upload.language))
            if isinstance(stored, JobError):
                raise _Refused.of(stored)
        except JobFailure as failure:  # the audio, as the encoder process found it
            return _Refused.of(failure.error).response()
        except _Refused as refused:
            return refused.response()
        log.info("voice_registered_over_http", voice=stored.name, client=identity.name)
        return web.json_response(voice_entry(stored) | {"created_at": int(time.time()),
                                                         "type": UPLOAD_TYPE}, status=201)

    async def _read_upload(self, request: web.Request) -> Upload:
        settings = self._settings()
        if request.content_type != "multipart/form-data":
            raise _Refused("unsupported_media_type", "body: a voice is registered with "
                           "multipart/form-data (name, audio, text, language), not "
                           f"{request.content_type!r}", close=True)
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                return await _read_parts(request, settings.max_upload_bytes)
        except TimeoutError:
            raise _Refused("request_timeout", f"body: not received in "
                           f"{settings.body_timeout_s:g} s (http.body_timeout_s)",
                           close=True) from None
        except (ValueError, HttpProcessingError) as error:
            # aiohttp's multipart parser: a malformed body is a ValueError, a malformed or
            # overlong part header an HttpProcessingError (BadHttpMessage, LineTooLong).
            reason = error.message if isinstance(error, HttpProcessingError) else str(error)
            raise _Refused("invalid_field", f"body: not a valid multipart body ({reason})"[:200],
                           close=True) from None


async def _read_parts(request: web.Request, max_bytes: int) -> Upload:
    """The upload's parts, each read within what is left of `max_bytes`."""
    parts: dict[str, bytes] = {}
    left = max_bytes
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _Refused("invalid_field", "body: nested multipart is not supported",
                           close=True)
        name = part.name or ""
        if name not in (*AUDIO_PARTS, *TEXT_PARTS):
            raise _Refused(str(ErrorCode.UNKNOWN_FIELD), f"{name}: unknown field; known fields "
                           f"are: name, audio, text, language (and OpenAI's audio_sample, "
                           f"type, consent)", name, close=True)
        key = "audio" if name in AUDIO_PARTS else name
        if key in parts:
            raise _Refused(str(ErrorCode.INVALID_FIELD), f"{name}: given twice", name,
                           close=True)
        limit = left if key == "audio" else min(left, MAX_TEXT_PART_BYTES)
        parts[key] = await _read_part(part, limit, max_bytes)
        left -= len(parts[key])
    return _upload(parts)


async def _read_part(part: BodyPartReader, limit: int, max_bytes: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(64 << 10):
        data += chunk
        if len(data) > limit:
            if part.name in TEXT_PARTS:
                raise _Refused(str(ErrorCode.INVALID_FIELD), f"{part.name}: over "
                               f"{MAX_TEXT_PART_BYTES} bytes", part.name, close=True)
            raise _Refused("request_too_large", f"body: over the limit of {max_bytes} bytes "
                           "(http.max_upload_bytes)", close=True)
    return bytes(data)


def _upload(parts: dict[str, bytes]) -> Upload:
    for name in ("name", "audio", "text"):
        if name not in parts:
            raise _Refused(str(ErrorCode.MISSING_FIELD), f"{name}: required field is missing",
                           name)
    text = {}
    for name in TEXT_PARTS:
        try:
            text[name] = parts.get(name, b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _Refused(str(ErrorCode.INVALID_UTF8), f"{name}: not UTF-8 text",
                           name) from None
    if text["type"] not in ("", UPLOAD_TYPE):
        raise _Refused(str(ErrorCode.NOT_SUPPORTED), f"type: only {UPLOAD_TYPE!r} voices "
                       "(a recording and what it says) can be made here", "type")
    return Upload(text["name"], text["text"], text["language"], parts["audio"])
