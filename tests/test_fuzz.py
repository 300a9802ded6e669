"""Property tests (Hypothesis) of the code that reads untrusted input: whatever comes in,
the answer is a result or the error its callers expect, never another exception.

- `protocol.parse` on any frames: a `Request`, or a `ProtocolError` whose reply encodes;
- `jobspec.build_job` on any JSON-like fields: a `Job`, or a `JobFailure`;
- `http.parse_speech` on any JSON value: a `SpeechRequest`, or a `JobFailure`;
- a raw HTTP body's bytes through `untrusted.json_value` and `parse_speech`: a request, or
  an error whose HTTP status is 4xx;
- the live daemon's ZeroMQ socket on random frame lists: each gets a reply, nothing fails
  inside, and the socket thread still answers `ping` afterwards;
- the live daemon's `POST /v1/audio/speech` on random bodies (httpx): speech, or a 4xx
  JSON error with its code, never a 5xx; the same daemon is ready afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import zmq
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from cosyvoiced import config, protocol
from cosyvoiced.client import Client
from cosyvoiced.intake.http import SPEECH_FIELDS, SpeechRequest, error_body, parse_speech
from cosyvoiced.job import FILE_FORMATS, Job, JobFailure
from cosyvoiced.jobspec import FIELDS, Limits, build_job
from cosyvoiced.protocol import Op, ProtocolError, Request
from cosyvoiced.untrusted import NotJSON, json_value
from tests.daemon import Daemon, free_port

# No example database: nothing is written into the repository.
FUZZ = settings(deadline=None, database=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WIRE_LIMITS = protocol.Limits(max_header_bytes=64 << 10, max_attachment_bytes=1024)
JOB_LIMITS = Limits(max_text_chars=200, default_format="wav")
# Hypothesis warns when it prints an example of over 30 kB: deep JSON is meant to be big.
BIG_EXAMPLES_OK = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# -- values ---------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.integers(min_value=-(10**30), max_value=10**30) | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
# Values that pass some checks, so the fuzz gets past the first one.
plausible = (st.sampled_from([*FILE_FORMATS, "pcm_s16le", "tone", "en", "zh", "x.wav",
                              "../up", ".hidden", "mp3", "tts-1", "sse", "audio"])
             | st.integers(min_value=-1, max_value=200_000)
             | st.floats(min_value=-1, max_value=10) | st.just(float("nan"))
             | st.text(st.characters(codec="utf-8"), max_size=40)
             | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=4))
field_values = json_values | plausible


deep_json = (st.integers(min_value=1, max_value=40_000).map(lambda depth: b"[" * depth
                                                               + b"]" * depth)
             | st.integers(min_value=1, max_value=20_000).map(
                 lambda depth: b'{"a":' * depth + b"1" + b"}" * depth))
huge_numbers = st.integers(min_value=1, max_value=20_000).map(
    lambda digits: b'{"v": 1, "op": "ping", "id": "x", "n": ' + b"9" * digits + b"}")


def _header(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


envelopes = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 1, 1, 2, "1", None, True, 1.0]),
    "op": st.sampled_from([*Op, "nope", ""]) | json_values,
    "id": st.text(max_size=8) | json_values,
})
op_fields = st.dictionaries(
    st.sampled_from([*FIELDS, "stream", "job", "name", "prompt_text", "extra"]),
    field_values, max_size=5)
headers = (st.builds(lambda envelope, fields: _header(fields | envelope), envelopes, op_fields)
           | st.binary(max_size=80) | deep_json | huge_numbers
           | st.text(max_size=40).map(str.encode)
           | json_values.map(lambda value: json.dumps(value).encode()))
bodies = st.lists(headers | st.binary(max_size=1100), min_size=0, max_size=3)


# -- pure functions ----------------------------------------------------------------------------
@BIG_EXAMPLES_OK
@FUZZ
@given(route=st.sampled_from([(b"peer",), (b"peer", b"")]), body=bodies)
def test_parse_returns_a_request_or_raises_protocol_error(route: tuple[bytes, ...],
                                                          body: list[bytes]) -> None:
    try:
        request = protocol.parse(route, body, WIRE_LIMITS)
    except ProtocolError as error:
        frames = protocol.error_reply(route, error)  # what the socket thread then sends
        assert json.loads(frames[len(route)])["event"] == "error"
        return
    assert isinstance(request, Request)
    assert request.op in Op
    assert isinstance(request.id, str)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from([*FIELDS, "stream", "sink"])
                              | st.text(max_size=6), field_values, max_size=8),
       text=st.none() | st.text(max_size=250))
def test_build_job_returns_a_job_or_raises_job_failure(fields: dict[str, Any],
                                                       text: str | None) -> None:
    if text is not None:
        fields = fields | {"text": text}
    try:
        job = build_job(fields, job_id="j", source="zmq", origin="j", default_output="j",
                        limits=JOB_LIMITS)
    except JobFailure:
        return
    assert isinstance(job, Job)


@FUZZ
@given(body=json_values | st.dictionaries(st.sampled_from([*SPEECH_FIELDS, "other"]),
                                          field_values, max_size=8))
def test_parse_speech_returns_a_request_or_raises_job_failure(body: Any) -> None:
    try:
        parsed = parse_speech(body, {"alloy": "tone"})
    except JobFailure:
        return
    assert isinstance(parsed, SpeechRequest)


# Raw bodies: bytes, JSON of any shape, speech requests with odd values, each perhaps cut
# short or with a byte changed, deep nesting, numbers too long, UTF-8 that is not.
lower_text = st.text(st.characters(codec="utf-8", exclude_categories=("Lu", "Lt")),
                     max_size=30)
speech_bodies = (st.fixed_dictionaries(
    {"input": lower_text},
    optional={name: field_values for name in SPEECH_FIELDS if name != "input"})
                 # and requests that make sense, so that the fuzz reaches the job too
                 | st.fixed_dictionaries(
    {"model": st.just("tts-1"), "voice": st.sampled_from(["tone", "alloy"]),
     "input": lower_text | st.sampled_from(["hello there.", "one. two. three."])},
    optional={"response_format": st.sampled_from(["mp3", "opus", "aac", "flac", "wav", "pcm"]),
              "speed": st.floats(min_value=0.25, max_value=4.0),
              "stream_format": st.sampled_from(["audio", "sse"]),
              "instructions": lower_text}))


def _damaged(body: bytes, cut: int, at: int, byte: int) -> bytes:
    body = body[:cut] if cut < len(body) else body
    return body[:at] + bytes([byte]) + body[at + 1:] if at < len(body) else body


raw_bodies = (st.binary(max_size=300)
              | json_values.map(lambda value: json.dumps(value).encode())
              | speech_bodies.map(lambda body: json.dumps(body).encode())
              | st.builds(_damaged, speech_bodies.map(lambda body: json.dumps(body).encode()),
                          st.integers(0, 200), st.integers(0, 200), st.integers(0, 255))
              | deep_json | huge_numbers
              | st.binary(min_size=1, max_size=8).map(
                  lambda junk: b'{"model": "tts-1", "input": "' + junk + b'"}'))
# The tone engine's fault words (HANG, ABORT, ...) are capitals: never in a live body.
FAULT_WORDS = (b"HANG", b"ABORT", b"LEAK", b"SLOW", b"THREAD", b"KILL", b"FAIL")
live_bodies = raw_bodies.filter(lambda body: not any(word in body for word in FAULT_WORDS))


@BIG_EXAMPLES_OK
@FUZZ
@given(body=raw_bodies)
def test_a_raw_http_body_is_a_request_or_a_4xx_error(body: bytes) -> None:
    refused: JobFailure | None = None
    try:
        parsed = parse_speech(json_value(body), {"alloy": "tone"})
    except NotJSON:
        return  # the intake answers 400 bad_json
    except JobFailure as failure:
        refused = failure
    if refused is None:
        assert isinstance(parsed, SpeechRequest)
        return
    error = refused.error
    assert 400 <= error_body(str(error.code), error.message, error.field)[0] < 500, error


# -- the live daemon ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("fuzz"), engine={"name": "tests.engines.faulty:load"},
                     spool={"max_text_chars": 40},  # short jobs: a second of tone at most
                     zmq={"max_attachment_bytes": 1024, "max_header_bytes": 8192},
                     http={"listen": f"127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


# Texts without capitals: the tone engine's fault words (HANG, ABORT ...) are capitals.
spoken = st.text(st.characters(codec="utf-8", exclude_categories=("Lu", "Lt")), max_size=30)
live_fields = st.dictionaries(
    st.sampled_from([*FIELDS, "stream", "job", "name", "extra"]),
    spoken | plausible.filter(lambda v: not (isinstance(v, str) and v != v.lower())),
    max_size=4)
# Frames stay under 4 x the largest limit (the socket's MAXMSGSIZE): far bigger ones cost
# their sender the connection, with no reply, by design.
live_deep_json = st.integers(min_value=1, max_value=5000).map(
    lambda depth: b'{"a":' * depth + b"1" + b"}" * depth) | st.integers(
    min_value=1, max_value=16_000).map(lambda depth: b"[" * depth + b"]" * depth)
live_headers = (st.builds(lambda envelope, fields: _header(fields | envelope), envelopes,
                          live_fields)
                | st.binary(max_size=80) | live_deep_json | huge_numbers)
live_frames = st.lists(live_headers | st.binary(max_size=1100), min_size=1, max_size=3)
REPLY_TIMEOUT_MS = 10_000


# No shrinking: against a live daemon each try can cost the reply timeout; the failing
# frames are printed as found.
@BIG_EXAMPLES_OK
@settings(deadline=None, database=None, max_examples=200, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frames=live_frames)
def test_the_zmq_socket_answers_random_frames(daemon: Daemon, frames: list[bytes]) -> None:
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(daemon.endpoint)
        dealer.send_multipart(frames)
        assert dealer.poll(REPLY_TIMEOUT_MS), f"no reply to {frames!r:.200}"
        reply = dealer.recv_multipart()
        header = json.loads(reply[1] if reply[0] == b"" else reply[0])
        assert header.get("code") != "internal", header
    finally:
        dealer.close(linger=0)


@pytest.fixture(scope="module")
def http_client(daemon: Daemon) -> Iterator[httpx.Client]:
    address = f"http://{config.load(daemon.config_path).http.listen}"
    with httpx.Client(base_url=address, timeout=30) as client:
        yield client


@BIG_EXAMPLES_OK
@settings(deadline=None, database=None, max_examples=200, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=live_bodies, content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_the_http_speech_endpoint_answers_random_bodies(daemon: Daemon,
                                                        http_client: httpx.Client,
                                                        body: bytes, content_type: str) -> None:
    try:
        reply = http_client.post("/v1/audio/speech", content=body,
                                 headers={"Content-Type": content_type} if content_type else {})
    except httpx.RemoteProtocolError:  # closed by the daemon: clean, if it still answers
        event("closed")
        assert http_client.get("/healthz").status_code == 200
        return
    event(f"HTTP {reply.status_code}")  # --hypothesis-show-statistics counts them
    if reply.status_code == 200:  # a request that makes sense: speech
        assert reply.headers["content-type"].startswith(("audio/", "text/event-stream",
                                                         "application/json"))
        assert reply.content
        return
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300], body[:200])
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert isinstance(error["code"], str)
    assert error["code"]


def test_after_the_fuzz_the_daemon_is_the_same_and_ready(daemon: Daemon,
                                                         http_client: httpx.Client) -> None:
    """Runs after the fuzz above (pytest keeps the file's order)."""
    assert daemon.process is not None
    assert daemon.process.poll() is None, "the daemon that was fuzzed is still running"
    assert daemon.runs == 1
    assert http_client.get("/readyz").json() == {"status": "ready"}


def test_after_the_fuzz_the_socket_thread_still_answers(daemon: Daemon) -> None:
    """Runs after the fuzz above (pytest keeps the file's order)."""
    with Client(daemon.endpoint, timeout_s=10, retries=0) as client:
        assert client.ping()["event"] == "pong"
    failures = [event for name in ("zmq_message_failed", "zmq_request_failed",
                                   "intake_thread_died", "intake_died")
                for event in daemon.log_events(name)]
    assert failures == []
