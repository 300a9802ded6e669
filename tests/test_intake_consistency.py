"""The same input gets the same answer by every intake (issue 21): one service decides.
While the daemon stops, ZeroMQ, HTTP and Wyoming all answer `shutting_down` (ZeroMQ's wire
code is `busy`, with the job code as its reason); an unknown voice is refused up front."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import zmq
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.tts import Synthesize, SynthesizeVoice

from cosyvoiced import config
from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until


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
