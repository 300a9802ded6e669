"""The OpenAI-compatible HTTP endpoint, with the official `openai` client, on the real daemon."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile

from cosyvoiced import config
from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, free_port, wait_until

SENTENCE = "The morning train arrived a little later than the timetable promised."
# Long enough that a job is still running after its first audio (16 sentences, a minute of
# speech; 40 took 35-47 s of the suite per test on 2 shared cores).
LONG_TEXT = " ".join(f"This is sentence number {n} of a long answer, spoken as it is made."
                     for n in range(1, 17))
MAX_TEXT_CHARS = 4000
KEY = "sk-test-0123456789abcdef"
JOE = "en_US-joe-medium"
RATES = {"mp3": 22050, "opus": 24000, "aac": 22050, "flac": 22050, "wav": 22050, "pcm": 24000}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("http")
    keys = root / "api_keys"
    keys.write_text(f"# clients of the test\n{KEY}\n\nsk-another-key\n")
    running = Daemon(root, spool={"max_text_chars": MAX_TEXT_CHARS},
                     http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys),
                           "max_body_bytes": "16KiB", "max_pending_per_client": 2},
                     http__voices={"alloy": JOE, "echo": "nobody-we-know"})
    running.start()
    yield running
    running.stop()


def base_url(daemon: Daemon) -> str:
    return f"http://{_listen(daemon)}/v1"


def _listen(daemon: Daemon) -> str:
    return config.load(daemon.config_path).http.listen


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    # No retries: a 429 or 503 is what some tests want to see.
    with openai.OpenAI(base_url=base_url(daemon), api_key=KEY, max_retries=0,
                       timeout=60) as connected:
        yield connected


def _wav_from_pcm(data: bytes, rate: int, path: Path) -> Path:
    soundfile.write(path, np.frombuffer(data, dtype="<i2"), rate, subtype="PCM_16")
    return path


def _request(daemon: Daemon, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None,
             method: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of a raw request."""
    request = urllib.request.Request(f"http://{_listen(daemon)}{path}", data=body,
                                     headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _authorized(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
            **(extra or {})}


def _status(daemon: Daemon, job_id: str) -> str:
    # An HTTP client's job: only an admin (the local admin token) may look at it over ZeroMQ.
    with Client(daemon.endpoint, timeout_s=10, admin_token=daemon.admin_token()) as zmq_client:
        return str(zmq_client.status(job_id)["state"])


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_each_format_is_speech_with_its_content_type(client: openai.OpenAI, tmp_path: Path,
                                                      fmt: str) -> None:
    reply = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE,
                                       response_format=fmt)  # type: ignore[arg-type]
    expected = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}[fmt]
    assert reply.response.headers["content-type"] == expected
    assert reply.response.headers["transfer-encoding"] == "chunked"
    path = tmp_path / f"speech.{fmt}"
    if fmt == "pcm":  # OpenAI's pcm: raw 16-bit little-endian mono at 24 kHz, no header
        _wav_from_pcm(reply.content, 24000, path := tmp_path / "speech.wav")
    else:
        path.write_bytes(reply.content)
    assert_speech(path, RATES[fmt], SENTENCE)


def test_default_format_is_mp3_and_our_own_voice_names_work(client: openai.OpenAI,
                                                            tmp_path: Path) -> None:
    reply = client.audio.speech.create(model="gpt-4o-mini-tts", voice=JOE, input=SENTENCE,
                                       speed=2.0)
    assert reply.response.headers["content-type"] == "audio/mpeg"
    (tmp_path / "fast.mp3").write_bytes(reply.content)
    assert_speech(tmp_path / "fast.mp3", 22050, SENTENCE, speed=2.0)


def test_streaming_sends_the_first_bytes_while_the_job_runs(daemon: Daemon,
                                                            client: openai.OpenAI,
                                                            tmp_path: Path) -> None:
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm") as reply:
        job_id = reply.headers["x-cosyvoiced-job"]
        chunks = reply.iter_bytes()
        first = next(chunk for chunk in chunks if chunk)
        first_at = time.monotonic() - started
        state_at_first_bytes = _status(daemon, job_id)
        data = first + b"".join(chunks)
    total = time.monotonic() - started
    assert state_at_first_bytes == "running", "the first bytes came only once the job ended"
    assert first_at < total / 3, f"first bytes after {first_at:.2f} s of {total:.2f} s"
    assert_speech(_wav_from_pcm(data, 24000, tmp_path / "long.wav"), 24000, LONG_TEXT)
    assert _status(daemon, job_id) == "done"


def test_a_client_that_hangs_up_mid_stream_cancels_its_job(daemon: Daemon,
                                                           client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=LONG_TEXT, response_format="wav") as reply:
        job_id = reply.headers["x-cosyvoiced-job"]
        next(chunk for chunk in reply.iter_bytes() if chunk)
    wait_until(lambda: _status(daemon, job_id) == "cancelled", 30, "the job to be cancelled")


def test_sse_stream_carries_base64_audio_then_done(client: openai.OpenAI,
                                                   tmp_path: Path) -> None:
    reply = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=SENTENCE,
                                       response_format="pcm", stream_format="sse")
    assert reply.response.headers["content-type"] == "text/event-stream"
    events = [json.loads(line.removeprefix("data: "))
              for line in reply.content.decode().splitlines() if line]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert_speech(_wav_from_pcm(pcm, 24000, tmp_path / "sse.wav"), 24000, SENTENCE)


def test_a_wrong_or_missing_key_is_refused(daemon: Daemon) -> None:
    with openai.OpenAI(base_url=base_url(daemon), api_key="sk-wrong", max_retries=0) as wrong, \
            pytest.raises(openai.AuthenticationError) as caught:
        wrong.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE)
    assert caught.value.code == "invalid_api_key"
    status, body, headers = _request(daemon, "/v1/audio/speech", json.dumps(
        {"model": "tts-1", "voice": "alloy", "input": SENTENCE}).encode())
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert _request(daemon, "/v1/models")[0] == 401
    # Probes for load balancers need no key and tell nothing.
    assert _request(daemon, "/healthz")[:2] == (200, {"status": "ok"})
    assert _request(daemon, "/readyz")[:2] == (200, {"status": "ready"})


def test_errors_carry_the_drop_folders_codes_and_messages(daemon: Daemon,
                                                          client: openai.OpenAI) -> None:
    too_long = "word " * (MAX_TEXT_CHARS // 5 + 1)
    daemon.drop_job("nobody", text=SENTENCE, voice="nobody-we-know")
    daemon.drop_job("long", text=too_long)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.audio.speech.create(model="tts-1", voice="echo", input=SENTENCE)  # -> nobody
    with pytest.raises(openai.BadRequestError) as long:
        client.audio.speech.create(model="tts-1", voice="alloy", input=too_long)
    dropped_unknown = daemon.wait_failed("nobody.json")
    dropped_long = daemon.wait_failed("long.json")
    assert (unknown.value.code, unknown.value.param) == ("unknown_voice", "voice")
    assert unknown.value.body["message"] == dropped_unknown["message"]  # type: ignore[index]
    assert (long.value.code, long.value.param) == ("text_too_long", "input")
    # The same words, with the field named as the request names it.
    assert long.value.body["message"] == dropped_long["message"].replace(  # type: ignore[index]
        "text:", "input:", 1)
    assert unknown.value.type == "invalid_request_error"


@pytest.mark.parametrize(("body", "code", "param"), [
    (b"{not json", "bad_json", None),
    (b"[1, 2]", "bad_json", None),
    (b"\xff\xfe", "bad_json", None),
    (b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "volume": 3}', "unknown_field",
     "volume"),
    (b'{"voice": "alloy", "input": "Hi."}', "missing_field", "model"),
    (b'{"model": "tts-1", "input": "Hi."}', "missing_field", "voice"),
    (b'{"model": "tts-1", "voice": "alloy"}', "missing_field", "input"),
    (b'{"model": "tts-1", "voice": "alloy", "input": "   "}', "empty_text", "input"),
    (b'{"model": "tts-1", "voice": "alloy", "input": 7}', "invalid_field", "input"),
    (b'{"model": "tts-1", "voice": ["x"], "input": "Hi."}', "invalid_field", "voice"),
    (b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "speed": 9}', "invalid_field",
     "speed"),
    (b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "ogg"}',
     "unsupported_format", "response_format"),
    (b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "stream_format": "ws"}',
     "invalid_field", "stream_format"),
    # Piper takes no instructions: refused by the worker, after the job was queued.
    (b'{"model": "tts-1", "voice": "alloy", "input": "Hi.", "instructions": "Whisper."}',
     "not_supported", "instructions"),
])
def test_bad_requests_get_400_naming_the_field(daemon: Daemon, body: bytes, code: str,
                                               param: str | None) -> None:
    status, reply, _headers = _request(daemon, "/v1/audio/speech", body, _authorized())
    assert status == 400, reply
    error = reply["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param,
                                                              "invalid_request_error")
    assert param is None or error["message"].startswith(f"{param}:")


def test_size_limit_routes_and_methods(daemon: Daemon) -> None:
    huge = json.dumps({"model": "tts-1", "voice": "alloy", "input": "x" * 20000}).encode()
    status, body, _headers = _request(daemon, "/v1/audio/speech", huge, _authorized())
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    status, body, _headers = _request(daemon, "/v1/audio/speak", b"{}", _authorized())
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, _headers = _request(daemon, "/v1/audio/speech", headers=_authorized())
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")


def test_models_and_voices(daemon: Daemon, client: openai.OpenAI) -> None:
    assert "tts-1" in [model.id for model in client.models.list()]
    status, body, _headers = _request(daemon, "/v1/audio/voices", headers=_authorized())
    assert status == 200
    assert [voice["id"] for voice in body["voices"]] == [JOE]
    assert body["voices"][0]["language"] == "en-us"
    assert body["aliases"] == {"alloy": JOE, "echo": "nobody-we-know"}


def _queued_http_jobs(daemon: Daemon) -> list[str]:
    return [e["job"] for e in daemon.log_events("job_queued") if e["source"] == "http"]


def test_requests_over_the_clients_limit_get_429(daemon: Daemon, client: openai.OpenAI) -> None:
    # max_pending_per_client = 2. Two long requests whose replies nobody reads (a queued
    # job's reply begins only with its audio), then a third: refused.
    before = len(_queued_http_jobs(daemon))
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": LONG_TEXT})
    held = [http.client.HTTPConnection(_listen(daemon), timeout=30) for _ in range(2)]
    for connection in held:
        connection.request("POST", "/v1/audio/speech", body, _authorized())
    jobs = wait_until(lambda: (queued := _queued_http_jobs(daemon)[before:]) and
                      len(queued) == 2 and queued, 30, "both requests to be queued")
    with pytest.raises(openai.RateLimitError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE)
    assert caught.value.code == "busy"
    assert caught.value.body["message"].startswith(  # type: ignore[index]
        "2 requests of this client are in flight")
    for connection in held:
        connection.close()
    wait_until(lambda: all(_status(daemon, job) == "cancelled" for job in jobs), 30,
               "the abandoned requests to be cancelled")


def test_a_network_address_without_keys_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[http]\nlisten = "0.0.0.0:8000"\n')
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert "http.listen: '0.0.0.0:8000' is reachable from the network but " \
        "http.api_keys_file is not set" in run.stderr


def test_a_taken_port_stops_the_start_with_exit_1(make_daemon: DaemonFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(http={"listen": f"127.0.0.1:{port}"})
        daemon.start(wait_ready=False)
        assert daemon.wait_exit(60) == 1
    (failed,) = daemon.log_events("listen_failed")
    assert f"http.listen 127.0.0.1:{port}" in failed["error"]
