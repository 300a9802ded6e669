"""The same input gets the same answer by every intake (issue 21): one service decides.
While the daemon stops, ZeroMQ, HTTP and Wyoming all answer `shutting_down` (ZeroMQ's wire
code is `busy`, with the job code as its reason), a client at its own limit too; an unknown
voice is refused up front; a reloaded text limit holds for every intake."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile
import zmq
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeVoice

from cosyvoiced import config
from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, free_port, wait_until

TONE = {"name": "tests.engines.faulty:load"}
REPLY_TIMEOUT_S = 30.0


def _http(daemon: Daemon, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    listen = config.load(daemon.config_path).http.listen
    request = urllib.request.Request(f"http://{listen}/v1/audio/speech",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


async def _wyoming(daemon: Daemon, voice: str | None = None) -> Error:
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    client = AsyncTcpClient(host, int(port))
    await client.connect()
    try:
        named = SynthesizeVoice(name=voice) if voice is not None else None
        await client.write_event(Synthesize(text="Hello.", voice=named).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 30)
            assert event is not None
            if Error.is_type(event.type):
                return Error.from_event(event)
    finally:
        await client.disconnect()


def _zmq(daemon: Daemon, **fields: object) -> dict[str, object]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as raw:
        raw.connect(daemon.endpoint)
        raw.send_json({"v": 1, "op": "synthesize", "id": "r", "text": "Hello."} | fields)
        assert raw.poll(30_000)
        reply: dict[str, object] = json.loads(raw.recv_multipart()[0])
        return reply


def test_every_intake_answers_the_same(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         http={"listen": f"127.0.0.1:{free_port()}"},
                         wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"},
                         worker={"drain_timeout_s": 30.0})
    daemon.start()
    # An unknown voice: refused up front, never queued, by every intake.
    assert _zmq(daemon, voice="nobody")["code"] == "unknown_voice"
    assert _http(daemon, {"model": "tts-1", "voice": "nobody", "input": "Hi."})[1]["code"] \
        == "unknown_voice"
    assert asyncio.run(_wyoming(daemon, "nobody")).code == "unknown_voice"
    assert not daemon.log_events("job_queued")
    # Stopping, with a job still in progress: every intake says shutting_down.
    with Client(daemon.endpoint, timeout_s=30) as client:
        job = client.submit("SLOW@20 Still running while the daemon stops.")
        wait_until(lambda: client.status(job)["state"] == "running", 30, "the job to start")
    daemon.signal(signal.SIGTERM)
    wait_until(lambda: daemon.log_events("stopping"), 30, "the daemon to stop taking jobs")
    reply = _zmq(daemon)
    assert (reply["code"], reply["reason"]) == ("busy", "shutting_down")
    status, error = _http(daemon, {"model": "tts-1", "voice": "tone", "input": "Hi."})
    assert (status, error["code"]) == (503, "shutting_down")
    assert asyncio.run(_wyoming(daemon)).code == "shutting_down"


def _reply_to(raw: zmq.Socket[bytes], request_id: str) -> dict[str, Any]:
    """The next reply to `request_id` on a DEALER (others' replies are passed over)."""
    while True:
        assert raw.poll(int(REPLY_TIMEOUT_S * 1000)), f"no reply to {request_id}"
        reply: dict[str, Any] = json.loads(raw.recv_multipart()[0])
        if reply.get("id") == request_id:
            return reply


def test_a_zeromq_client_at_its_own_limit_hears_that_the_daemon_stops(
        make_daemon: DaemonFactory) -> None:
    # The stop comes before the client's own limit, as for HTTP and Wyoming: a plain `busy`
    # would have it retry a daemon that is going away.
    daemon = make_daemon(engine=TONE, zmq={"max_pending_per_client": 1},
                         worker={"drain_timeout_s": 30.0})
    daemon.start()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as raw:
        raw.connect(daemon.endpoint)
        raw.send_json({"v": 1, "op": "synthesize", "id": "held", "stream": True,
                       "text": "First. SLOW@20 Still running while the daemon stops."})
        assert _reply_to(raw, "held")["event"] == "start"  # in progress: it stays in flight
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: daemon.log_events("stopping"), 30, "the daemon to stop taking jobs")
        raw.send_json({"v": 1, "op": "synthesize", "id": "late", "text": "Hello."})
        reply = _reply_to(raw, "late")
    assert (reply["code"], reply.get("reason")) == ("busy", "shutting_down")


async def _wyoming_speak(daemon: Daemon, text: str) -> list[Event]:
    """A `synthesize`'s events, up to its audio-stop or its error."""
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    client = AsyncTcpClient(host, int(port))
    await client.connect()
    try:
        await client.write_event(Synthesize(text=text).event())
        events: list[Event] = []
        while not events or not (AudioStop.is_type(events[-1].type) or
                                 Error.is_type(events[-1].type)):
            event = await asyncio.wait_for(client.read_event(), REPLY_TIMEOUT_S)
            assert event is not None, "the server closed the connection"
            events.append(event)
        return events
    finally:
        await client.disconnect()


def _wyoming_wav(events: list[Event], path: Path) -> Path:
    start = AudioStart.from_event(next(e for e in events if AudioStart.is_type(e.type)))
    chunks = b"".join(AudioChunk.from_event(e).audio for e in events
                      if AudioChunk.is_type(e.type))
    soundfile.write(path, np.frombuffer(chunks, dtype="<i2"), start.rate, subtype="PCM_16")
    return path


def test_a_reloaded_text_limit_holds_for_http_and_wyoming(make_daemon: DaemonFactory,
                                                          tmp_path: Path) -> None:
    # test_hostile_zmq.py checks ZeroMQ and the drop folder after the same reload.
    listeners = {"http": {"listen": f"127.0.0.1:{free_port()}"},
                 "wyoming": {"listen": f"tcp://127.0.0.1:{free_port()}"}}
    daemon = make_daemon(engine=TONE, spool={"max_text_chars": 100}, **listeners)
    daemon.start()
    text = "a" * 79 + "."
    listen = config.load(daemon.config_path).http.listen
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="any", max_retries=0,
                       timeout=REPLY_TIMEOUT_S) as client:

        def speak() -> bytes:
            return client.audio.speech.create(model="tts-1", voice="tone", input=text,
                                              response_format="wav").content

        (tmp_path / "http.wav").write_bytes(speak())
        assert_speech(tmp_path / "http.wav", 22050, text)
        assert_speech(_wyoming_wav(asyncio.run(_wyoming_speak(daemon, text)),
                                   tmp_path / "wyoming.wav"), 22050, text)
        daemon.configure(engine=TONE, spool={"max_text_chars": 50}, **listeners)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: daemon.log_events("reloaded"), 30, "the reload")
        with pytest.raises(openai.BadRequestError) as refused:
            speak()
    assert (refused.value.code, refused.value.param) == ("text_too_long", "input")
    assert "over the limit of 50" in refused.value.message
    last = asyncio.run(_wyoming_speak(daemon, text))[-1]
    assert Error.is_type(last.type), f"spoken, not refused: {last.type}"
    error = Error.from_event(last)
    assert (error.code, error.text) == ("text_too_long",
                                        "text: 80 characters is over the limit of 50")
