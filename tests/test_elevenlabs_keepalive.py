"""An ElevenLabs socket is read after its input's end, as its last audio is made: with the
`websockets` library (under the ElevenLabs SDK and the agents' plugins), which drops a socket
whose pings go unanswered, on the tone engine (tests/engines/faulty.py: SLOW@ makes a
sentence take its time)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
import structlog
from websockets.asyncio.client import ClientConnection, connect

from cosyvoiced import config
from cosyvoiced.intake import elevenlabs
from tests.daemon import Daemon, wait_until
from tests.test_elevenlabs_ws import KEY, tone_daemon_fixture  # noqa: F401

PING_S = 0.5  # the client's ping interval, and its timeout: the SDK's 20 s, scaled down
SLOW_S = 3.0  # the last sentence takes this long to make: over PING_S * 2
RATE = 16000
TIMEOUT_S = 30.0


def _url(daemon: Daemon, path: str) -> str:
    listen = config.load(daemon.config_path).http.listen
    return f"ws://{listen}/v1/text-to-speech/tone/{path}?output_format=pcm_{RATE}"


def _pinging(daemon: Daemon, path: str, close_timeout: float = 1.0) -> connect:
    return connect(_url(daemon, path), additional_headers={"xi-api-key": KEY}, proxy=None,
                   ping_interval=PING_S, ping_timeout=PING_S, close_timeout=close_timeout)


def _http_jobs(daemon: Daemon) -> list[str]:
    return [e["job"] for e in daemon.log_events("job_queued") if e["source"] == "http"]


async def _heard(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every reply until the daemon closes the socket (raises if the client dropped it)."""
    async with asyncio.timeout(TIMEOUT_S):
        return [json.loads(reply) async for reply in ws]


@pytest.mark.parametrize(("path", "end"), [("stream-input", {"text": ""}),
                                           ("multi-stream-input", {"close_socket": True})])
def test_pings_are_answered_while_the_last_audio_is_made(tone_daemon: Daemon, path: str,
                                                         end: dict[str, Any]) -> None:
    """The socket went unread from the input's end: a client whose library pings (the
    SDK's, every 20 s) dropped it, and its last audio, when that took over its ping timeout
    to make (0 audio, close 1006 at 3.0 s with aiohttp's heartbeat=2 and a 6 s sentence).
    Text sent after the end is not spoken, and is logged once."""
    daemon = tone_daemon
    sentence = f"The kettle takes SLOW@{SLOW_S:g} its time."
    late = {"text": "Words sent too late.", "context_id": "late"}

    async def speak() -> tuple[list[dict[str, Any]], float]:
        async with _pinging(daemon, path) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "a"}))
            await ws.send(json.dumps({"text": sentence, "context_id": "a", "flush": True}))
            await ws.send(json.dumps(end))
            ended_at = time.monotonic()
            for _ in range(2):
                await ws.send(json.dumps(late))
            replies = await _heard(ws)
            return replies, time.monotonic() - ended_at

    before, logged = len(_http_jobs(daemon)), len(daemon.log_events("elevenlabs_text_after_end"))
    replies, waited_s = asyncio.run(speak())
    assert waited_s > SLOW_S  # the client waited through pings for the audio
    assert replies[-1].get("isFinal") is True, replies[-1]
    audio = b"".join(base64.b64decode(r["audio"]) for r in replies if r.get("audio"))
    assert len(audio) // 2 >= int(len("The kettle takes its time.") * 0.05 * RATE)
    assert len(_http_jobs(daemon)) - before == 1  # the late text made no job
    after_end = daemon.log_events("elevenlabs_text_after_end")[logged:]
    assert [e["chars"] for e in after_end] == [len(json.dumps(late))]


def test_a_flood_after_the_end_is_read_at_a_pace(tone_daemon: Daemon) -> None:
    """Read after its end, a socket could send as fast as it liked: what it sends then is
    read at the pace of text that says nothing, and its audio still comes."""
    daemon = tone_daemon
    flood = json.dumps({"text": "word " * 12_000})

    async def flooding() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(_url(daemon, "stream-input"),
                                          headers={"xi-api-key": KEY})
            await ws.send_json({"text": " "})
            await ws.send_json({"text": "The kettle SLOW@1 is on."})
            await ws.send_json({"text": ""})
            for _ in range(3):
                await ws.send_str(flood)
            async with asyncio.timeout(TIMEOUT_S):
                return [json.loads(frame.data) async for frame in ws]

    paced = len(daemon.log_events("unsaid_text_paced"))
    replies = asyncio.run(flooding())
    assert replies[-1] == {"isFinal": True}
    assert any(r.get("audio") for r in replies)
    (event,) = daemon.log_events("unsaid_text_paced")[paced:]
    assert event["source"] == "elevenlabs"


def test_a_hang_up_after_the_end_cancels_the_jobs_left(tone_daemon: Daemon) -> None:
    """Unread after its end, a socket's close frame went unseen (a lost connection cancels
    the handler, http.py): the sentence being made was made whole, and the next one, for a
    client that had left, whose close waited for them. (Last here: the worker goes on with
    the sentence let go.)"""
    daemon = tone_daemon
    text = f"The first one takes long SLOW@{SLOW_S:g} to make. The second is quick."

    async def hang_up() -> tuple[list[str], float, ClientConnection]:
        before = len(_http_jobs(daemon))
        async with _pinging(daemon, "stream-input", close_timeout=TIMEOUT_S) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": text}))
            await ws.send(json.dumps({"text": ""}))
            jobs = await asyncio.to_thread(wait_until, lambda: _http_jobs(daemon)[before:],
                                           TIMEOUT_S, "the socket's jobs")
            closing_at = time.monotonic()
            await ws.close()  # a close frame, as the SDK's and the plugins' aclose() send
        return jobs, closing_at, ws

    jobs, closing_at, ws = asyncio.run(hang_up())
    assert len(jobs) == 2  # both sentences in flight
    wait_until(lambda: {e["job"] for e in daemon.log_events("client_gone")} >= set(jobs),
               TIMEOUT_S, "the jobs to be let go")
    assert time.monotonic() - closing_at < SLOW_S / 2, "let go once the slow one was made"
    assert ws.protocol.close_rcvd is not None  # the daemon answered the close
    # Its outcome is recorded by the tick that acts on the hang-up, a moment after.
    ended = wait_until(lambda: jobs[1] in (outcomes := {
        e["job"]: e["outcome"] for e in daemon.log_events("job")}) and outcomes,
        TIMEOUT_S, "the second job's outcome")
    assert ended[jobs[1]] == "cancelled"  # the first ends so once the worker is done


class _Unreadable:
    """A socket whose reading fails. No client's frame does that (aiohttp returns what it
    finds wrong as an ERROR frame): a fault of ours or aiohttp's is what this stands for."""

    closed = False

    async def receive(self) -> Any:
        raise RuntimeError("a fault in reading")

    async def close(self, **_how: Any) -> bool:
        self.closed = True
        return True


@pytest.mark.parametrize("speaking", [True, False], ids=["while-speaking", "once-spoken"])
def test_a_fault_in_reading_after_the_end_is_logged_and_ends_the_socket(
        speaking: bool) -> None:
    """The reading after the end suppressed only ConnectionError: any other error escaped
    run() to aiohttp's log of handler errors while the streams still spoke, and once they
    had ended, it was never seen (cancel() on a task that ended silences it). It is logged
    now, and ends the socket as a hang-up does: the jobs left are cancelled (run() takes
    SocketClosed so)."""
    async def finish() -> tuple[list[MutableMapping[str, Any]], _Unreadable]:
        ws = _Unreadable()
        request = cast(Any, SimpleNamespace(protocol=None, remote="127.0.0.1"))
        socket = elevenlabs._Socket(cast(Any, None), cast(Any, None), cast(Any, ws), request,
                                    fmt=elevenlabs.output_format(f"pcm_{RATE}"),
                                    voice="tone", multi=False, auto_mode=False)
        stream = elevenlabs._Stream(elevenlabs.DEFAULT_CONTEXT)
        stream.task = asyncio.create_task(asyncio.sleep(TIMEOUT_S if speaking else 0))
        await asyncio.sleep(0)  # the quick one ends
        socket._streams[stream.context] = stream
        with structlog.testing.capture_logs() as logged:
            if speaking:
                with pytest.raises(elevenlabs.SocketClosed):
                    await socket._finish_streams()
                assert not stream.task.done()  # left for run() to cancel
                stream.task.cancel()
            else:
                await socket._finish_streams()
        return logged, ws

    logged, ws = asyncio.run(finish())
    assert [e["event"] for e in logged] == ["elevenlabs_read_after_end_failed"]
    assert logged[0]["exc_info"] is True
    assert ws.closed is not speaking  # its last audio sent: closed as after any end
