"""A small synchronous client for cosyvoiced's ZeroMQ interface (see docs/protocol.md).

    with Client("tcp://127.0.0.1:5555") as tts:
        print(tts.ping())
        result = tts.synthesize("Hello.", format="wav")      # one reply, whole file
        with tts.stream("Hello again.") as stream:           # PCM chunks as they are made
            for pcm in stream:
                player.write(pcm)

Non-streaming ops that are safe to repeat are retried Lazy-Pirate style: no reply within
`timeout_s` closes the socket, opens a fresh one and sends again, `retries` times. `submit`
is sent once (a retry could queue the job twice). Errors from the daemon raise
`DaemonError` with its `code`; no reply at all raises `NoReply`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
import zmq.auth

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
_RETRYABLE = {"ping", "voices", "synthesize", "status", "cancel", "stats"}


class ClientError(Exception):
    """Base of what this client raises."""


class NoReply(ClientError):
    """The daemon did not answer in time (down, unreachable, or refusing our key)."""


class DaemonError(ClientError):
    """The daemon answered with an `error` event."""

    def __init__(self, header: dict[str, Any]) -> None:
        super().__init__(f"{header.get('code')}: {header.get('message')}")
        self.code: str = str(header.get("code"))
        self.message: str = str(header.get("message"))
        self.field: str | None = header.get("field")
        self.header = header


@dataclass(frozen=True)
class Result:
    """A whole synthesis: the header fields and the encoded audio."""

    header: dict[str, Any]
    audio: bytes
    timing: dict[str, Any] | None = None  # the `timing` event, when `timestamps` was asked

    @property
    def job(self) -> str:
        return str(self.header["job"])

    @property
    def sample_rate(self) -> int:
        return int(self.header["sample_rate"])


@dataclass
class Stream:
    """An iterator over the raw PCM chunks (s16le mono) of one streamed synthesis.

    `start` is the `start` event (job, sample_rate, ...) once the first reply arrived;
    `end` is the `end` event (audio_s, synth_s, first_chunk_s) after the last chunk.
    Leaving a `with` block early cancels the job on the daemon.
    """

    _client: Client
    _request_id: str
    start: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None  # the `timing` event, when `timestamps` was asked

    def __iter__(self) -> Iterator[bytes]:
        while True:
            header, payload = self._client.receive(self._request_id)
            event = header["event"]
            if event == "start":
                self.start = header
            elif event == "chunk":
                yield payload or b""
            elif event == "timing":  # just before `end`
                self.timing = header
            elif event == "end":
                self.end = header
                return
            elif event == "cancelled":
                raise DaemonError({"code": "cancelled", "message": "the job was cancelled"})
            else:
                raise DaemonError(header)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.end is None and self.start.get("job"):
            # Already finished, or the daemon is gone: then there is nothing left to stop.
            with contextlib.suppress(ClientError):
                self._client.cancel(str(self.start["job"]))


def load_keypair(path: str | Path) -> tuple[bytes, bytes | None]:
    """(public, secret) from a `zmq.auth` certificate file (secret is None in a .key file)."""
    public, secret = zmq.auth.load_certificate(str(path))
    return public, secret


class Client:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, server_key: bytes | None = None,
                 client_keypair: tuple[bytes, bytes] | None = None, timeout_s: float = 10.0,
                 retries: int = 2, admin_token: str | None = None) -> None:
        """`server_key` (the daemon's public key) and `client_keypair` turn on CurveZMQ.
        `admin_token` (the daemon's `admin.token` file, readable on its host only) lets
        this client see and cancel every job, as `cosyvoicectl` does."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self._server_key = server_key
        self._client_keypair = client_keypair
        self._admin = {"admin": admin_token} if admin_token else {}
        # One identity for this client's life, kept across reconnects (its jobs stay its
        # own); random, so that no other client can claim it.
        self._identity = b"c" + secrets.token_bytes(15)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self._identity)
        if self._server_key is not None:
            if self._client_keypair is None:
                raise ValueError("CurveZMQ needs the client's own keypair as well")
            socket.curve_serverkey = self._server_key
            socket.curve_publickey, socket.curve_secretkey = self._client_keypair
        socket.connect(self.endpoint)
        return socket

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the wire ---------------------------------------------------------------------------
    def send(self, op: str, fields: dict[str, Any], attachments: tuple[bytes, ...] = ()) -> str:
        request_id = uuid.uuid4().hex
        header = {"v": 1, "op": op, "id": request_id} | self._admin | fields
        self._socket.send_multipart([json.dumps(header).encode(), *attachments])
        return request_id

    def receive(self, request_id: str) -> tuple[dict[str, Any], bytes | None]:
        """The next reply to `request_id` (replies to abandoned requests are skipped)."""
        while True:
            if not self._socket.poll(int(self.timeout_s * 1000)):
                raise NoReply(f"no reply from {self.endpoint} within {self.timeout_s:g} s")
            frames = self._socket.recv_multipart()
            header: dict[str, Any] = json.loads(frames[0])
            if header.get("id") == request_id:
                return header, frames[1] if len(frames) > 1 else None

    def request(self, op: str, *, attachments: tuple[bytes, ...] = (),
                **fields: Any) -> tuple[dict[str, Any], bytes | None]:
        """One op with a single reply; raises `DaemonError` for an `error` event."""
        attempts = 1 + (self.retries if op in _RETRYABLE else 0)
        for attempt in range(attempts):
            request_id = self.send(op, fields, attachments)
            try:
                header, payload = self.receive(request_id)
            except NoReply:
                if attempt + 1 == attempts:
                    raise
                self._socket.close(linger=0)  # Lazy Pirate: a fresh socket, then resend
                self._socket = self._connect()
                continue
            if header["event"] == "error":
                raise DaemonError(header)
            return header, payload
        raise NoReply(f"no reply from {self.endpoint}")  # pragma: no cover - loop returns

    # -- ops --------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.request("ping")[0]

    def voices(self) -> list[dict[str, Any]]:
        voices: list[dict[str, Any]] = self.request("voices")[0]["voices"]
        return voices

    # `prompt_audio`: the bytes of an audio file (any format soundfile reads) to clone the
    # voice from, sent as attachment frame 1.
    def synthesize(self, text: str, prompt_audio: bytes | None = None,
                   **options: Any) -> Result:
        header, payload = self.request("synthesize", attachments=_audio(prompt_audio), text=text,
                                       stream=False, **options)
        timing = None
        if header["event"] == "timing":  # captions come just before the audio
            timing = header
            header, payload = self.receive(str(header["id"]))
            if header["event"] == "error":
                raise DaemonError(header)
        return Result(header, payload or b"", timing)

    def stream(self, text: str, prompt_audio: bytes | None = None, **options: Any) -> Stream:
        return Stream(self, self.send("synthesize", {"text": text, "stream": True, **options},
                                      _audio(prompt_audio)))

    def submit(self, text: str, prompt_audio: bytes | None = None, **options: Any) -> str:
        return str(self.request("submit", attachments=_audio(prompt_audio), text=text,
                                **options)[0]["job"])

    def register_voice(self, name: str, prompt_audio: bytes, prompt_text: str) -> dict[str, Any]:
        header = self.request("register_voice", attachments=(prompt_audio,), name=name,
                              prompt_text=prompt_text)[0]
        voice: dict[str, Any] = header["voice"]
        return voice

    def remove_voice(self, name: str) -> dict[str, Any]:
        return self.request("remove_voice", name=name)[0]

    def status(self, job: str) -> dict[str, Any]:
        return self.request("status", job=job)[0]

    def cancel(self, job: str) -> dict[str, Any]:
        return self.request("cancel", job=job)[0]

    def stats(self) -> dict[str, Any]:
        return self.request("stats")[0]


def _audio(prompt_audio: bytes | None) -> tuple[bytes, ...]:
    return () if prompt_audio is None else (prompt_audio,)
