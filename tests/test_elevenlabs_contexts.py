"""What one ElevenLabs context costs its client and the other contexts: jobs that made no
audio, rate limits, a context closed to barge in. With the `websockets` library (under the
ElevenLabs SDK and the agents' plugins) on the tone engine (tests/engines/faulty.py: 50 ms
of tone a character, SLOW@ makes a sentence take its time)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from cosyvoiced import config
from cosyvoiced.intake import elevenlabs
from tests.daemon import Daemon, free_port

KEY = "sk-contexts-0123456789"
METERED = "sk-metered-0123456789"  # the key `metered`: CHARS_PER_MINUTE
CHARS_PER_MINUTE = 40
PACED = "sk-paced-0123456789"  # the key `paced`: REQUESTS_PER_MINUTE
REQUESTS_PER_MINUTE = 3
MAX_PENDING = 8  # http.max_pending_per_client: a few jobs held in flight show at once
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("elevenlabs-contexts")
    keys = root / "api_keys"
    keys.write_text(f"plain {KEY}\nmetered {METERED}\npaced {PACED}\n")
    running = Daemon(root / "d", engine={"name": "tests.engines.faulty:load"},
                     http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys),
                           "max_pending_per_client": MAX_PENDING},
                     http__keys__metered={"chars_per_minute": CHARS_PER_MINUTE},
                     http__keys__paced={"rate_limit": REQUESTS_PER_MINUTE})
    running.start()
    yield running
    running.stop()


def _listen(daemon: Daemon) -> str:
    return config.load(daemon.config_path).http.listen


def _connect(daemon: Daemon, path: str, query: str, key: str = KEY) -> connect:
    return connect(f"ws://{_listen(daemon)}/v1/text-to-speech/tone/{path}?{query}",
                   additional_headers={"xi-api-key": key}, proxy=None)


async def _send(ws: ClientConnection, *messages: dict[str, Any]) -> None:
    for message in messages:
        await ws.send(json.dumps(message))


async def _heard(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every reply until the daemon closes the socket."""
    async with asyncio.timeout(TIMEOUT_S):
        return [json.loads(reply) async for reply in ws]


def _audio(replies: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(r["audio"]) for r in replies if r.get("audio"))


async def _http_speech(daemon: Daemon, key: str = KEY) -> int:
    async with aiohttp.ClientSession() as session:
        reply = await session.post(f"http://{_listen(daemon)}/v1/audio/speech",
                                   headers={"Authorization": f"Bearer {key}"},
                                   json={"model": "tts-1", "voice": "tone",
                                         "input": "Hello there.", "response_format": "pcm"})
        await reply.read()
        return reply.status


def test_mp3_sentences_that_make_no_audio_are_not_held_in_flight(daemon: Daemon) -> None:
    """An MP3 job is sent whole once the frames its encoder holds go out; one that made no
    audio ("[pause:0]") has none, yet it waited for later audio in flight for its client:
    16 of them made the client `busy` everywhere (HTTP 429, "16 requests of this client are
    in flight"), and its next sentence closed the socket 1008, with nothing being made."""
    silent = {"text": "[pause:0]", "flush": True}

    async def speak() -> tuple[list[dict[str, Any]], int]:
        async with _connect(daemon, "stream-input", "output_format=mp3_22050_32") as ws:
            await _send(ws, {"text": " "}, *[silent] * (MAX_PENDING + 2))
            status = await _http_speech(daemon)  # while the socket is open
            await _send(ws, {"text": "The kettle is on.", "flush": True}, {"text": ""})
            return await _heard(ws), status

    replies, status = asyncio.run(speak())
    assert status == 200
    assert [r for r in replies if not r.get("audio")] == [{"isFinal": True}]
    assert _audio(replies)


def test_a_sentence_over_the_rate_limit_fails_its_own_context_alone(daemon: Daemon) -> None:
    """A sentence the key's rate limit refused, submitted as its message was read, closed
    the whole socket (1008, no contextId) and cancelled the other contexts' sentences in
    flight; it fails its own context now, after what was sent before it."""
    alpha = "Alpha is here SLOW@1 now."  # in flight when bravo comes
    bravo = "Bravo is here, and it is long."  # over what is left of CHARS_PER_MINUTE
    assert len(alpha) <= CHARS_PER_MINUTE < len(alpha) + len(bravo)

    async def speak() -> list[dict[str, Any]]:
        async with _connect(daemon, "multi-stream-input", "output_format=pcm_16000",
                            key=METERED) as ws:
            await _send(ws, {"context_id": "a", "text": " "},
                        {"context_id": "a", "text": alpha, "flush": True},
                        {"context_id": "b", "text": " "},
                        {"context_id": "b", "text": bravo, "flush": True},
                        {"close_socket": True})
            return await _heard(ws)  # raises on a close other than 1000

    replies = asyncio.run(speak())
    said = [{k: v for k, v in r.items() if k != "message"} for r in replies
            if not r.get("audio")]
    assert said == [{"error": "rate_limit_exceeded", "code": 1008, "contextId": "b"},
                    {"isFinal": True, "contextId": "a"}]
    assert len(_audio(replies)) // 2 >= int(len("Alpha is here now.") * 0.05 * 16000)


def test_an_answer_of_many_sentences_is_one_request_of_its_key(daemon: Daemon) -> None:
    """Each sentence of a socket counted as one request: an agent's answer of 14 sentences
    on a key of rate_limit = 10 (README's example) was refused after 10, closed 1008 with
    no isFinal. The socket is the request; its sentences count their characters."""
    sentences = [f"Sentence {n} is short." for n in range(REQUESTS_PER_MINUTE + 2)]

    async def speak() -> list[dict[str, Any]]:
        async with _connect(daemon, "stream-input", "output_format=pcm_16000",
                            key=PACED) as ws:
            await _send(ws, {"text": " "},
                        *[{"text": text + " ", "flush": True} for text in sentences],
                        {"text": ""})
            return await _heard(ws)  # raises on a close other than 1000

    replies = asyncio.run(speak())
    assert [r for r in replies if not r.get("audio")] == [{"isFinal": True}]
    made_s = len(_audio(replies)) / 2 / 16000
    assert made_s >= 0.9 * 0.05 * sum(len(text) for text in sentences)


def test_a_context_that_fails_as_the_socket_closes_ends_its_task_quietly() -> None:
    """A stream's task whose error could not be sent (the socket closing meanwhile) raised
    SocketClosed out of its `except ProtocolError` handler; the stream was forgotten, so
    nothing awaited that task ("Task exception was never retrieved")."""
    request = cast(Any, SimpleNamespace(protocol=None))
    closed = cast(Any, SimpleNamespace(closed=True))
    socket = elevenlabs._Socket(cast(Any, None), cast(Any, None), closed, request,
                                fmt=elevenlabs.output_format("pcm_16000"), voice="tone",
                                multi=True, auto_mode=False)
    stream = elevenlabs._Stream("a")
    stream.refused = elevenlabs.ProtocolError("rate_limit_exceeded", "over the limit")
    socket._streams["a"] = stream
    asyncio.run(socket._speak(stream))  # raised SocketClosed
    assert "a" not in socket._streams


def test_a_closed_context_still_speaking_leaves_its_place_to_a_new_one(daemon: Daemon) -> None:
    """A barge-in closes the context being spoken (close_context) and opens the next at
    once. The closed one, still finishing what it was sent, kept one of the 5 places, so
    quick barge-ins got max_active_conversations and the socket closed 1008; ElevenLabs
    frees the place at the close."""
    places = elevenlabs.MAX_CONTEXTS

    async def barge_in() -> list[dict[str, Any]]:
        async with _connect(daemon, "multi-stream-input", "output_format=pcm_16000") as ws:
            await _send(ws, {"context_id": "old", "text": "The old reply SLOW@1 goes on.",
                             "flush": True},
                        {"context_id": "old", "close_context": True})
            for n in range(places):  # every place, while "old" still speaks
                await _send(ws, {"context_id": f"new{n}", "text": f"Reply {n} is here.",
                                 "flush": True})
            await _send(ws, {"close_socket": True})
            return await _heard(ws)  # raises on a close other than 1000

    replies = asyncio.run(barge_in())
    assert not [r for r in replies if r.get("error")]
    finals = sorted(r["contextId"] for r in replies if r.get("isFinal"))
    assert finals == sorted(["old", *(f"new{n}" for n in range(places))])


def test_closed_contexts_still_speaking_are_bounded() -> None:
    """Out of the open contexts' count, those closed and still speaking have a bound of
    their own: each holds its sentences in flight and an encoder stream."""
    async def opening(open_streams: int, ending_streams: int) -> str | None:
        request = cast(Any, SimpleNamespace(protocol=None))
        socket = elevenlabs._Socket(cast(Any, None), cast(Any, None), cast(Any, None),
                                    request, fmt=elevenlabs.output_format("pcm_16000"),
                                    voice="tone", multi=True, auto_mode=False)
        for n in range(open_streams + ending_streams):
            socket._streams[f"c{n}"] = elevenlabs._Stream(f"c{n}", ended=n >= open_streams)
        try:
            stream = socket._open(elevenlabs.Message(context="new"))
        except elevenlabs.ProtocolError as refused:
            return refused.message
        assert stream.task is not None
        stream.task.cancel()
        return None

    most = elevenlabs.MAX_ENDING_CONTEXTS
    assert asyncio.run(opening(elevenlabs.MAX_CONTEXTS - 1, most - 1)) is None
    assert "5 contexts are open" in (asyncio.run(opening(elevenlabs.MAX_CONTEXTS, 0)) or "")
    assert f"{most} closed contexts are still finishing" in \
        (asyncio.run(opening(0, most)) or "")
