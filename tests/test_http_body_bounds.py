"""How much of a speech request's body is read and parsed, on the real daemon.

A body may be over http.max_body_bytes (1 MiB) only by a `clone`'s audio, up to
http.max_upload_bytes (16 MiB). Every large body was read whole and parsed as JSON before
the daemon looked for the clone: 16 MiB of `[{},{},...]` made 410 MiB of objects on the
loop that serves every HTTP client, and a plain body was told `busy` (429, to retry: it
never could succeed) while the upload slots were taken. Now whether a body is a clone's is
told when it goes over max_body_bytes, by what it says there; a plain one is refused at
once, and no more than max_body_bytes of JSON is parsed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import soundfile

from cosyvoiced import memory
from cosyvoiced.admission import MAX_UPLOADS_AT_ONCE, MAX_UPLOADS_PER_CLIENT
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until
from tests.engines.faulty import SECONDS_PER_CHAR
from tests.test_http_limits import _read_response
from tests.test_http_voices import TEXT, assert_spoken, recording

MAX_BODY = 1 << 20  # the defaults: http.max_body_bytes
MAX_UPLOAD = 16 << 20  # http.max_upload_bytes
TIMEOUT_S = 30.0
PLAIN_LIMIT = f"over the limit of {MAX_BODY} bytes (http.max_body_bytes)"
PARSE_HEAP_BYTES = 32 << 20  # what a refused body may add to the supervisor's heap
CLONE_S = 25.0  # a clone whose audio takes its body past max_body_bytes
SAMPLE_EVERY_S = 0.002
# A clone whose base64 audio ends 516 bytes under max_body_bytes (16.375 s of 24 kHz WAV:
# 786,044 bytes), and whose text takes the body over it.
NEAR_LIMIT_S = 16.375
NEAR_LIMIT_TEXT = "These are the words that the recording says. " * 20
# A config with http.max_upload_bytes under max_body_bytes (each need only be 1 KiB).
SMALL_UPLOAD = {"max_body_bytes": 256 << 10, "max_upload_bytes": 1024}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    root = tmp_path_factory.mktemp("bounds")
    port = free_port()
    daemon = Daemon(root, engine={"name": "tests.engines.faulty:cloning"},
                    http={"listen": f"127.0.0.1:{port}"})
    daemon.start()
    yield daemon, port
    daemon.stop()


@pytest.fixture
def client(served: tuple[Daemon, int]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="none",
                       max_retries=0, timeout=TIMEOUT_S) as connected:
        yield connected


def _head(length: int) -> bytes:
    return (f"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            f"application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # refused part way: the daemon closed its end
        sock.sendall(data)


def _post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of `body`, sent whole while the answer is read: one refused
    unread is answered before the daemon stops reading."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sender = threading.Thread(target=_send, args=(sock, _head(len(body)) + body))
        sender.start()
        status, _headers, answer = _read_response(sock)
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(TIMEOUT_S)
    return status, json.loads(answer)


class _PeakHeap:
    """The most heap the daemon's process has had while this runs (its memory, sampled)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak = memory.heap_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak = max(self.peak, memory.heap_bytes(self._pid))

    def __enter__(self) -> _PeakHeap:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _refusal(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> tuple[int, str, str]:
    error = caught.value.body
    assert isinstance(error, dict), error
    return caught.value.status_code, error["code"], error["message"]


def test_a_large_body_without_a_clone_is_refused_unparsed(
        served: tuple[Daemon, int]) -> None:
    """16 MiB of `[{},{},...]`: parsed whole before the size check, 410 MiB of objects."""
    daemon, port = served
    assert daemon.process is not None
    opening = b'{"model": "tts-1", "voice": "tone", "input": "Hi.", "x": ['
    body = opening + b"{}," * ((MAX_UPLOAD - len(opening) - 4) // 3) + b"{}]}"
    assert MAX_UPLOAD - 8 < len(body) <= MAX_UPLOAD
    before = memory.heap_bytes(daemon.process.pid)
    with _PeakHeap(daemon.process.pid) as heap:
        for _ in range(2):
            status, answer = _post(port, body)
            assert (status, answer["error"]["code"]) == (413, "request_too_large"), answer
            assert f"{MAX_BODY} bytes (http.max_body_bytes" in answer["error"]["message"]
    grown = heap.peak - before
    print(f"the supervisor's heap grew by {grown / 2**20:.1f} MiB at most")
    assert grown < PARSE_HEAP_BYTES, f"{grown / 2**20:.0f} MiB"


@contextlib.contextmanager
def _every_upload_slot_held(port: int) -> Iterator[None]:
    """Clones that stall part way, from addresses enough to hold every upload slot."""
    opening = b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "clone": {"audio": "'
    start = _head(4 << 20) + opening + b"A" * (MAX_BODY + (128 << 10))
    hosts = [f"127.0.0.{2 + n // MAX_UPLOADS_PER_CLIENT}" for n in range(MAX_UPLOADS_AT_ONCE)]
    with contextlib.ExitStack() as stack:
        for host in hosts:
            sock = stack.enter_context(socket.create_connection(
                ("127.0.0.1", port), timeout=TIMEOUT_S, source_address=(host, 0)))
            sock.sendall(start)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S,
                                      source_address=("127.0.0.9", 0)) as one_more:
            _send(one_more, start)
            status, _headers, answer = _read_response(one_more)
        assert (status, json.loads(answer)["error"]["code"]) == (429, "busy"), answer
        yield


def test_a_plain_body_over_max_body_bytes_is_413_even_while_uploads_are_busy(
        served: tuple[Daemon, int], client: openai.OpenAI) -> None:
    """It took an upload slot, and with none free was told `busy` (the SDK retries a 429,
    and it could never succeed)."""
    with _every_upload_slot_held(served[1]), \
            pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(model="tts-1", voice="tone", input="x" * (2 << 20))
    status, code, message = _refusal(caught)
    assert (status, code) == (413, "request_too_large"), message
    assert PLAIN_LIMIT in message
    clone = {"audio": base64.b64encode(recording(CLONE_S, 24000)).decode()}
    assert len(clone["audio"]) > MAX_BODY
    wav = wait_until(lambda: _spoken_unless_busy(client, clone), TIMEOUT_S,
                     "the stalled uploads' slots to be free again")
    assert_spoken(wav, TEXT, CLONE_S)


def test_a_plain_body_over_max_upload_bytes_is_told_its_own_limit(
        client: openai.OpenAI) -> None:
    """Refused by its Content-Length, unread: it was told of the clones' limit."""
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(model="tts-1", voice="tone", input="x" * MAX_UPLOAD)
    status, code, message = _refusal(caught)
    assert (status, code) == (413, "request_too_large"), message
    assert PLAIN_LIMIT in message


def test_an_over_large_clone_is_told_the_same_chunked_or_by_its_content_length(
        served: tuple[Daemon, int]) -> None:
    """Refused by its Content-Length it was told of max_body_bytes; chunked, read until
    over max_upload_bytes, of max_upload_bytes alone. Both name both limits now."""
    opening = b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "clone": {"audio": "'
    body = opening + b"A" * (MAX_UPLOAD - len(opening) + 1) + b'"}}'
    answers = [_post(served[1], body), _post_chunked(served[1], body)]
    for status, answer in answers:
        assert (status, answer["error"]["code"]) == (413, "request_too_large"), answer
    assert answers[0][1]["error"]["message"] == answers[1][1]["error"]["message"] == (
        f"body: {PLAIN_LIMIT}; only a `clone`'s audio may take a body past it, up to "
        f"{MAX_UPLOAD} bytes (http.max_upload_bytes)")


def _post_chunked(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    """As `_post`, sent in chunks of 1 MiB with no Content-Length."""
    head = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    pieces = (body[at:at + MAX_BODY] for at in range(0, len(body), MAX_BODY))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sender = threading.Thread(target=_send, args=(sock, head + chunked + b"0\r\n\r\n"))
        sender.start()
        status, _headers, answer = _read_response(sock)
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(TIMEOUT_S)
    return status, json.loads(answer)


def test_a_clone_whose_audio_ends_just_under_max_body_bytes_is_spoken(
        served: tuple[Daemon, int]) -> None:
    """The clone's text (after its audio; the openai SDK puts extra_body last) took the body
    over max_body_bytes, and the byte there was not in the audio: 413, although all but the
    audio was about 1 KB."""
    audio = base64.b64encode(recording(NEAR_LIMIT_S, 24000)).decode()
    sent: list[bytes] = []
    hooks = {"request": [lambda request: sent.append(request.read())]}
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="none",
                       max_retries=0, timeout=TIMEOUT_S,
                       http_client=openai.DefaultHttpxClient(event_hooks=hooks)) as client:
        wav = client.audio.speech.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="wav",
            extra_body={"clone": {"audio": audio, "text": NEAR_LIMIT_TEXT}}).content
    audio_ends = sent[0].index(audio.encode()) + len(audio) + 1  # and its closing quote
    print(f"the audio ended at byte {audio_ends:,} of {len(sent[0]):,}")
    assert audio_ends < MAX_BODY < len(sent[0]), (audio_ends, len(sent[0]))
    assert sent[0].index(NEAR_LIMIT_TEXT.encode()) > audio_ends
    assert_spoken(wav, TEXT, NEAR_LIMIT_S)


def test_a_body_under_max_body_bytes_is_read_where_max_upload_bytes_is_smaller(
        make_daemon: DaemonFactory) -> None:
    """With http.max_upload_bytes under max_body_bytes, a body over the upload limit, plain
    or a clone's, was refused 413 naming max_body_bytes, which it was under. Bodies may
    have the larger of the two again; only the clone's audio goes past max_body_bytes."""
    port = free_port()
    limit = SMALL_UPLOAD["max_body_bytes"]
    daemon = make_daemon(engine={"name": "tests.engines.faulty:cloning"},
                         http={"listen": f"127.0.0.1:{port}", **SMALL_UPLOAD})
    daemon.start()
    text = " ".join([TEXT] * 100)  # a 1.3 KB body
    clone = {"audio": base64.b64encode(recording(2.0)).decode()}  # 85 KB
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                       max_retries=0, timeout=TIMEOUT_S) as client:
        plain = client.audio.speech.create(model="tts-1", voice="tone", input=text,
                                           response_format="wav").content
        cloned = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                            response_format="wav",
                                            extra_body={"clone": clone}).content
        with pytest.raises(openai.APIStatusError) as caught:
            client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                       extra_body={"clone": {"audio": "A" * limit}})
    samples, rate = soundfile.read(io.BytesIO(plain), dtype="float32")
    assert len(samples) / rate > 0.9 * len(text) * SECONDS_PER_CHAR
    assert float(np.sqrt(np.mean(np.square(samples)))) > 0.1
    assert_spoken(cloned, TEXT, 2.0)
    status, code, message = _refusal(caught)
    assert (status, code) == (413, "request_too_large"), message
    assert message == f"body: over the limit of {limit} bytes (http.max_body_bytes)"


def _spoken_unless_busy(client: openai.OpenAI, clone: dict[str, str]) -> bytes | None:
    try:
        return client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                          response_format="wav",
                                          extra_body={"clone": clone}).content
    except openai.RateLimitError:
        return None


def test_only_a_clones_audio_takes_a_body_past_max_body_bytes(
        served: tuple[Daemon, int], client: openai.OpenAI) -> None:
    audio = base64.b64encode(recording(CLONE_S, 24000)).decode()
    assert "/" in audio
    # The clone first, its audio last, with JSON's escaped slashes (as PHP writes them).
    body = ('{"clone": {"text": "Me.", "audio": "' + audio.replace("/", "\\/") + '"}, '
            f'"model": "tts-1", "voice": "alloy", "input": "{TEXT}", '
            '"response_format": "wav"}').encode()
    status, wav = _post_aiohttp(served[1], body)
    assert status == 200, wav[:300]
    assert_spoken(wav, TEXT, CLONE_S)
    # More than max_body_bytes of JSON besides the audio: refused, not parsed.
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, extra_body={
            "clone": {"audio": audio}, "x": [{}] * (MAX_BODY // 3)})
    status, code, message = _refusal(caught)
    assert (status, code) == (413, "request_too_large"), message
    assert PLAIN_LIMIT in message
    # Audio that is not a clone's.
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                   extra_body={"audio": audio})
    status, code, message = _refusal(caught)
    assert (status, code) == (413, "request_too_large"), message


def _post_aiohttp(port: int, body: bytes) -> tuple[int, bytes]:
    async def post() -> tuple[int, bytes]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(TIMEOUT_S)) as session, \
                session.post(f"http://127.0.0.1:{port}/v1/audio/speech", data=io.BytesIO(body),
                             headers={"Content-Type": "application/json"}) as reply:
            return reply.status, await reply.read()

    return asyncio.run(post())
