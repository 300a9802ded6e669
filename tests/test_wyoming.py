"""The Wyoming server, with the `wyoming` library's own client, on the real daemon."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import soundfile
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from cosyvoiced import config
from cosyvoiced.client import Client
from cosyvoiced.config import WyomingConfig
from cosyvoiced.intake import wyoming
from cosyvoiced.intake.reply import Chunk, Done, Exchange, Started
from tests.daemon import Daemon, assert_speech, free_port, wait_until

SENTENCE = "The old lighthouse was painted bright yellow after the storm last winter."
STREAMED = ("Our new neighbour keeps a careful record of everything that happens. "
            "The river ferry opens early on weekdays! And every spring garden reminded "
            "everyone to bring a warm coat")
# Long enough that a job is still running after its first audio (16 sentences, a minute of
# speech; 40 took 35-47 s of the suite per test on 2 shared cores).
LONG_TEXT = " ".join(f"This is sentence number {n} of a long answer, spoken as it is made."
                     for n in range(1, 17))
MAX_TEXT_CHARS = 4000
JOE = "en_US-joe-medium"
READ_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("wyoming")
    running = Daemon(root, spool={"max_text_chars": MAX_TEXT_CHARS},
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def _connect(daemon: Daemon) -> AsyncTcpClient:
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    return AsyncTcpClient(host, int(port))


async def _read(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), READ_TIMEOUT_S)
    assert event is not None, "the server closed the connection"
    return event


async def _until(client: AsyncTcpClient, last: str) -> list[Event]:
    """Events up to and including the first of type `last` (or an error)."""
    events = [await _read(client)]
    while events[-1].type not in (last, "error"):
        events.append(await _read(client))
    return events


def _speech_file(events: list[Event], path: Path) -> tuple[Path, int]:
    """The audio of a start/chunks/stop sequence, as a WAV file, and its rate."""
    start = AudioStart.from_event(next(e for e in events if AudioStart.is_type(e.type)))
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert all((c.rate, c.width, c.channels) == (start.rate, 2, 1) for c in chunks)
    pcm = np.frombuffer(b"".join(c.audio for c in chunks), dtype="<i2")
    soundfile.write(path, pcm, start.rate, subtype="PCM_16")
    return path, start.rate


def _status(daemon: Daemon, job_id: str) -> str:
    # A Wyoming client's job: only an admin (the local admin token) sees it over ZeroMQ.
    with Client(daemon.endpoint, timeout_s=10, admin_token=daemon.admin_token()) as zmq_client:
        return str(zmq_client.status(job_id)["state"])


def _wyoming_jobs(daemon: Daemon) -> list[str]:
    return [e["job"] for e in daemon.log_events("job_queued") if e["source"] == "wyoming"]


def test_describe_lists_our_voices_with_their_languages(daemon: Daemon) -> None:
    async def ask() -> Info:
        async with _connect(daemon) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await _read(client))

    (program,) = asyncio.run(ask()).tts
    assert program.name == "cosyvoiced"
    assert program.supports_synthesize_streaming
    assert [(v.name, v.languages) for v in program.voices] == [(JOE, ["en_US"])]


def test_synthesize_gives_start_chunks_stop_that_decode_to_speech(daemon: Daemon,
                                                                  tmp_path: Path) -> None:
    async def speak() -> list[Event]:
        async with _connect(daemon) as client:
            await client.write_event(Synthesize(SENTENCE, SynthesizeVoice(name=JOE)).event())
            return await _until(client, "audio-stop")

    events = asyncio.run(speak())
    assert [e.type for e in events[:2]] == ["audio-start", "audio-chunk"]
    assert AudioStop.is_type(events[-1].type)
    assert len(events) > 3, "audio in several chunks"
    path, rate = _speech_file(events, tmp_path / "one.wav")
    assert rate == 22050
    assert_speech(path, 22050, SENTENCE)


def test_audio_chunks_come_while_the_job_runs(daemon: Daemon, tmp_path: Path) -> None:
    before = len(_wyoming_jobs(daemon))

    async def speak() -> tuple[list[Event], str]:
        async with _connect(daemon) as client:
            await client.write_event(Synthesize(LONG_TEXT).event())
            events = await _until(client, "audio-chunk")
            (job_id,) = _wyoming_jobs(daemon)[before:]
            state = await asyncio.to_thread(_status, daemon, job_id)
            return events + await _until(client, "audio-stop"), state

    events, state_at_first_chunk = asyncio.run(speak())
    assert state_at_first_chunk == "running"
    assert_speech(_speech_file(events, tmp_path / "long.wav")[0], 22050, LONG_TEXT)


def test_streamed_text_is_spoken_sentence_by_sentence_in_order(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    async def stream() -> list[Event]:
        async with _connect(daemon) as client:
            await client.write_event(SynthesizeStart(SynthesizeVoice(language="en_US")).event())
            for word in STREAMED.split(" "):  # as an LLM sends it, a few characters at a time
                await client.write_event(SynthesizeChunk(word + " ").event())
            # Home Assistant repeats the whole text for older servers: not spoken twice.
            await client.write_event(Synthesize(STREAMED).event())
            await client.write_event(SynthesizeStop().event())
            return await _until(client, "synthesize-stopped")

    events = asyncio.run(stream())
    assert SynthesizeStopped.is_type(events[-1].type)
    kinds = [e.type for e in events if e.type != "audio-chunk"]
    assert kinds == ["audio-start", "audio-stop"] * 3 + ["synthesize-stopped"], kinds
    assert_speech(_speech_file(events, tmp_path / "streamed.wav")[0], 22050, STREAMED)


def test_job_errors_carry_the_drop_folders_codes_and_messages(daemon: Daemon) -> None:
    too_long = "word " * (MAX_TEXT_CHARS // 5 + 1)
    daemon.drop_job("nobody", text=SENTENCE, voice="nobody")
    daemon.drop_job("long", text=too_long)

    async def ask(synthesize: Synthesize) -> Error:
        async with _connect(daemon) as client:
            await client.write_event(synthesize.event())
            return Error.from_event(await _read(client))

    unknown = asyncio.run(ask(Synthesize(SENTENCE, SynthesizeVoice(name="nobody"))))
    long = asyncio.run(ask(Synthesize(too_long)))
    assert (unknown.code, unknown.text) == ("unknown_voice",
                                            daemon.wait_failed("nobody.json")["message"])
    assert (long.code, long.text) == ("text_too_long", daemon.wait_failed("long.json")["message"])


@pytest.mark.parametrize(("raw", "message"), [
    (b"not json\n", "event header: not JSON"),
    (b'["synthesize"]\n', "event header: expected a JSON object"),
    (b'{"type": "synthesize", "data_length": 99999999}\n',
     "event header: data_length 99999999 is over the limit of 65536 bytes"),
    (b'{"type": "synthesize", "payload_length": -1}\n',
     "event header: payload_length must be a non-negative integer"),
    (b'{"type": "synthesize-chunk", "data": {"text": "Hi."}}\n',
     "synthesize-chunk: no synthesize-start before it"),
    (b"x" * 70000 + b"\n", "event header: over 65536 bytes"),
])
def test_a_malformed_event_gets_an_error_then_the_connection_closes(
        daemon: Daemon, raw: bytes, message: str) -> None:
    async def send() -> tuple[Event, Event | None]:
        async with _connect(daemon) as client:
            assert client._writer is not None  # raw bytes: what the library would not send
            client._writer.write(raw)
            await client._writer.drain()
            error = await _read(client)
            return error, await asyncio.wait_for(client.read_event(), READ_TIMEOUT_S)

    error, after = asyncio.run(send())
    assert Error.is_type(error.type)
    assert Error.from_event(error).code == "bad_request"
    assert Error.from_event(error).text.startswith(message)
    assert after is None, "the connection is closed after a malformed event"


def test_a_client_that_leaves_mid_synthesis_cancels_its_job(daemon: Daemon) -> None:
    before = len(_wyoming_jobs(daemon))

    async def leave() -> None:
        async with _connect(daemon) as client:
            await client.write_event(Synthesize(LONG_TEXT).event())
            await _until(client, "audio-chunk")

    asyncio.run(leave())
    (job_id,) = _wyoming_jobs(daemon)[before:]
    wait_until(lambda: _status(daemon, job_id) == "cancelled", 30, "the job to be cancelled")


def test_a_network_address_needs_allow_remote(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[wyoming]\nlisten = "tcp://0.0.0.0:10200"\n')
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert "wyoming.listen: 'tcp://0.0.0.0:10200' is not loopback" in run.stderr
    path.write_text('[wyoming]\nlisten = "tcp://0.0.0.0:10200"\nallow_remote = true\n')
    assert config.load(path).wyoming.allow_remote


# -- one connection handler in this process: the moment between a reply's last chunk and its
# audio-stop is one step of the daemon's loop, which no client of the real daemon can aim at.
class _Intake:
    """The supervisor's side of the intake, as the connection sees it: what it was told."""

    def __init__(self) -> None:
        self.sent_whole: list[str] = []
        self.given_up: list[str] = []

    def finished(self, job_id: str) -> None:
        self.sent_whole.append(job_id)

    def gone(self, job_id: str) -> None:
        self.given_up.append(job_id)

    def settings(self) -> WyomingConfig:
        return WyomingConfig()

    def connection_closed(self, _connection: object) -> None:
        pass


def test_a_reply_is_sent_whole_only_once_its_audio_stop_is_written() -> None:
    """Home Assistant keeps a reply's audio only once its audio-stop comes (a connection
    that ends first: no audio at all). The job was released as sent before its audio-stop
    was written, so a client gone at that moment was not counted undelivered."""
    async def reset_before_audio_stop() -> _Intake:
        intake = _Intake()
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.Queue()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, AsyncTcpClient("127.0.0.1", port) as client:
            reader, writer = await asyncio.wait_for(accepted.get(), 10)
            connection = wyoming._Connection(cast(Any, intake), reader, writer)
            exchange = Exchange(asyncio.get_running_loop())
            connection._jobs.add("job")
            speaking = asyncio.create_task(connection._speak(("job", exchange)))
            exchange.post(Started(22050))
            exchange.post(Chunk(np.full(512, 0.1, dtype=np.float32)))
            assert [(await _read(client)).type for _ in range(2)] == ["audio-start",
                                                                       "audio-chunk"]
            # The client goes (a reset) once it has the audio, before the audio-stop.
            assert client._writer is not None
            sock = client._writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client._writer.transport.abort()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 10)
            exchange.post(Done(cast(Any, None)))  # the job ends: made whole
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(speaking, 10)
            await connection._release()
        return intake

    intake = asyncio.run(reset_before_audio_stop())
    # Not released as sent: given up with the connection (the supervisor counts it
    # undelivered, as it ended done).
    assert (intake.sent_whole, intake.given_up) == ([], ["job"])


@pytest.mark.parametrize("ahead", [0, 1, 20, 47, 83, 100])  # of 124
def test_an_event_read_ahead_in_part_is_read_whole(ahead: int) -> None:
    """A connection waiting on its jobs reads ahead (to see a hang-up): an event whose bytes
    were read ahead in part, to any byte, is the same event, and the next follows it."""
    text = SynthesizeChunk("Sent ahead of its turn.").event()
    wire = b"".join(_wire(event) for event in (text, Describe().event()))

    async def read_both() -> list[Event | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(wire[:ahead])
        read = wyoming.ReadAhead(reader)
        while len(read) < ahead:
            assert await asyncio.wait_for(read.read_more(ahead), 5)
        reader.feed_data(wire[ahead:])
        reader.feed_eof()
        return [await wyoming.read_event(read, 5, 5) for _ in range(3)]

    first, second, end = asyncio.run(read_both())
    assert first is not None
    assert second is not None
    assert (first.type, first.data, second.type, end) == (text.type, text.data, "describe",
                                                          None)


def test_a_header_line_read_ahead_in_part_keeps_its_limit() -> None:
    async def read_long_line() -> None:
        reader = asyncio.StreamReader(limit=wyoming.MAX_LINE_BYTES)
        read = wyoming.ReadAhead(reader)
        reader.feed_data(b'{"type": "ping", "data": {"text": "' + b"x" * 40_000)
        assert await read.read_more(wyoming.MAX_READ_AHEAD_BYTES)
        reader.feed_data(b"y" * 40_000 + b'"}}\n')
        await wyoming.read_event(read, 5, 5)

    with pytest.raises(wyoming.BadEvent, match="event header: over"):
        asyncio.run(read_long_line())


def _wire(event: Event) -> bytes:
    data = json.dumps(event.data).encode()
    return json.dumps({"type": event.type, "data_length": len(data)}).encode() + b"\n" + data
