"""The ZeroMQ wire format (docs/protocol.md is the contract; this is its one implementation).

A request is ``[JSON header, attachment...]`` after the ROUTER's routing envelope; every
reply is ``[JSON header, optional binary frame]``. Errors are replies too, never silence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cosyvoiced.job import ErrorCode, JobError
from cosyvoiced.untrusted import NotJSON, json_value

VERSION = 1


class Op(StrEnum):
    PING = "ping"
    VOICES = "voices"
    SYNTHESIZE = "synthesize"
    SUBMIT = "submit"
    STATUS = "status"
    CANCEL = "cancel"
    STATS = "stats"
    REGISTER_VOICE = "register_voice"
    REMOVE_VOICE = "remove_voice"


class WireCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_VOICE = "unknown_voice"
    TOO_LONG = "too_long"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"
    # A reply was dropped: the client left zmq.max_buffered_bytes of replies unread.
    CLIENT_TOO_SLOW = "client_too_slow"


# How each job error reads on the wire; the job's own code travels along as `reason`.
_WIRE_CODES = {
    ErrorCode.TEXT_TOO_LONG: WireCode.TOO_LONG,
    ErrorCode.UNKNOWN_VOICE: WireCode.UNKNOWN_VOICE,
    ErrorCode.UNSUPPORTED_FORMAT: WireCode.UNSUPPORTED,
    ErrorCode.EMPTY_TEXT: WireCode.BAD_REQUEST,
    ErrorCode.MISSING_FIELD: WireCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_FIELD: WireCode.BAD_REQUEST,
    ErrorCode.INVALID_FIELD: WireCode.BAD_REQUEST,
    ErrorCode.INVALID_OUTPUT_NAME: WireCode.BAD_REQUEST,
    ErrorCode.SHUTTING_DOWN: WireCode.BUSY,
    ErrorCode.BUSY: WireCode.BUSY,
    ErrorCode.NOT_SUPPORTED: WireCode.UNSUPPORTED,
    ErrorCode.PROMPT_AUDIO_UNREADABLE: WireCode.BAD_REQUEST,
    ErrorCode.PROMPT_AUDIO_TOO_SHORT: WireCode.BAD_REQUEST,
    ErrorCode.PROMPT_AUDIO_TOO_LONG: WireCode.BAD_REQUEST,
    ErrorCode.NOT_OWNER: WireCode.FORBIDDEN,
    ErrorCode.TOO_MANY_VOICES: WireCode.FORBIDDEN,
}

# Arrays and objects in a header nest at most this deep (no op needs more than 2).
MAX_HEADER_DEPTH = 32
# Header keys every request may carry besides its op's own fields.
# `admin`: the daemon's admin token (a local cosyvoicectl's), for any op.
ENVELOPE_KEYS = ("v", "op", "id", "admin")
# Every reply echoes its request's id, and error replies go even to a peer over
# zmq.max_buffered_bytes (errors are never silence): so the id, and what an error message
# quotes of a request, are bounded by the bytes a reply's JSON takes for them (\u escapes
# included). Each error reply stays under 1 KiB.
MAX_REQUEST_ID_BYTES = 256
MAX_ERROR_MESSAGE_BYTES = 512
MAX_ERROR_FIELD_BYTES = 64
MAX_QUOTED_BYTES = 64  # a value of the request that a message quotes


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    max_attachment_bytes: int


class ProtocolError(Exception):
    """A request that cannot be served; becomes one `error` reply."""

    def __init__(self, code: WireCode, message: str, request_id: str | None = None,
                 field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.field = field
        self.reason = reason

    @classmethod
    def from_job_error(cls, error: JobError, request_id: str | None) -> ProtocolError:
        return cls(_WIRE_CODES.get(error.code, WireCode.INTERNAL), error.message, request_id,
                   error.field, str(error.code))

    def fields(self) -> dict[str, Any]:
        """The error's reply fields. A message or field name may quote the request (a job
        error's does): both are clipped, so that every error reply is small."""
        detail: dict[str, Any] = {"code": str(self.code),
                                  "message": clipped(self.message, MAX_ERROR_MESSAGE_BYTES)}
        if self.field is not None:
            detail["field"] = clipped(self.field, MAX_ERROR_FIELD_BYTES)
        if self.reason is not None and self.reason != str(self.code):
            detail["reason"] = self.reason
        return detail


@dataclass(frozen=True)
class Request:
    route: tuple[bytes, ...]  # the ROUTER envelope: identity, plus b"" for REQ clients
    id: str
    op: Op
    header: dict[str, Any]
    attachments: tuple[bytes, ...] = field(default=())
    user: str | None = None  # the CURVE public key ZAP authenticated it with (Z85)
    host: str | None = None  # the address its connection comes from (libzmq's Peer-Address)

    @property
    def client(self) -> bytes:
        return self.route[0]

    @property
    def can_stream(self) -> bool:
        """REQ sockets take exactly one reply per request; DEALER sockets take a stream."""
        return len(self.route) == 1

    def fields(self) -> dict[str, Any]:
        """The op's own fields: the header without the envelope keys."""
        return {key: value for key, value in self.header.items() if key not in ENVELOPE_KEYS}


def split_envelope(frames: list[bytes]) -> tuple[tuple[bytes, ...], list[bytes]]:
    """(route, body): REQ clients put an empty delimiter after the identity."""
    if len(frames) >= 2 and frames[1] == b"":
        return tuple(frames[:2]), frames[2:]
    return tuple(frames[:1]), frames[1:]


def parse(route: tuple[bytes, ...], body: list[bytes], limits: Limits) -> Request:
    """A `Request`, or a `ProtocolError` naming what is wrong with the frames."""
    if not body:
        raise ProtocolError(WireCode.BAD_REQUEST, "frame 0: missing JSON header")
    raw = body[0]
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError(WireCode.BAD_REQUEST, f"frame 0: header is {len(raw)} bytes; the "
                            f"limit is {limits.max_header_bytes}")
    header = _load_header(raw)
    if not isinstance(header, dict):
        raise ProtocolError(WireCode.BAD_REQUEST, "frame 0: header must be a JSON object")
    request_id = _request_id(header)
    version = header.get("v")
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(WireCode.BAD_REQUEST, f"v: protocol version must be {VERSION}; "
                            f"got {quoted(version)}", request_id, "v")
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError(WireCode.BAD_REQUEST, "op: required string is missing or not a "
                            "string", request_id, "op")
    if op not in Op.__members__.values():
        raise ProtocolError(WireCode.UNKNOWN_OP, f"op: {quoted(op)} is not an op; known ops "
                            f"are: {', '.join(Op)}", request_id, "op")
    attachments = tuple(body[1:])
    for index, attachment in enumerate(attachments, start=1):
        if len(attachment) > limits.max_attachment_bytes:
            raise ProtocolError(WireCode.TOO_LONG, f"frame {index}: attachment is "
                                f"{len(attachment)} bytes; the limit is "
                                f"{limits.max_attachment_bytes}", request_id)
    return Request(route, request_id, Op(op), header, attachments)


def _request_id(header: dict[str, Any]) -> str:
    """The request's id; one too long to echo is refused, and not echoed."""
    request_id = header.get("id")
    if not isinstance(request_id, str):
        raise ProtocolError(WireCode.BAD_REQUEST, "id: required string is missing or not a "
                            "string", field="id")
    size = json_bytes(request_id)
    if size > MAX_REQUEST_ID_BYTES:
        raise ProtocolError(WireCode.BAD_REQUEST, f"id: at most {MAX_REQUEST_ID_BYTES} bytes "
                            f"as JSON writes it (ASCII, \\u escapes); got {size}", field="id")
    return request_id


def json_bytes(text: str) -> int:
    """The bytes a reply's JSON takes for `text`, quotes left out."""
    return len(json.dumps(text)) - 2


def clipped(text: str, limit: int) -> str:
    """`text`, cut (ending in "...") so that a reply's JSON takes at most `limit` bytes."""
    if json_bytes(text) <= limit:
        return text
    size, end = len("..."), 0
    for char in text:
        size += json_bytes(char)
        if size > limit:
            break
        end += 1
    return text[:end] + "..."


def quoted(value: Any, limit: int = MAX_QUOTED_BYTES) -> str:
    """A request's value, as an error message quotes it: its repr, clipped."""
    return clipped(repr(value), limit)


def _load_header(raw: bytes) -> Any:
    """The JSON value of frame 0; any failure is the sender's: a `ProtocolError`."""
    try:
        header = json_value(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, TypeError, NotJSON) as error:
        raise ProtocolError(WireCode.BAD_REQUEST, "frame 0: not a UTF-8 JSON header "
                            f"({type(error).__name__}: {_shortened(error)})") from None
    if _nested_deeper_than(header, MAX_HEADER_DEPTH):
        raise ProtocolError(WireCode.BAD_REQUEST, f"frame 0: the header is nested more than "
                            f"{MAX_HEADER_DEPTH} levels deep")
    return header


def _shortened(error: BaseException, limit: int = 200) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "..."


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit`, found without recursion (the
    point is to refuse what later recursive code, such as `json.dumps`, could choke on)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else \
            item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                pending.append((child, depth + 1))
    return False


def encode_reply(route: tuple[bytes, ...], request_id: str | None, event: str,
                 payload: bytes | None = None, **fields: Any) -> list[bytes]:
    header = {"id": request_id, "event": event} | fields
    frames = [*route, json.dumps(header, separators=(",", ":")).encode()]
    if payload is not None:
        frames.append(payload)
    return frames


def error_reply(route: tuple[bytes, ...], error: ProtocolError) -> list[bytes]:
    return encode_reply(route, error.request_id, "error", **error.fields())
