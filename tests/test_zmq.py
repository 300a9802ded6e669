"""The ZeroMQ interface, over a real socket to the real daemon."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import zmq

from cosyvoiced.client import Client, DaemonError
from tests.daemon import Daemon, assert_speech, wait_until

SENTENCE = "Streaming speech arrives in pieces, one sentence at a time, as it is made."
PARAGRAPH = " ".join(f"This is sentence number {n} of a longer paragraph." for n in range(1, 9))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Deterministic Piper (no noise), so two syntheses of one text are the same audio."""
    root = tmp_path_factory.mktemp("zmq")
    running = Daemon(root, spool={"max_text_chars": 2000},
                     engine__piper={"noise_scale": 0.0, "noise_w_scale": 0.0},
                     zmq={"max_attachment_bytes": 4096, "max_header_bytes": 8192})
    running.start()
    yield running
    running.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.endpoint, timeout_s=30) as connected:
        yield connected


def _pcm(data: bytes) -> np.ndarray[Any, np.dtype[np.int16]]:
    return np.frombuffer(data, dtype="<i2")


def test_ping_and_voices(client: Client) -> None:
    pong = client.ping()
    assert pong["event"] == "pong"
    assert pong["ready"] is True
    assert pong["engine"] == "piper"
    assert pong["version"]
    assert client.voices() == [{"name": "en_US-joe-medium", "language": "en-us",
                                "sample_rate": 22050, "engine": "piper", "kind": "builtin"}]


def test_synthesize_returns_a_whole_file(client: Client, tmp_path: Path) -> None:
    result = client.synthesize(SENTENCE, format="flac", sample_rate=16000)
    assert result.header["event"] == "result"
    assert result.header["format"] == "flac"
    assert result.sample_rate == 16000
    path = tmp_path / "out.flac"
    path.write_bytes(result.audio)
    duration = assert_speech(path, 16000, SENTENCE)
    assert abs(result.header["audio_s"] - duration) < 0.01
    assert result.header["synth_s"] > 0


def test_stream_concatenates_to_the_non_streamed_audio(client: Client) -> None:
    whole = client.synthesize(PARAGRAPH, format="pcm_s16le")
    with client.stream(PARAGRAPH) as stream:
        chunks = list(stream)
    assert stream.start["sample_rate"] == 22050
    assert stream.start["format"] == "pcm_s16le"
    assert stream.start["channels"] == 1
    assert len(chunks) >= 3, "one chunk per sentence or so"
    assert stream.end is not None
    assert 0 < stream.end["first_chunk_s"] < stream.end["synth_s"]
    assert np.array_equal(_pcm(b"".join(chunks)), _pcm(whole.audio))
    # The WAV reply holds the very same samples.
    wav = client.synthesize(PARAGRAPH, format="wav")
    samples, rate = soundfile.read(io.BytesIO(wav.audio), dtype="int16")
    assert rate == 22050
    assert np.array_equal(samples, _pcm(whole.audio))
    assert abs(stream.end["audio_s"] - len(samples) / 22050) < 0.001


def test_submit_lands_in_the_outbox_and_reports_status(client: Client, daemon: Daemon) -> None:
    job = client.submit(SENTENCE, format="ogg", output="submitted")
    status = wait_until(lambda: (s := client.status(job))["state"] == "done" and s, 60,
                        "the submitted job to finish")
    assert status["source"] == "zmq"
    record = json.loads((daemon.outbox / "submitted.json").read_text())
    assert record["job"] == job
    assert_speech(daemon.outbox / "submitted.ogg", 22050, SENTENCE)


def test_status_of_queued_and_failed_jobs(client: Client, daemon: Daemon) -> None:
    first = client.submit(PARAGRAPH, output="queue-first")
    second = client.submit(SENTENCE, output="queue-second")
    states = {client.status(second)["state"]}
    bad = client.submit("Unknown voice.", voice="nobody")
    failed = wait_until(lambda: (s := client.status(bad))["state"] == "failed" and s, 60,
                        "the bad job to fail")
    assert failed["error"]["code"] == "unknown_voice"
    assert (daemon.failed / f"{bad}.json.error.json").exists()
    states.add(client.status(second)["state"])
    assert states & {"queued", "running", "done"}
    wait_until(lambda: client.status(first)["state"] == "done", 60, "the first job")


def test_cancel_a_queued_and_a_running_job(client: Client, daemon: Daemon) -> None:
    long_text = " ".join([PARAGRAPH] * 4)
    running = client.submit(long_text, output="cancel-running")
    queued = client.submit(long_text, output="cancel-queued")
    wait_until(lambda: client.status(running)["state"] == "running", 30, "the job to start")
    assert client.status(queued)["state"] == "queued"
    assert client.cancel(queued)["event"] == "cancelled"
    assert client.cancel(running)["event"] == "cancelled"
    wait_until(lambda: client.status(running)["state"] == "cancelled", 30, "the cancel")
    assert client.status(queued)["state"] == "cancelled"
    for name in ("cancel-running", "cancel-queued"):
        assert not (daemon.outbox / f"{name}.json").exists()
    error = json.loads((daemon.failed / f"{running}.json.error.json").read_text())
    assert error["code"] == "cancelled"
    with pytest.raises(DaemonError) as caught:
        client.cancel(running)
    assert caught.value.code == "not_found"
    # The worker stays healthy: the same generation serves the next job.
    assert client.stats()["workers"][0]["generation"] == 1
    client.synthesize(SENTENCE)


def test_stats(client: Client) -> None:
    stats = client.stats()
    assert stats["event"] == "stats"
    assert stats["ready"] is True
    assert {"done", "failed", "cancelled"} <= set(stats["jobs"])
    (worker,) = stats["workers"]
    assert worker["state"] in ("idle", "busy")
    assert worker["rss_bytes"] > 10 << 20
    assert worker["device"] == "cpu"
    assert stats["queue_depth"] >= 0
    assert stats["uptime_s"] > 0


def test_errors_name_the_field(client: Client) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"text": "x" * 2001}, "too_long", "text"),
        ({"text": "Hi.", "voice": "nobody"}, "unknown_voice", "voice"),
        ({"text": "Hi.", "format": "mp3"}, "unsupported", "format"),
        ({"text": "Hi.", "speed": "fast"}, "bad_request", "speed"),
        ({"text": "Hi.", "output": "x"}, "bad_request", "output"),
        ({"voice": "en_US-joe-medium"}, "bad_request", "text"),
        ({"text": "Hi.", "stream": "yes"}, "bad_request", "stream"),
    ]
    for fields, code, field in cases:
        with pytest.raises(DaemonError) as caught:
            client.request("synthesize", **fields)
        assert (caught.value.code, caught.value.field) == (code, field), fields
        assert caught.value.message.startswith(f"{field}:")


def test_req_socket_gets_single_replies_but_no_stream(daemon: Daemon) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.REQ) as req:
        req.connect(daemon.endpoint)
        req.send_json({"v": 1, "op": "ping", "id": "r1"})
        assert req.poll(30_000)
        assert req.recv_json() == {"id": "r1", "event": "pong", "version": "0.1.0",
                                   "engine": "piper", "ready": True}
        req.send_json({"v": 1, "op": "synthesize", "id": "r2", "text": "Hi.", "stream": True})
        assert req.poll(30_000)
        reply = req.recv_json()
        assert isinstance(reply, dict)
        assert (reply["event"], reply["code"]) == ("error", "unsupported")
        req.send_json({"v": 1, "op": "synthesize", "id": "r3", "text": "Hi.",
                       "format": "pcm_s16le"})
        assert req.poll(30_000)
        frames = req.recv_multipart()
        assert json.loads(frames[0])["event"] == "result"
        assert len(frames[1]) > 4000


def _malformed() -> list[tuple[list[bytes], str]]:
    """(frames, expected code): 100 broken requests of many kinds."""
    def header(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    kinds: list[tuple[list[bytes], str]] = [
        ([b"not json"], "bad_request"),
        ([b"\xff\xfe\x00"], "bad_request"),
        ([b"[1, 2, 3]"], "bad_request"),
        ([b'"a string"'], "bad_request"),
        ([header(v=1, op="ping")], "bad_request"),  # no id
        ([header(v=1, op="ping", id=7)], "bad_request"),
        ([header(op="ping", id="x")], "bad_request"),  # no version
        ([header(v=2, op="ping", id="x")], "bad_request"),
        ([header(v=1, id="x")], "bad_request"),  # no op
        ([header(v=1, op=5, id="x")], "bad_request"),
        ([header(v=1, op="sing", id="x")], "unknown_op"),
        ([header(v=1, op="synthesize", id="x")], "bad_request"),
        ([header(v=1, op="synthesize", id="x", text=42)], "bad_request"),
        ([header(v=1, op="synthesize", id="x", text="Hi.", sample_rate="fast")], "bad_request"),
        ([header(v=1, op="synthesize", id="x", text="Hi.", colour="red")], "bad_request"),
        ([header(v=1, op="status", id="x")], "bad_request"),
        ([header(v=1, op="status", id="x", job=3)], "bad_request"),
        ([header(v=1, op="status", id="x", job="nope")], "not_found"),
        ([header(v=1, op="cancel", id="x", job="nope")], "not_found"),
        ([header(v=1, op="ping", id="x"), b"extra frame"], "bad_request"),
        ([header(v=1, op="ping", id="x"), b"a" * 5000], "too_long"),  # huge attachment
        ([b"{" + b" " * 9000 + b"}"], "bad_request"),  # huge header
        ([b""], "bad_request"),
    ]
    return [kinds[n % len(kinds)] for n in range(100)]


def test_malformed_messages_each_get_an_error_and_the_daemon_still_serves(
        daemon: Daemon, client: Client) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as raw:
        raw.connect(daemon.endpoint)
        for frames, code in _malformed():
            raw.send_multipart(frames)
            assert raw.poll(30_000), f"no reply to {frames[0][:60]!r}"
            # A lone empty frame reads as a REQ envelope: the reply keeps that delimiter.
            reply = json.loads(next(frame for frame in raw.recv_multipart() if frame))
            assert reply["event"] == "error", (frames[0][:60], reply)
            assert reply["code"] == code, (frames[0][:60], reply)
            assert reply["message"]
    assert client.ping()["ready"] is True
    client.synthesize(SENTENCE)


def test_sixteen_concurrent_clients_all_complete(daemon: Daemon) -> None:
    results: dict[int, tuple[int, float]] = {}
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            with Client(daemon.endpoint, timeout_s=120) as own:
                if n % 2:
                    with own.stream(f"Client number {n} is speaking now.") as stream:
                        total = sum(len(chunk) for chunk in stream)
                    assert stream.end is not None
                    results[n] = (total // 2, stream.end["audio_s"])
                else:
                    result = own.synthesize(f"Client number {n} is speaking now.",
                                            format="pcm_s16le")
                    results[n] = (len(result.audio) // 2, result.header["audio_s"])
        except Exception as error:  # noqa: BLE001 - collected for the main thread
            errors.append(error)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    for samples, audio_s in results.values():
        assert abs(samples / 22050 - audio_s) < 0.001
        assert 1.0 < audio_s < 6.0


def test_client_that_disconnects_mid_stream_leaves_no_running_job(
        daemon: Daemon, client: Client) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.connect(daemon.endpoint)
    raw.send_json({"v": 1, "op": "synthesize", "id": "gone", "stream": True,
                   "text": " ".join([PARAGRAPH] * 4)})
    assert raw.poll(30_000)
    start = json.loads(raw.recv_multipart()[0])
    assert start["event"] == "start"
    assert raw.poll(30_000)  # the first chunk
    raw.close(linger=0)
    job = start["job"]
    # Another client's job: the operator (cosyvoicectl's admin token) may look at it.
    with Client(daemon.endpoint, timeout_s=30, admin_token=daemon.admin_token()) as operator:
        wait_until(lambda: operator.status(job)["state"] == "cancelled", 30,
                   "the orphaned job's end")
        assert job not in operator.stats()["running"]
    client.synthesize(SENTENCE)  # and the worker still serves
