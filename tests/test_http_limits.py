"""The HTTP and metrics listeners against hostile clients: slow, silent, greedy or odd.

nginx's client limits are the model (header, body, send and idle timeouts, a connection
cap, `Retry-After` on 429). Each test talks to the real daemon over real sockets, most of
them raw, because a well-behaved client library cannot misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest

import cosyvoiced
from tests.audiofile import read_audio
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, out_of_descriptors, wait_until

KEY = "sk-limits-0123456789"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
IDLE_TIMEOUT_S = 4.0
SEND_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 6
METRICS_MAX_CONNECTIONS = 2
SLACK_S = 3.0  # a loaded test machine's scheduling, on top of a limit
TONE = "tone"


@dataclass
class Listeners:
    daemon: Daemon
    http: tuple[str, int]
    metrics: tuple[str, int]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    root = tmp_path_factory.mktemp("limits")
    keys = root / "api_keys"
    keys.write_text(f"{KEY}\n")
    http_port, metrics_port = free_port(), free_port()
    daemon = Daemon(root, engine={"name": "tests.engines.faulty:load"},
                    http={"listen": f"127.0.0.1:{http_port}", "api_keys_file": str(keys),
                          "header_timeout_s": HEADER_TIMEOUT_S,
                          "body_timeout_s": BODY_TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S,
                          "send_timeout_s": SEND_TIMEOUT_S, "max_connections": MAX_CONNECTIONS,
                          "max_pending_per_client": 1},
                    metrics={"listen": f"127.0.0.1:{metrics_port}",
                             "header_timeout_s": HEADER_TIMEOUT_S,
                             "idle_timeout_s": IDLE_TIMEOUT_S,
                             "max_connections": METRICS_MAX_CONNECTIONS})
    daemon.start()
    yield Listeners(daemon, ("127.0.0.1", http_port), ("127.0.0.1", metrics_port))
    daemon.stop()


@contextlib.contextmanager
def connected(address: tuple[str, int], receive_buffer: int = 0,
              source: str = "") -> Iterator[socket.socket]:
    sock = socket.socket()
    if source:
        sock.bind((source, 0))
    if receive_buffer:  # before connect, so the window offered is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()


def _closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """True once the server closed `sock` (EOF or reset), False if it is still open."""
    readable, _, _ = select.select([sock], [], [], timeout_s)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionError:
        return True


def _seconds_until_closed(sock: socket.socket, limit_s: float) -> float:
    started = time.monotonic()
    assert _closed_by_peer(sock, limit_s), f"still open after {limit_s:g} s"
    return time.monotonic() - started


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one response with a Content-Length, read raw."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"closed before a whole response head: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(status_line.split()[1]), headers, body


def _error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def _speech_head(length: int, extra: str = "", key: str | None = KEY) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
            ).encode()


def _post(served: Listeners, body: bytes, headers: dict[str, str] | None = None
          ) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*served.http, timeout=30)
    try:
        connection.request("POST", "/v1/audio/speech", body, {
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
            **(headers or {})})
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def _speech(text: str, **fields: Any) -> bytes:
    return json.dumps({"model": "tts-1", "voice": TONE, "input": text, **fields}).encode()


# -- timeouts --------------------------------------------------------------------------------
def test_headers_dribbled_a_byte_at_a_time_are_cut_off_after_header_timeout(
        served: Listeners) -> None:
    with connected(served.http) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < IDLE_TIMEOUT_S + SLACK_S:
            with contextlib.suppress(ConnectionError):
                sock.sendall(b"a")
            closed = _closed_by_peer(sock, 0.2)
        elapsed = time.monotonic() - started
    assert closed, "a slowloris client was held past the idle timeout"
    # Closed for its headers, not for idling (idle_timeout_s is longer).
    assert elapsed < HEADER_TIMEOUT_S + 1.5, f"closed after {elapsed:.1f} s"


def test_a_connection_that_never_sends_is_closed_after_idle_timeout(served: Listeners) -> None:
    with connected(served.http) as sock:
        elapsed = _seconds_until_closed(sock, IDLE_TIMEOUT_S + SLACK_S)
    assert elapsed > IDLE_TIMEOUT_S - 0.5, "closed before idle_timeout_s"


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(served: Listeners) -> None:
    with connected(served.http) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, _body = _read_response(sock)
        assert status == 200
        assert headers.get("connection", "").lower() != "close"
        elapsed = _seconds_until_closed(sock, IDLE_TIMEOUT_S + SLACK_S)
    assert elapsed > IDLE_TIMEOUT_S - 0.5


def test_a_body_shorter_than_its_content_length_gets_408(served: Listeners) -> None:
    with connected(served.http) as sock:
        sock.sendall(_speech_head(1000) + b'{"model": ')
        started = time.monotonic()
        sock.settimeout(BODY_TIMEOUT_S + SLACK_S)
        status, headers, body = _read_response(sock)
        elapsed = time.monotonic() - started
        assert (status, _error_code(body)) == (408, "request_timeout")
        assert headers["connection"].lower() == "close"
        assert _closed_by_peer(sock, SLACK_S)
    assert elapsed > BODY_TIMEOUT_S - 0.5


def test_a_chunked_body_that_never_ends_gets_408(served: Listeners) -> None:
    head = _speech_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    with connected(served.http) as sock:
        sock.sendall(head)
        started = time.monotonic()
        while not select.select([sock], [], [], 0.1)[0]:
            assert time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S, "no answer"
            sock.sendall(b"1\r\n \r\n")
        status, _headers, body = _read_response(sock)
    assert (status, _error_code(body)) == (408, "request_timeout")


def test_a_client_that_stops_reading_has_its_job_cancelled(served: Listeners) -> None:
    # Minutes of audio come fast (more than every buffer on the way holds), then the job
    # slows down: it is still running when the writes stall.
    text = " ".join(["The quick brown fox jumps over the lazy dog again and again."] * 100
                    + ["SLOW@1."] * 60)
    with connected(served.http, receive_buffer=4096) as sock:
        job_id = _job_asked(sock, _speech(text, response_format="pcm"))
        # ... and never reads again.
        started = time.monotonic()
        ended = wait_until(lambda: [e for e in served.daemon.log_events("job")
                                    if e["job"] == job_id], SEND_TIMEOUT_S + 25,
                           "the stalled job to end")
        elapsed = time.monotonic() - started
    assert ended[0]["outcome"] == "cancelled"
    assert elapsed < SEND_TIMEOUT_S + 20


def test_a_reply_whose_client_stops_reading_after_its_job_ended_is_counted_undelivered(
        served: Listeners) -> None:
    """The job's audio was all made (its `job` line says done), then its client stopped
    reading and was cut off: nothing more was said, in the log, `stats` or the metrics, as
    if the reply had been heard."""
    text = " ".join(["The quick brown fox jumps over the lazy dog again and again."] * 100)
    with connected(served.http, receive_buffer=4096) as sock:
        # A captioned reply is sent whole once its job has ended: 19 MB, never read.
        job_id = _job_asked(sock, _speech(text, response_format="pcm", timestamps="sentence"))
        ended = wait_until(lambda: [e for e in served.daemon.log_events("job")
                                    if e["job"] == job_id], 10, "the job's line")
        assert ended[0]["outcome"] == "done"
        undelivered = wait_until(lambda: [e for e in served.daemon.log_events(
            "reply_undelivered") if e["job"] == job_id], SEND_TIMEOUT_S + 20,
            "the reply to be counted undelivered")
    assert undelivered[0]["source"] == "http"
    assert len(undelivered) == 1
    counted = re.search(r'^cosyvoiced_replies_undelivered_total\{source="http"\} (\S+)$',
                        _metrics_get(served, "/metrics")[1], re.MULTILINE)
    assert counted is not None
    assert float(counted.group(1)) >= 1


def _job_asked(sock: socket.socket, body: bytes) -> str:
    """Ask for speech; its job id, from the response's head (the body is left unread)."""
    sock.sendall(_speech_head(len(body)) + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return next(line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
                if line.lower().startswith("x-cosyvoiced-job:"))


def test_responses_nobody_reads_do_not_hold_the_connection(served: Listeners) -> None:
    """A client that pipelined requests for a static file and read none of the responses
    held its connection, and its slot, for good: aiohttp waits for a client to drain with no
    timeout, and the connection has a request in hand, so no other timeout applied. Writing
    that stays paused for twice send_timeout_s now resets the connection."""
    request = b"GET /console/static/board.js HTTP/1.1\r\nHost: localhost\r\n\r\n"
    # 9 MB: more than the kernel's send buffer takes (it grows to 4 MiB) and asyncio's.
    whole = 1000 * (Path(cosyvoiced.__file__).parent / "console" / "board.js").stat().st_size
    with connected(served.http, receive_buffer=4096) as sock:
        sock.sendall(request * 1000)
        cut = wait_until(lambda: served.daemon.log_events("send_timeout_cut"),
                         SEND_TIMEOUT_S + 20, "the connection cut for reading nothing")
        assert cut[0]["listener"] == "http"
        received, reset = _read_until_closed(sock, SLACK_S)
    assert received < whole / 2, f"{received} of {whole} bytes: the responses were all sent"
    assert reset, "closed, not reset: the kernel kept what was unsent for a client that reads"


def _read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[int, bool]:
    """How many bytes came before the server closed the connection, and whether it reset
    it (dropping what was unsent) rather than closing it after the rest."""
    sock.settimeout(timeout_s)
    received = 0
    try:
        while data := sock.recv(65536):
            received += len(data)
    except ConnectionResetError:
        return received, True
    return received, False


# -- connection caps -------------------------------------------------------------------------
def test_connections_over_the_cap_get_503_and_are_closed(served: Listeners) -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            stack.enter_context(connected(served.http))
        extra = stack.enter_context(connected(served.http))
        extra.settimeout(SLACK_S)
        status, headers, body = _read_response(extra)
        assert (status, _error_code(body)) == (503, "too_many_connections")
        assert int(headers["retry-after"]) >= 1
        assert _closed_by_peer(extra, SLACK_S)
    # Once they are gone, there is room again.
    connection = http.client.HTTPConnection(*served.http, timeout=10)
    wait_until(lambda: _healthy(connection), 10, "a connection under the cap to be served")
    refused = wait_until(lambda: served.daemon.log_events("connections_refused"), 15,
                         "the refusals to be counted in the log")
    assert refused[0]["count"] >= 1
    assert refused[0]["listener"] == "http"


HOG = "127.0.0.2"  # another host, as loopback sees it (all of 127/8 is this machine)


def test_one_host_holding_every_slot_gives_one_up_to_another_host(served: Listeners) -> None:
    """One host that opened every connection and sends nothing locked the others out until
    its connections timed out, and then took the slots again. A host holding more gives an
    idle one up to a host holding fewer; its own extra connection is still refused."""
    with contextlib.ExitStack() as stack:
        hogged = [stack.enter_context(connected(served.http, source=HOG))
                  for _ in range(MAX_CONNECTIONS)]
        with openai.OpenAI(base_url=f"http://{served.http[0]}:{served.http[1]}/v1",
                           api_key=KEY, max_retries=0, timeout=30) as client:
            reply = client.audio.speech.create(model="tts-1", voice=TONE, input="Let me in.",
                                               response_format="wav")
            samples, rate = read_audio(reply.content)
            assert rate > 0
            assert len(samples) > rate // 10, "under 0.1 s of audio"
            assert float(np.abs(samples).max()) > 0.01
            closed = [sock for sock in hogged if _closed_by_peer(sock, 0.5)]
            assert len(closed) == 1, f"{len(closed)} of the host's connections were closed"
            # The client's connection is kept alive: the slots are full again.
            extra = stack.enter_context(connected(served.http, source=HOG))
            extra.settimeout(SLACK_S)
            status, _headers, body = _read_response(extra)
            assert (status, _error_code(body)) == (503, "too_many_connections")
    given_up = wait_until(lambda: served.daemon.log_events("connections_given_up"), 15,
                          "the connection given up to be logged")
    assert (given_up[0]["address"], given_up[0]["newcomer"]) == (HOG, "127.0.0.1")


def test_a_host_holding_every_slot_with_quiet_websockets_gives_one_up(
        served: Listeners) -> None:
    """A WebSocket holds its connection in a handler, so it never counted as idle: one
    host's multi-stream-input sockets, each saying nothing (a keep-alive every few minutes
    keeps one open), held every slot for good. One with nothing being made or sent, whose
    client said nothing for crowding.QUIET_S, is given up for another host's newcomer."""
    url = f"ws://{served.http[0]}:{served.http[1]}/v1/text-to-speech/{TONE}/multi-stream-input"
    given_up_before = len(served.daemon.log_events("connections_given_up"))

    async def hog_then_come_in() -> list[bool]:
        hog = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(HOG, 0)))
        async with hog, aiohttp.ClientSession() as newcomer:
            sockets = [await hog.ws_connect(url, headers={"xi-api-key": KEY})
                       for _ in range(MAX_CONNECTIONS)]

            async def let_in() -> bool:
                async with newcomer.get(f"http://{served.http[0]}:{served.http[1]}/healthz",
                                        headers={"Connection": "close"}) as reply:
                    return reply.status == 200

            deadline = time.monotonic() + 15 + SLACK_S  # QUIET_S, and a loaded machine's
            while not await let_in():
                assert time.monotonic() < deadline, "the newcomer never got a slot"
                await asyncio.sleep(0.2)
            closed = [ws.closed or (await _next_frame(ws)).type == aiohttp.WSMsgType.CLOSED
                      for ws in sockets]
            for ws in sockets:
                await ws.close()
            return closed

    closed = asyncio.run(hog_then_come_in())
    assert closed.count(True) == 1, closed
    given_up = wait_until(
        lambda: served.daemon.log_events("connections_given_up")[given_up_before:], 15,
        "the connection given up to be logged")
    assert given_up[0]["address"] == HOG


async def _next_frame(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    try:
        return await ws.receive(timeout=0.5)
    except TimeoutError:
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, "", None)


def _healthy(connection: http.client.HTTPConnection) -> bool:
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def test_accept_errors_are_logged_once_per_interval(make_daemon: DaemonFactory) -> None:
    port = free_port()
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         http={"listen": f"127.0.0.1:{port}", "max_connections": 5000})
    daemon.start()
    with out_of_descriptors(daemon, port):  # accept() fails with EMFILE
        wait_until(lambda: _accept_lines(daemon), 15, "an accept error in the log")
        time.sleep(3.0)  # asyncio retries each second, up to its backlog times per retry
        lines = _accept_lines(daemon)
    throttled = [e for e in lines if e["event"] == "accept_failed"]
    assert throttled, lines[:3]
    assert len(lines) <= 3, f"{len(lines)} lines for accept errors"
    assert throttled[0]["count"] >= 1
    assert "Too many open files" in throttled[0]["error"]


def _accept_lines(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e["event"] == "accept_failed"
            or "out of system resource" in str(e["event"])]


# -- small ones ------------------------------------------------------------------------------
def test_json_nested_too_deep_is_bad_json(served: Listeners) -> None:
    status, headers, body = _post(served, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400, body[:200]
    assert headers["content-type"].startswith("application/json")
    assert _error_code(body) == "bad_json"


@pytest.mark.parametrize(("fields", "code", "param"), [
    ({"response_format": {}}, "unsupported_format", "response_format"),
    ({"response_format": ""}, "unsupported_format", "response_format"),
    ({"response_format": 0}, "unsupported_format", "response_format"),
    ({"stream_format": {}}, "invalid_field", "stream_format"),
    ({"stream_format": False}, "invalid_field", "stream_format"),
    ({"instructions": 0}, "invalid_field", "instructions"),
    ({"instructions": []}, "invalid_field", "instructions"),
    ({"speed": "fast"}, "invalid_field", "speed"),
    ({"speed": True}, "invalid_field", "speed"),
])
def test_a_field_of_the_wrong_type_is_refused_not_defaulted(
        served: Listeners, fields: dict[str, Any], code: str, param: str) -> None:
    status, _headers, body = _post(served, _speech("Hello.", **fields))
    assert status == 400, body[:200]
    error = json.loads(body)["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_null_fields_mean_the_defaults(served: Listeners) -> None:
    status, headers, _body = _post(served, _speech("Hello.", response_format=None,
                                                   stream_format=None, speed=None,
                                                   instructions=None))
    assert status == 200
    assert headers["content-type"] == "audio/mpeg"


def test_busy_answers_carry_retry_after(served: Listeners) -> None:
    # max_pending_per_client = 1: a slow request nobody reads holds the one place.
    held = http.client.HTTPConnection(*served.http, timeout=30)
    before = len(served.daemon.log_events("job_queued"))
    try:
        held.request("POST", "/v1/audio/speech", _speech("SLOW@2. One more."),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        wait_until(lambda: len(served.daemon.log_events("job_queued")) > before, 15,
                   "the slow request to be queued")
        with openai.OpenAI(base_url=f"http://{served.http[0]}:{served.http[1]}/v1",
                           api_key=KEY, max_retries=0, timeout=30) as client, \
                pytest.raises(openai.RateLimitError) as caught:
            client.audio.speech.create(model="tts-1", voice=TONE, input="Hello.")
    finally:
        held.close()
    assert caught.value.code == "busy"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 5


def test_expect_100_continue_checks_the_key_first(served: Listeners) -> None:
    body = _speech("Hello.", response_format="wav")
    with connected(served.http) as sock:
        sock.sendall(_speech_head(len(body), "Expect: 100-continue\r\n", key=None))
        sock.settimeout(SLACK_S)
        status, headers, reply = _read_response(sock)
    assert (status, _error_code(reply)) == (401, "invalid_api_key")
    assert headers["www-authenticate"] == "Bearer"
    # With the key: 100 Continue, then the speech.
    with connected(served.http) as sock:
        sock.sendall(_speech_head(len(body), "Expect: 100-continue\r\n"))
        sock.settimeout(SLACK_S)
        interim = sock.recv(64)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        data = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 200 "), data[:100]


# -- the metrics endpoint --------------------------------------------------------------------
def _metrics_get(served: Listeners, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection(*served.metrics, timeout=10)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    finally:
        connection.close()


def test_metrics_are_served_at_their_path_only(served: Listeners) -> None:
    status, text = _metrics_get(served, "/metrics")
    assert status == 200
    assert "cosyvoiced_queue_depth" in text
    assert _metrics_get(served, "/")[0] == 404
    assert _metrics_get(served, "/metrics/../../etc/passwd")[0] == 404
    assert _metrics_get(served, "/anything")[0] == 404


def test_metrics_close_slow_and_idle_connections(served: Listeners) -> None:
    with connected(served.metrics) as sock:
        elapsed = _seconds_until_closed(sock, IDLE_TIMEOUT_S + SLACK_S)
    assert elapsed > IDLE_TIMEOUT_S - 0.5
    with connected(served.metrics) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
        elapsed = _seconds_until_closed(sock, IDLE_TIMEOUT_S + SLACK_S)
    assert elapsed < HEADER_TIMEOUT_S + 1.5


def test_metrics_connections_are_capped(served: Listeners) -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(METRICS_MAX_CONNECTIONS):
            stack.enter_context(connected(served.metrics))
        extra = stack.enter_context(connected(served.metrics))
        extra.settimeout(SLACK_S)
        status, _headers, _body = _read_response(extra)
    assert status == 503
    wait_until(lambda: _metrics_get(served, "/metrics")[0] == 200, 10, "room again")

