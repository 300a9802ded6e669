"""ElevenLabs' text-to-speech WebSockets (stream-input, multi-stream-input), with the real
client libraries pointed at the real daemon: LiveKit's ElevenLabs plugin (multi-stream-input),
Pipecat's ElevenLabs service (multi-stream-input, auto_mode; make test-pipecat) and the
`elevenlabs` SDK (stream-input). Bounds and refusals use aiohttp's WebSocket client,
to send what no library would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import numpy as np
import pytest
import soundfile
from elevenlabs.client import ElevenLabs
from livekit.agents import APIStatusError
from livekit.plugins import elevenlabs as livekit_elevenlabs

from cosyvoiced import config
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake import elevenlabs
from cosyvoiced.intake.crowding import QUIET_S
from cosyvoiced.intake.elevenlabs import Message, ProtocolError
from tests.daemon import Daemon, assert_speech, free_port, wait_until
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR

KEY = "sk-test-0123456789abcdef"
JOE = "en_US-joe-medium"
STREAMED = ("The ferry leaves the harbour at seven every morning. It crosses the bay in "
            "about forty minutes, and the gulls follow it all the way. On calm days you can "
            "see the lighthouse from the upper deck. The café on the pier sells coffee and "
            "warm bread to the early passengers, and the captain waves from the bridge as "
            "the ferry pulls away.")  # some 3.3 s of tokens: the first sentence is heard
# long before the last is written, even on 2 busy cores (2.2 s once, for MP3)
LONG_TEXT = " ".join(f"This is sentence number {n} of a long answer, spoken as it is made."
                     for n in range(1, 31))
TOKENS_PER_S = 20.0  # an LLM's pace
TIMEOUT_S = 60.0


def _elevenlabs_daemon(root: Path, **http: Any) -> Daemon:
    """A daemon whose HTTP listener takes KEY, with `rachel` as our JOE (not started)."""
    keys = root / "api_keys"
    keys.write_text(f"{KEY}\n")
    return Daemon(root, spool={"max_text_chars": 4000},
                  http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys),
                        **http},
                  http__voices={"rachel": JOE})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = _elevenlabs_daemon(tmp_path_factory.mktemp("elevenlabs"))
    running.start()
    yield running
    running.stop()


def _listen(daemon: Daemon) -> str:
    return config.load(daemon.config_path).http.listen


def _tokens(text: str) -> list[str]:
    """The text as an LLM streams it: a word (with its space) at a time."""
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


def _wav(pcm: bytes, rate: int, path: Path) -> Path:
    soundfile.write(path, np.frombuffer(pcm, dtype="<i2"), rate, subtype="PCM_16")
    return path


# -- LiveKit's plugin: multi-stream-input --------------------------------------------------------
async def _livekit_speak(daemon: Daemon, text: str, encoding: str,
                         key: str = KEY) -> tuple[bytes, int, float, float]:
    """(PCM, rate, when the first audio came, when the last token was sent), the times from
    the first token, with text sent at TOKENS_PER_S."""
    async with aiohttp.ClientSession() as session:
        tts = livekit_elevenlabs.TTS(voice_id="rachel", api_key=key, encoding=encoding,  # type: ignore[arg-type]
                                     base_url=f"http://{_listen(daemon)}/v1",
                                     http_session=session)
        stream = tts.stream()
        began = time.monotonic()
        sent_at = [0.0]

        async def write() -> None:
            for token in _tokens(text):
                stream.push_text(token)
                await asyncio.sleep(1 / TOKENS_PER_S)
            sent_at[0] = time.monotonic() - began
            stream.end_input()

        writer = asyncio.create_task(write())
        pcm, rate, first_at = bytearray(), 0, 0.0
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async for audio in stream:
                    if not first_at:
                        first_at = time.monotonic() - began
                    pcm += audio.frame.data.tobytes()
                    rate = audio.frame.sample_rate
            await writer
        finally:
            writer.cancel()
            await stream.aclose()
            await tts.aclose()
        return bytes(pcm), rate, first_at, sent_at[0]


@pytest.mark.parametrize(("encoding", "rate"), [("pcm_24000", 24000),
                                                ("mp3_44100_128", 44100)])
def test_livekit_hears_the_first_sentence_while_the_text_is_still_written(
        daemon: Daemon, tmp_path: Path, encoding: str, rate: int) -> None:
    pcm, heard_rate, first_at, sent_at = asyncio.run(_livekit_speak(daemon, STREAMED,
                                                                    encoding))
    assert heard_rate == rate
    assert 0 < first_at < sent_at, (f"the first audio came {first_at:.2f} s after the text "
                                    f"began; the text was all sent at {sent_at:.2f} s")
    assert_speech(_wav(pcm, rate, tmp_path / "livekit.wav"), rate, STREAMED)


def test_mp3_sentences_held_for_their_last_frames_keep_to_the_clients_pending_bound(
        tmp_path: Path) -> None:
    """A sentence is sent whole once the MP3 frames its encoder holds went out with the
    next one's audio; it stayed in flight meanwhile, beside the two of the lookahead, and
    with `max_pending_per_client = 2` every MP3 stream of three sentences sent at once got
    `busy`."""
    async def speak(daemon: Daemon) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, query="output_format=mp3_22050_32")
            for text in (" ", STREAMED, ""):  # every sentence waits to be spoken at once
                await ws.send_json({"text": text})
            return [r async for r in _replies(ws)]

    daemon = _elevenlabs_daemon(tmp_path, max_pending_per_client=2)
    daemon.start()
    try:
        replies = asyncio.run(speak(daemon))
        outcomes = [e["outcome"] for e in daemon.log_events("job")]
    finally:
        daemon.stop()
    assert [r for r in replies if not r.get("audio")] == [{"isFinal": True}]
    assert outcomes == ["done"] * (STREAMED.count(". ") + 1)


def test_livekit_with_a_wrong_key_is_refused(daemon: Daemon) -> None:
    with pytest.raises(APIStatusError) as refused:
        asyncio.run(_livekit_speak(daemon, "Hello there.", "pcm_16000", key="sk-wrong"))
    assert refused.value.status_code == 401


def test_a_hang_up_cancels_the_jobs_in_flight(daemon: Daemon) -> None:
    async def leave() -> None:
        async with aiohttp.ClientSession() as session:
            tts = livekit_elevenlabs.TTS(voice_id=JOE, api_key=KEY, encoding="pcm_22050",
                                         base_url=f"http://{_listen(daemon)}/v1",
                                         http_session=session)
            stream = tts.stream()
            stream.push_text(LONG_TEXT)
            stream.end_input()
            async with asyncio.timeout(TIMEOUT_S):
                await anext(aiter(stream))  # its first audio: then the app goes away
            await stream.aclose()
            await tts.aclose()  # the socket closes

    before = len(_http_jobs(daemon))
    asyncio.run(leave())

    def cancelled() -> list[dict[str, Any]]:
        ours = set(_http_jobs(daemon)[before:])
        return [e for e in daemon.log_events("job")
                if e["job"] in ours and e["outcome"] == "cancelled"]

    wait_until(cancelled, 30, "a job of the socket to end cancelled")


def _http_jobs(daemon: Daemon) -> list[str]:
    return [e["job"] for e in daemon.log_events("job_queued") if e["source"] == "http"]


# -- Pipecat's service: multi-stream-input, auto_mode ------------------------------------------
@pytest.mark.pipecat
# pipecat's own classes subclass one it has deprecated, warned at its import
@pytest.mark.filterwarnings("ignore:`AudioContextTTSService` is deprecated:DeprecationWarning")
def test_pipecat_speaks_each_sentence_of_an_llm_reply(daemon: Daemon, tmp_path: Path) -> None:
    # pipecat-ai lives in a virtualenv of its own (make test-pipecat: it pins soundfile and
    # soxr older than the daemon's), so it is imported here, where only that run gets.
    frames = importlib.import_module("pipecat.frames.frames")
    service = importlib.import_module("pipecat.services.elevenlabs.tts")
    utils = importlib.import_module("pipecat.tests.utils")

    async def speak() -> list[Any]:
        tts = service.ElevenLabsTTSService(
            api_key=KEY, url=f"ws://{_listen(daemon)}", sample_rate=16000,
            settings=service.ElevenLabsTTSService.Settings(voice=JOE))
        reply = [frames.LLMFullResponseStartFrame()] + [
            frames.LLMTextFrame(token) for token in _tokens(STREAMED)] + [
            frames.LLMFullResponseEndFrame(), utils.SleepFrame(sleep=8)]
        down, _up = await utils.run_test(tts, frames_to_send=reply)
        return list(down)

    down = asyncio.run(speak())
    audio = [frame for frame in down if isinstance(frame, frames.TTSAudioRawFrame)]
    assert {frame.sample_rate for frame in audio} == {16000}
    assert any(isinstance(frame, frames.TTSStoppedFrame) for frame in down)  # its isFinal
    pcm = b"".join(frame.audio for frame in audio)
    assert_speech(_wav(pcm, 16000, tmp_path / "pipecat.wav"), 16000, STREAMED)


# -- the elevenlabs SDK: stream-input ------------------------------------------------------------
# The SDK reads ConnectionClosed.code, deprecated in `websockets`, when the server closes
# the socket after the last audio (as ElevenLabs' does).
sdk_warning = pytest.mark.filterwarnings(
    "ignore:ConnectionClosed.code is deprecated:DeprecationWarning")


def _sdk_speak(daemon: Daemon, text: str, output_format: str) -> bytes:
    client = ElevenLabs(api_key=KEY, base_url=f"http://{_listen(daemon)}")
    # The SDK makes its WebSocket URL wss:// whatever base_url says; cosyvoiced serves
    # plain ws:// (put TLS in front of it): this points the socket where base_url points.
    client.text_to_speech._ws_base_url = f"ws://{_listen(daemon)}"
    return b"".join(client.text_to_speech.convert_realtime(
        voice_id=JOE, text=iter(_tokens(text)), output_format=output_format))


@sdk_warning
@pytest.mark.parametrize(("output_format", "rate"), [("pcm_16000", 16000),
                                                     ("pcm_22050", 22050),
                                                     ("pcm_24000", 24000)])
def test_the_sdk_streams_text_in_as_raw_pcm(daemon: Daemon, tmp_path: Path,
                                            output_format: str, rate: int) -> None:
    pcm = _sdk_speak(daemon, STREAMED, output_format)
    assert_speech(_wav(pcm, rate, tmp_path / f"{output_format}.wav"), rate, STREAMED)


@sdk_warning
def test_the_sdk_gets_mp3(daemon: Daemon, tmp_path: Path) -> None:
    data = _sdk_speak(daemon, STREAMED, "mp3_44100_128")
    path = tmp_path / "speech.mp3"
    path.write_bytes(data)
    assert soundfile.info(io.BytesIO(data)).format == "MP3"
    assert_speech(path, 44100, STREAMED)


# -- the protocol's edges, with aiohttp's client ------------------------------------------------
async def _socket(daemon: Daemon, session: aiohttp.ClientSession, path: str = "stream-input",
                  query: str = "output_format=pcm_16000", *, key: str | None = KEY,
                  voice: str = JOE) -> aiohttp.ClientWebSocketResponse:
    headers = {"xi-api-key": key} if key else {}
    return await session.ws_connect(
        f"ws://{_listen(daemon)}/v1/text-to-speech/{voice}/{path}?{query}", headers=headers)


async def _replies(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT_S):
        async for frame in ws:
            assert frame.type == aiohttp.WSMsgType.TEXT
            yield json.loads(frame.data)


def test_the_key_may_come_in_the_first_message(daemon: Daemon, tmp_path: Path) -> None:
    async def speak() -> bytes:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, key=None)
            await ws.send_json({"text": " ", "xi_api_key": KEY})
            await ws.send_json({"text": STREAMED})
            await ws.send_json({"text": ""})
            chunks = [base64.b64decode(r["audio"]) async for r in _replies(ws)
                      if r.get("audio")]
            return b"".join(chunks)

    assert_speech(_wav(asyncio.run(speak()), 16000, tmp_path / "key.wav"), 16000, STREAMED)


def test_without_a_key_the_socket_is_refused(daemon: Daemon) -> None:
    async def refused() -> tuple[int, list[dict[str, Any]], int | None]:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as multi:
                await _socket(daemon, session, "multi-stream-input", key=None)
            ws = await _socket(daemon, session, key=None)
            await ws.send_json({"text": " "})
            return multi.value.status, [r async for r in _replies(ws)], ws.close_code

    status, replies, close_code = asyncio.run(refused())
    assert status == 401
    assert replies == [{"message": "an API key is required: the xi-api-key header, or "
                        "xi_api_key in the first message", "error": "invalid_api_key",
                        "code": 1008}]
    assert close_code == 1008


@pytest.mark.parametrize(("voice", "query", "code"), [
    (JOE, "output_format=ogg_44100", "unsupported_format"),
    ("nobody-we-know", "output_format=pcm_16000", "voice_not_found"),
    (JOE, "inactivity_timeout=999", "invalid_inactivity_timeout"),
])
def test_a_bad_handshake_is_refused_with_its_reason(daemon: Daemon, voice: str, query: str,
                                                    code: str) -> None:
    async def connect() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            url = f"http://{_listen(daemon)}/v1/text-to-speech/{voice}/stream-input?{query}"
            async with session.get(url, headers={"xi-api-key": KEY, "Connection": "Upgrade",
                                                 "Upgrade": "websocket",
                                                 "Sec-WebSocket-Version": "13",
                                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="
                                                 }) as reply:
                return reply.status, await reply.json()

    status, body = asyncio.run(connect())
    assert status == 400
    assert body["detail"]["status"] == code


@pytest.mark.parametrize(("query", "text", "at_once"), [
    ("auto_mode=true", "The kettle boils at 100.", True),
    # Without auto_mode, a sentence whose end is certain is spoken at once too...
    ("auto_mode=false", "The kettle is on.", True),
    # ...but not one whose "." the next character may undo ("100.5"): it waits for more.
    ("auto_mode=false", "The kettle boils at 100.", False)])
def test_in_auto_mode_each_message_is_spoken_at_once(daemon: Daemon, query: str, text: str,
                                                     at_once: bool) -> None:
    async def first_reply() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, "multi-stream-input",
                               f"output_format=pcm_16000&{query}&inactivity_timeout=5")
            await ws.send_json({"text": " ", "context_id": "a"})
            # A whole sentence, and nothing after it.
            await ws.send_json({"text": text, "context_id": "a"})
            async for reply in _replies(ws):
                return reply
            return None

    reply = asyncio.run(first_reply())
    assert reply is not None
    if at_once:
        assert reply.get("audio"), reply
    else:  # the end of the sentence is not known: nothing is said until the socket idles
        assert reply["error"] == "input_timeout_exceeded"


def test_contexts_are_separate_and_each_ends_with_its_final(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    async def two() -> dict[str, list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, "multi-stream-input")
            for context, text in (("a", "The first voice speaks here."),
                                  ("b", "And the second one answers it.")):
                await ws.send_json({"text": " ", "context_id": context})
                await ws.send_json({"text": text, "context_id": context, "flush": True})
                await ws.send_json({"text": "", "context_id": context})  # a keep-alive
                await ws.send_json({"context_id": context, "close_context": True})
            heard: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
            async for reply in _replies(ws):
                heard[reply["contextId"]].append(reply)
                if all(r and r[-1].get("isFinal") for r in heard.values()):
                    await ws.send_json({"close_socket": True})
            return heard

    for context, replies in asyncio.run(two()).items():
        assert replies[-1] == {"isFinal": True, "contextId": context}
        pcm = b"".join(base64.b64decode(r["audio"]) for r in replies[:-1])
        samples = np.frombuffer(pcm, dtype="<i2")
        assert len(samples) / 16000 > 1.0, f"context {context}: {len(samples)} samples"


def test_text_for_a_context_being_closed_is_not_spoken_and_is_logged(daemon: Daemon) -> None:
    """Text sent under a context id after its close_context, before its final, was dropped
    without a word: no job, no error, no log line."""
    async def closing() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, "multi-stream-input")
            await ws.send_json({"text": "It speaks once and closes.", "context_id": "late",
                                "flush": True})
            await ws.send_json({"context_id": "late", "close_context": True})
            for _ in range(2):
                await ws.send_json({"text": "A second life it never gets.",
                                    "context_id": "late", "flush": True})
            await ws.send_json({"context_id": "late", "close_context": True})
            heard = []
            async for reply in _replies(ws):
                heard.append(reply)
                if reply.get("isFinal"):
                    await ws.send_json({"close_socket": True})
            return heard

    heard = asyncio.run(closing())
    assert [r for r in heard if r.get("isFinal")] == [{"isFinal": True, "contextId": "late"}]
    logged = [e for e in daemon.log_events("elevenlabs_text_after_close")
              if e["context"] == "late"]
    assert [e["chars"] for e in logged] == [len("A second life it never gets.")]


def _mp3_frames(replies: list[dict[str, Any]]) -> int:
    data = b"".join(base64.b64decode(r["audio"]) for r in replies if r.get("audio"))
    frames: int = soundfile.info(io.BytesIO(data)).frames
    return frames


# Registered as `tone_daemon` under another name, so that test_elevenlabs_keepalive.py can
# import it and still take `tone_daemon` as an argument (no F811 redefinition).
@pytest.fixture(scope="module", name="tone_daemon")
def tone_daemon_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on the tone engine (tests/engines/faulty.py): audio of a known length, and
    sentences that fail on demand (SLOW@ makes one take its time)."""
    root = tmp_path_factory.mktemp("elevenlabs-tone")
    keys = root / "api_keys"
    keys.write_text(f"{KEY}\n")
    running = Daemon(root / "d", engine={"name": "tests.engines.faulty:load"},
                     http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys)})
    running.start()
    yield running
    running.stop()


KETTLE = "The kettle is on."  # its end is certain: spoken at once
KETTLE_FRAMES = int(len(KETTLE) * SECONDS_PER_CHAR * SAMPLE_RATE)  # the tone engine's length


def test_an_mp3_reply_is_heard_whole_before_an_inactivity_close_and_a_hang_up_is_not(
        tone_daemon: Daemon) -> None:
    """The MP3 encoder keeps a sentence's last frames (some 0.15 s of it) until audio after
    it comes, or the stream's end. A client that sent a sentence and then waited for more
    lost those frames to the inactivity close (they were never asked for); they go out
    before it now. A client that hangs up before them is counted as not getting its reply
    whole (it was counted sent when its audio was made)."""
    daemon = tone_daemon

    async def speak(ending: str) -> tuple[str, list[dict[str, Any]]]:
        before = len(_http_jobs(daemon))
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, voice="tone",
                               query="output_format=mp3_22050_32&inactivity_timeout=2")
            await ws.send_json({"text": " "})
            await ws.send_json({"text": KETTLE})
            if ending == "end":
                await ws.send_json({"text": ""})
            if ending == "hang-up":  # once it is made, before the frames held are asked for
                (job_id,) = wait_until(lambda: _http_jobs(daemon)[before:], 30, "the job")
                wait_until(lambda: [e for e in daemon.log_events("job") if e["job"] == job_id],
                           30, "the job to be made")
                await ws.close()
                return job_id, []
            replies = [r async for r in _replies(ws)]
        (job_id,) = _http_jobs(daemon)[before:]
        return job_id, replies

    heard, whole = asyncio.run(speak("end"))
    waited, closed = asyncio.run(speak("idle"))
    cut, _ = asyncio.run(speak("hang-up"))
    assert whole[-1] == {"isFinal": True}
    assert [r.get("error") for r in closed if not r.get("audio")] == ["input_timeout_exceeded"]
    assert _mp3_frames(whole) >= KETTLE_FRAMES
    assert _mp3_frames(closed) >= KETTLE_FRAMES
    ended = {e["job"]: e["outcome"] for e in daemon.log_events("job")}
    assert [ended.get(job) for job in (heard, waited, cut)] == ["done"] * 3
    undelivered = wait_until(lambda: [e for e in daemon.log_events("reply_undelivered")
                                      if e["job"] in (heard, waited, cut)], 30,
                             "the reply cut short to be counted undelivered")
    # The two heard whole were released before the third was given up: none for them.
    assert [(e["job"], e["source"]) for e in undelivered] == [(cut, "http")]


async def _refusal(daemon: Daemon, messages: Sequence[dict[str, Any] | str],
                   query: str = "output_format=pcm_16000",
                   path: str = "multi-stream-input") -> tuple[list[dict[str, Any]], int | None]:
    """The error replies to `messages`, and the close code that follows."""
    async with aiohttp.ClientSession() as session:
        ws = await _socket(daemon, session, path, query)
        for message in messages:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_json(message))
        errors = [r async for r in _replies(ws) if "error" in r]
        return errors, ws.close_code


def test_a_sixth_context_is_refused(daemon: Daemon) -> None:
    opens = [{"text": " ", "context_id": f"c{n}"} for n in range(elevenlabs.MAX_CONTEXTS + 1)]
    errors, close_code = asyncio.run(_refusal(daemon, opens))
    assert [e["error"] for e in errors] == ["max_active_conversations"]
    assert close_code == 1008


def test_a_socket_that_says_nothing_is_closed(daemon: Daemon) -> None:
    began = time.monotonic()
    errors, close_code = asyncio.run(_refusal(daemon, [{"text": " ", "context_id": "a"}],
                                              query="inactivity_timeout=1"))
    assert [e["error"] for e in errors] == ["input_timeout_exceeded"]
    assert close_code == 1008
    assert time.monotonic() - began < 10


def test_a_socket_that_only_pings_is_closed_after_its_inactivity_timeout(
        daemon: Daemon) -> None:
    """aiohttp starts its receive timeout afresh with every ping it answers: a client that
    pinged every 0.3 s and never sent a message held its socket, and its slot, for good."""
    async def ping_only() -> tuple[list[str], float]:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, "multi-stream-input", "inactivity_timeout=1")
            await ws.send_json({"text": " ", "context_id": "a"})
            began = time.monotonic()

            async def keep_pinging() -> None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    while not ws.closed:
                        await ws.ping()
                        await asyncio.sleep(0.3)

            pinging = asyncio.create_task(keep_pinging())
            try:
                async with asyncio.timeout(20):
                    errors = [r["error"] async for r in _replies(ws) if "error" in r]
            finally:
                pinging.cancel()
            return errors, time.monotonic() - began

    errors, elapsed = asyncio.run(ping_only())
    assert errors == ["input_timeout_exceeded"]
    assert elapsed < 10


def test_a_socket_whose_key_is_to_come_first_must_send_it_soon(daemon: Daemon) -> None:
    """Keys on and none in the handshake: the key may come in the first message, and a
    socket that sent none waited its whole inactivity_timeout (up to 180 s) unauthenticated."""
    async def silent() -> tuple[list[dict[str, Any]], float]:
        async with aiohttp.ClientSession() as session:
            began = time.monotonic()
            ws = await _socket(daemon, session, key=None,
                               query="output_format=pcm_16000&inactivity_timeout=180")
            async with asyncio.timeout(elevenlabs.FIRST_MESSAGE_S + 20):
                errors = [r async for r in _replies(ws) if "error" in r]
            return errors, time.monotonic() - began

    errors, elapsed = asyncio.run(silent())
    assert [e["error"] for e in errors] == ["input_timeout_exceeded"]
    assert "xi_api_key" in errors[0]["message"], errors[0]
    assert elapsed < elevenlabs.FIRST_MESSAGE_S + 10


def test_a_long_answer_outlasts_the_inactivity_timeout(daemon: Daemon, tmp_path: Path) -> None:
    async def speak() -> tuple[bytes, list[str]]:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, "multi-stream-input",
                               "output_format=pcm_16000&inactivity_timeout=1")
            await ws.send_json({"text": " ", "context_id": "a"})
            await ws.send_json({"text": LONG_TEXT, "context_id": "a", "flush": True})
            replies = [r async for r in _replies(ws)]  # then silence: closed when all is said
            pcm = b"".join(base64.b64decode(r["audio"]) for r in replies if r.get("audio"))
            return pcm, [r["error"] for r in replies if "error" in r]

    pcm, errors = asyncio.run(speak())
    assert errors == ["input_timeout_exceeded"]
    assert_speech(_wav(pcm, 16000, tmp_path / "long.wav"), 16000, LONG_TEXT)


def test_malformed_and_oversized_messages_close_the_socket(daemon: Daemon) -> None:
    errors, close_code = asyncio.run(_refusal(daemon, ["{not json"]))
    assert [e["error"] for e in errors] == ["invalid_message"]
    assert close_code == 1008
    huge = json.dumps({"text": "word " * (elevenlabs.MAX_MESSAGE_BYTES // 5 + 1)})
    errors, close_code = asyncio.run(_refusal(daemon, [huge]))
    assert close_code == 1009  # Message Too Big


def test_text_sent_far_faster_than_it_is_spoken_is_bounded(daemon: Daemon) -> None:
    paragraph = "word " * 199 + "end. "
    flood = [{"text": " ", "context_id": "a"}] + [
        {"text": paragraph, "context_id": "a"}
        for _ in range(elevenlabs.MAX_BUFFERED_CHARS // len(paragraph) + 4)]
    errors, close_code = asyncio.run(_refusal(daemon, flood))
    assert [e["error"] for e in errors] == ["buffer_full"]
    assert close_code == 1008


def test_text_that_says_nothing_is_read_at_a_pace_and_others_are_served(
        daemon: Daemon) -> None:
    """Text with nothing to say is dropped, so it never waited to be spoken: a socket that
    sent 60 KB of "。" per message (19,990 one-character sentences, each split and checked
    on the HTTP loop) was read as fast as it could send, for as long as it liked."""
    unsaid = json.dumps({"text": "。" * 19_990, "context_id": "a"}, ensure_ascii=False)

    async def flood_while_another_speaks() -> int:
        async with aiohttp.ClientSession() as session:
            flooding = await _socket(daemon, session, "multi-stream-input")
            for _ in range(8):
                await flooding.send_str(unsaid)
            await asyncio.to_thread(wait_until, lambda: daemon.log_events("unsaid_text_paced"),
                                    TIMEOUT_S, "the flood to be paced")
            other = await _socket(daemon, session)
            await other.send_str(json.dumps({"text": "Hello there. ", "xi_api_key": KEY}))
            await other.send_str(json.dumps({"text": ""}))
            audio = 0
            async for reply in _replies(other):
                audio += len(base64.b64decode(reply.get("audio") or ""))
                if reply.get("isFinal"):
                    break
            assert not flooding.closed  # slowed down, not refused (and left to the session's
            return audio  # close: a close handshake would wait for the paced reader)

    assert asyncio.run(flood_while_another_speaks()) > 16_000  # over half a second at 16 kHz
    paced = daemon.log_events("unsaid_text_paced")[0]
    assert paced["source"] == "elevenlabs"
    assert paced["wait_s"] > 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_contexts_that_end_with_no_audio_cost_the_encoder_nothing(daemon: Daemon) -> None:
    """Each context opened an MP3 stream in the encoder process and finished it, audio or
    not: a client cycling empty contexts (`close_context` with text " ") kept the encoder's
    stream calls, served before any file, busy at no cost of its own (1.1 ms each)."""
    encoder = daemon.log_events("encoder_started")[-1]["pid"]
    before = _cpu_s(encoder)

    async def cycle(contexts: int) -> int:
        finals = 0
        async with aiohttp.ClientSession() as session:
            ws = await _socket(daemon, session, "multi-stream-input", "output_format=mp3_22050_32")
            for batch in range(contexts // elevenlabs.MAX_CONTEXTS):
                for n in range(elevenlabs.MAX_CONTEXTS):
                    await ws.send_str(json.dumps({"text": " ", "context_id": f"{batch}-{n}",
                                                  "close_context": True}))
                async for reply in _replies(ws):
                    assert "error" not in reply, reply
                    finals += bool(reply.get("isFinal"))
                    if finals == (batch + 1) * elevenlabs.MAX_CONTEXTS:
                        break
            await ws.close()
        return finals

    assert asyncio.run(cycle(500)) == 500  # each context still ends with its final
    assert _cpu_s(encoder) - before < 0.1, "the encoder worked for contexts with no audio"


# -- the pure parts ---------------------------------------------------------------------------
def test_a_socket_is_idle_only_with_nothing_in_hand_and_quiet() -> None:
    """What may be given up at the connection cap (crowding.py): not a socket with text
    waiting, a job in flight, or a context that ended and still sends its last bytes and
    its final; not one whose client spoke in the last QUIET_S."""
    request = cast(Any, SimpleNamespace(protocol=None))
    socket = elevenlabs._Socket(cast(Any, None), cast(Any, None), cast(Any, None), request,
                                fmt=elevenlabs.output_format("pcm_16000"), voice=JOE,
                                multi=True, auto_mode=False)
    socket._heard_at -= QUIET_S + 1
    assert socket._idle()
    stream = elevenlabs._Stream("a")
    socket._streams["a"] = stream
    assert socket._idle()  # open, nothing in it
    for busy in ("pending", "ended"):
        if busy == "pending":
            stream.sentences.feed("Half a sent")
        else:
            stream.sentences.flush()
            stream.ended = True
        assert not socket._idle(), busy
    del socket._streams["a"]  # forgotten once its final is sent
    assert socket._idle()
    socket._heard_at = time.monotonic()
    assert not socket._idle()


def test_output_formats_name_a_codec_and_a_rate() -> None:
    assert elevenlabs.output_format("pcm_16000") == elevenlabs.OutputFormat(
        "pcm_16000", "pcm", 16000)
    assert elevenlabs.output_format("mp3_22050_32").codec == "mp3"
    assert elevenlabs.output_format(None).name == "mp3_44100_128"
    for bad in ("pcm_12345", "ulaw_8000", "mp3_44100", "pcm", "opus_48000_64"):
        with pytest.raises(ProtocolError, match="output_format"):
            elevenlabs.output_format(bad)


def test_the_inactivity_timeout_is_bounded() -> None:
    assert elevenlabs.inactivity_timeout(None) == 20.0
    assert elevenlabs.inactivity_timeout("180") == 180.0
    for bad in ("0", "181", "soon", "nan"):
        with pytest.raises(ProtocolError):
            elevenlabs.inactivity_timeout(bad)


def test_query_flags_are_true_or_false() -> None:
    assert elevenlabs.query_flag("auto_mode", "true")
    assert not elevenlabs.query_flag("auto_mode", None)
    assert not elevenlabs.query_flag("auto_mode", "False")
    with pytest.raises(ProtocolError, match="auto_mode"):
        elevenlabs.query_flag("auto_mode", "yes")


def test_the_key_is_read_where_clients_put_it() -> None:
    token = elevenlabs.handshake_token
    assert token({"xi-api-key": "k1"}, {}) == "k1"
    assert token({}, {"xi-api-key": "k2"}) == "k2"
    assert token({}, {"authorization": "Bearer k3"}) == "k3"
    assert token({"Authorization": "Bearer k4"}, {}) == "k4"
    assert token({}, {}) is None


def test_messages_are_checked() -> None:
    parse = elevenlabs.parse_message
    assert parse('{"text": " ", "voice_settings": {"speed": 1.1}, "xi_api_key": "k", '
                 '"generation_config": {"chunk_length_schedule": [50]}}', multi=False) == \
        Message(text=" ", token="k", speed=1.1)
    assert parse('{"context_id": "c1", "close_context": true}', multi=True) == \
        Message(context="c1", close_context=True)
    assert parse('{"context_id": "c1", "text": "hi"}', multi=False).context == ""
    assert parse('{"text": "hi", "a_field_of_a_newer_client": 1}', multi=True).text == "hi"
    for bad in ('[]', '{"text": 3}', '{"flush": "yes"}',
                '{"context_id": "a b"}', '{"voice_settings": {"speed": "fast"}}'):
        with pytest.raises(ProtocolError):
            parse(bad, multi=True)


def test_voice_ids_map_through_http_voices() -> None:
    voices = [VoiceInfo(JOE, "en-us", 22050, "piper")]
    assert elevenlabs.resolve_voice("rachel", {"rachel": JOE}, voices) == JOE
    assert elevenlabs.resolve_voice(JOE, {}, voices) == JOE
    with pytest.raises(ProtocolError, match=r"\[http\.voices\]"):
        elevenlabs.resolve_voice("21m00Tcm4TlvDq8ikWT", {}, voices)


def test_the_frames_held_of_a_sentence_made_go_out_before_a_later_one_fails(
        tone_daemon: Daemon) -> None:
    """A sentence's job that fails ends its context with the error: the MP3 frames the
    encoder still held of the sentence before it (made whole) were lost with it."""
    async def speak() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            ws = await _socket(tone_daemon, session, voice="tone",
                               query="output_format=mp3_22050_32")
            await ws.send_json({"text": " "})
            await ws.send_json({"text": f"{KETTLE} Then it FAIL_STREAM fails.", "flush": True})
            return [r async for r in _replies(ws)]

    replies = asyncio.run(speak())
    assert [r["error"] for r in replies if not r.get("audio")] == ["engine_error"]
    assert _mp3_frames(replies) >= KETTLE_FRAMES
