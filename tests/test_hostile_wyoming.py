"""The Wyoming intake against hostile or careless clients: silent and slow connections,
too many of them, too many requests at once, events the handler cannot use, and clients
that never read what they asked for (their audio must not stay in the daemon's memory)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe
from wyoming.ping import Ping
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from cosyvoiced import config
from cosyvoiced.config import WyomingConfig
from cosyvoiced.intake import wyoming as wyoming_intake
from cosyvoiced.intake.reply import Released, Submission
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, bounded, free_port, peak_rss_bytes, wait_until

TONE = {"name": "tests.engines.faulty:load"}
IDLE_TIMEOUT_S = 4.0
READ_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 3
MAX_PENDING_PER_CLIENT = 2
WAIT_S = 30.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("hostile-wyoming"), engine=TONE,
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}",
                              "idle_timeout_s": IDLE_TIMEOUT_S,
                              "read_timeout_s": READ_TIMEOUT_S,
                              "max_connections": MAX_CONNECTIONS,
                              "max_pending_per_client": MAX_PENDING_PER_CLIENT})
    running.start()
    yield running
    running.stop()


def _address(daemon: Daemon) -> tuple[str, int]:
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    return host, int(port)


async def _read(client: AsyncTcpClient, timeout_s: float = WAIT_S) -> Event | None:
    return await asyncio.wait_for(client.read_event(), timeout_s)


async def _error_then_closed(client: AsyncTcpClient) -> Error:
    event = await _read(client)
    assert event is not None, "expected an error; the connection was closed"
    assert Error.is_type(event.type), f"expected an error: {event}"
    assert await _read(client) is None, "the connection is closed after the error"
    return Error.from_event(event)


async def _send_raw(client: AsyncTcpClient, raw: bytes) -> None:
    assert client._writer is not None  # bytes the library would never send
    client._writer.write(raw)
    await client._writer.drain()


async def _closed_after(client: AsyncTcpClient) -> float:
    """Seconds until the server closes the connection (events before that are skipped)."""
    began = time.monotonic()
    while await _read(client) is not None:
        pass
    return time.monotonic() - began


# -- slow and silent clients ----------------------------------------------------------------
def test_a_silent_connection_is_closed_after_the_idle_timeout(daemon: Daemon) -> None:
    async def wait() -> float:
        async with AsyncTcpClient(*_address(daemon)) as client:
            return await _closed_after(client)

    assert IDLE_TIMEOUT_S - 0.5 < asyncio.run(wait()) < IDLE_TIMEOUT_S + 3


def test_a_client_that_keeps_talking_is_not_idle(daemon: Daemon) -> None:
    async def talk() -> None:
        async with AsyncTcpClient(*_address(daemon)) as client:
            for _ in range(int(IDLE_TIMEOUT_S * 1.5)):
                await client.write_event(Ping().event())
                event = await _read(client)
                assert event is not None
                assert event.type == "pong"
                await asyncio.sleep(1.0)

    asyncio.run(talk())


@pytest.mark.parametrize("raw", [
    b'{"type": "pi',  # a header line begun and never ended
    b'{"type": "synthesize", "data_length": 40}\n{"text": ',  # data that stops coming
], ids=["header", "data"])
def test_an_event_that_stops_midway_is_closed_after_the_read_timeout(daemon: Daemon,
                                                                     raw: bytes) -> None:
    async def stall() -> tuple[float, Error]:
        async with AsyncTcpClient(*_address(daemon)) as client:
            await _send_raw(client, raw)
            began = time.monotonic()
            error = await _error_then_closed(client)
            return time.monotonic() - began, error

    elapsed, error = asyncio.run(stall())
    assert elapsed < IDLE_TIMEOUT_S - 1, "closed by the read timeout, not the idle one"
    assert error.code == "bad_request"
    assert "wyoming.read_timeout_s" in error.text


def test_a_client_that_stops_reading_is_closed_after_the_idle_timeout(daemon: Daemon) -> None:
    # Minutes of tone come at once (more than the sockets on the way hold), then the job
    # slows down: it is still running when the writes stall.
    text = f"{LONG_TEXT} " + " ".join(["SLOW@1."] * 30)
    queued = len(_wyoming_jobs(daemon))

    async def stall() -> tuple[list[str], float]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # our audio backs up soon
        sock.connect(_address(daemon))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(_event_bytes(Synthesize(text).event()))
        await writer.drain()
        began = time.monotonic()
        (job,) = wait_until(lambda: _wyoming_jobs(daemon)[queued:], WAIT_S, "the job")
        ended = wait_until(lambda: [e for e in daemon.log_events("job") if e["job"] == job],
                           IDLE_TIMEOUT_S + WAIT_S, "the stalled job to end")  # unread
        assert ended[0]["outcome"] == "cancelled", ended
        stalled_s = time.monotonic() - began
        types = []
        # Then what was sent before the server gave up: it drops what it still held, so
        # the last event may be cut short.
        async with asyncio.timeout(WAIT_S):
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while (event := await async_read_event(reader)) is not None:
                    types.append(event.type)
        writer.close()
        return types, stalled_s

    types, stalled_s = asyncio.run(stall())
    assert types[0] == "audio-start"
    assert "audio-stop" not in types, "the server waited for the client to read again"
    assert IDLE_TIMEOUT_S - 0.5 < stalled_s < IDLE_TIMEOUT_S + 10, \
        "cancelled by the idle timeout, while the job still had sentences to make"


def test_a_client_that_leaves_before_its_audio_begins_has_its_job_cancelled(
        daemon: Daemon) -> None:
    """Nothing read a connection while its `synthesize` waited to start: a client that hung
    up meanwhile left its job queued, to be run for nobody once the worker was free. The
    hang-up is seen now, and the job cancelled before it starts."""
    queued = len(_wyoming_jobs(daemon))

    async def leave_early() -> tuple[dict[str, Any], dict[str, Any]]:
        async with AsyncTcpClient(*_address(daemon)) as holder:  # holds the one worker
            await holder.write_event(Synthesize(text="SLOW@4 Holding the worker.").event())
            wait_until(lambda: _wyoming_jobs(daemon)[queued:], WAIT_S, "the first job")
            async with AsyncTcpClient(*_address(daemon)) as leaver:
                await leaver.write_event(Synthesize(text="Nobody will hear this.").event())
                (first, second) = wait_until(
                    lambda: len(_wyoming_jobs(daemon)[queued:]) == 2 and
                    _wyoming_jobs(daemon)[queued:], WAIT_S, "the second job")
            ended = wait_until(lambda: [e for e in daemon.log_events("job")
                                        if e["job"] in (first, second)], WAIT_S, "a job end")
            return ended[0], {"first": first, "second": second}

    ended, ids = asyncio.run(leave_early())
    assert ended["job"] == ids["second"], "the first job ended before the second was let go"
    assert ended["outcome"] == "cancelled", ended


@pytest.mark.parametrize(("sentences", "stop"), [
    (2, True),  # all in hand: it waited on its speaker after synthesize-stop
    (4, False),  # over its lookahead (2): it waited for room for the third
], ids=["after-stop", "waiting-for-room"])
def test_a_stream_whose_client_leaves_before_its_audio_begins_has_its_jobs_cancelled(
        daemon: Daemon, sentences: int, stop: bool) -> None:
    """Home Assistant hangs up a stream when its pipeline is interrupted. Nothing read the
    connection while a stream waited on its jobs: they stayed queued until the worker was
    free (3.71 s later), the first was then run for nobody (done, reply undelivered) and
    only then were the others cancelled. Now the hang-up is seen while they wait."""
    queued = len(_wyoming_jobs(daemon))

    async def leave_early() -> tuple[str, list[str]]:
        async with AsyncTcpClient(*_address(daemon)) as holder:  # holds the one worker
            await holder.write_event(Synthesize(text="SLOW@4 Holding the worker.").event())
            (holding,) = wait_until(lambda: _wyoming_jobs(daemon)[queued:], WAIT_S,
                                    "the holder's job")
            async with AsyncTcpClient(*_address(daemon)) as leaver:
                await leaver.write_event(SynthesizeStart().event())
                for n in range(1, sentences + 1):
                    await leaver.write_event(SynthesizeChunk(f"Sentence {n} is here. ").event())
                if stop:
                    await leaver.write_event(SynthesizeStop().event())
                leaving = wait_until(lambda: _wyoming_jobs(daemon)[queued + 1:][:2]
                                     if len(_wyoming_jobs(daemon)) >= queued + 3 else None,
                                     WAIT_S, "the stream's jobs")
            mine = set(leaving)
            wait_until(lambda: len([e for e in daemon.log_events("job")
                                    if e["job"] in mine | {holding}]) == 3, WAIT_S,
                       "all three jobs to end")
            return holding, leaving

    holding, leaving = asyncio.run(leave_early())
    assert len(_wyoming_jobs(daemon)) == queued + 3, "no job queued after the hang-up"
    ends = [e for e in daemon.log_events("job") if e["job"] in (holding, *leaving)]
    assert [e["job"] for e in ends][-1] == holding, \
        f"the stream's jobs were let go only once the worker was free: {ends}"
    assert [e["outcome"] for e in ends if e["job"] != holding] == ["cancelled"] * 2, ends


def _wyoming_jobs(daemon: Daemon) -> list[str]:
    return [e["job"] for e in daemon.log_events("job_queued") if e["source"] == "wyoming"]


# -- how many, how much -----------------------------------------------------------------------
def test_connections_over_max_connections_are_refused_at_once(daemon: Daemon) -> None:
    async def crowd() -> None:
        clients = [AsyncTcpClient(*_address(daemon)) for _ in range(MAX_CONNECTIONS)]
        for client in clients:
            await client.connect()
            await client.write_event(Ping().event())
            assert await _read(client) is not None  # served: it counts
        async with AsyncTcpClient(*_address(daemon)) as extra:
            assert (await _error_then_closed(extra)).code == "busy"
        await clients.pop().disconnect()

        async def served() -> bool:
            async with AsyncTcpClient(*_address(daemon)) as late:
                await late.write_event(Ping().event())
                event = await _read(late)
                return event is not None and event.type == "pong"

        deadline = time.monotonic() + WAIT_S
        while not await served():
            assert time.monotonic() < deadline, "a slot was not freed"
            await asyncio.sleep(0.1)
        for client in clients:
            await client.disconnect()

    asyncio.run(crowd())


HOG = "127.0.0.2"  # another host, as loopback sees it (all of 127/8 is this machine)


def _crowdable(make_daemon: DaemonFactory) -> Daemon:
    """A daemon of MAX_CONNECTIONS Wyoming connections that do not time out in a test."""
    daemon = make_daemon(engine=TONE, wyoming={
        "listen": f"tcp://127.0.0.1:{free_port()}", "idle_timeout_s": 60,
        "max_connections": MAX_CONNECTIONS})
    daemon.start()
    return daemon


def test_a_host_holding_every_connection_gives_an_idle_one_up_to_another_host(
        make_daemon: DaemonFactory) -> None:
    """One host's idle connections locked Home Assistant out until they timed out. Now the
    host holding more gives up an idle one (not one whose stream spoke in the last
    crowding.QUIET_S) for a host holding fewer; a newcomer from the host that holds more is
    still refused."""
    daemon = _crowdable(make_daemon)
    host, port = _address(daemon)

    async def crowd() -> None:
        hogged = [await asyncio.open_connection(host, port, local_addr=(HOG, 0))
                  for _ in range(MAX_CONNECTIONS)]
        streaming_reader, streaming = hogged[0]  # the oldest: it would go first if it could
        await async_write_event(SynthesizeStart().event(), streaming)
        for reader, writer in hogged:  # each one served: each one counted
            await async_write_event(Ping().event(), writer)
            assert await asyncio.wait_for(async_read_event(reader), WAIT_S) is not None
        async with AsyncTcpClient(host, port) as newcomer:
            await newcomer.write_event(Synthesize(text="Let me in.").event())
            events = []
            while (event := await _read(newcomer)) is not None and event.type != "audio-stop":
                events.append(event)
            assert event is not None, f"closed before its audio ended: {events}"
            chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
            samples = np.frombuffer(b"".join(c.audio for c in chunks), np.int16)
            assert len(samples) > chunks[0].rate // 10, "under 0.1 s of audio"
            assert np.abs(samples).max() > 300, "silence"
            assert await asyncio.wait_for(hogged[1][0].read(1), WAIT_S) == b"", \
                "the host's oldest idle connection was not closed"
            await async_write_event(Ping().event(), hogged[2][1])
            assert await asyncio.wait_for(async_read_event(hogged[2][0]), WAIT_S) is not None
            await async_write_event(SynthesizeStop().event(), streaming)  # still served
            ended = await asyncio.wait_for(async_read_event(streaming_reader), WAIT_S)
            assert ended is not None
            assert ended.type == "synthesize-stopped", ended
            extra = await asyncio.open_connection(host, port, local_addr=(HOG, 0))
            refusal = await asyncio.wait_for(async_read_event(extra[0]), WAIT_S)
            assert refusal is not None
            assert Error.from_event(refusal).code == "busy"
        for _, writer in [*hogged, extra]:
            writer.close()
            await writer.wait_closed()

    asyncio.run(crowd())
    given_up = daemon.log_events("wyoming_connection_given_up")
    assert [(e["address"], e["newcomer"]) for e in given_up] == [(HOG, "127.0.0.1")]


async def _until_stopped(reader: asyncio.StreamReader) -> AsyncIterator[Event]:
    while (event := await asyncio.wait_for(async_read_event(reader), WAIT_S)) is not None:
        yield event
        if event.type == "synthesize-stopped":
            return
    raise AssertionError("closed before its stream ended")


def test_a_host_holding_every_connection_with_quiet_streams_gives_one_up(
        make_daemon: DaemonFactory) -> None:
    """A connection with a stream open never counted as idle: one host's connections, each
    with a stream open and saying nothing (an empty chunk now and then keeps one open),
    held every slot for good. One with nothing in hand, quiet for crowding.QUIET_S, is
    given up for another host's newcomer."""
    daemon = _crowdable(make_daemon)
    host, port = _address(daemon)

    async def let_in() -> bool:
        try:
            async with AsyncTcpClient(host, port) as newcomer:
                await newcomer.write_event(Describe().event())
                answer = await _read(newcomer)
                return answer is not None and answer.type == "info"
        except ConnectionError:  # refused: its `busy`, then a reset
            return False

    async def crowd() -> None:
        hogged = [await asyncio.open_connection(host, port, local_addr=(HOG, 0))
                  for _ in range(MAX_CONNECTIONS)]
        try:
            await hog_then_come_in(hogged)
        finally:
            for _reader, writer in hogged:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def hog_then_come_in(
            hogged: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
        for reader, writer in hogged:  # each stream open (answered after its start)
            await async_write_event(SynthesizeStart().event(), writer)
            await async_write_event(Ping().event(), writer)
            assert await asyncio.wait_for(async_read_event(reader), WAIT_S) is not None
        # The oldest, which would go first, has half a sentence in hand: it stays.
        await async_write_event(SynthesizeChunk("Half a sent").event(), hogged[0][1])
        deadline = time.monotonic() + 15  # QUIET_S, and a loaded machine's
        while not await let_in():
            assert time.monotonic() < deadline, "the newcomer never got a slot"
            await asyncio.sleep(0.2)
        await async_write_event(SynthesizeChunk("ence. ").event(), hogged[0][1])
        await async_write_event(SynthesizeStop().event(), hogged[0][1])
        spoken = [event.type async for event in _until_stopped(hogged[0][0])]
        assert spoken.count("audio-stop") == 1, spoken

    asyncio.run(crowd())
    given_up = daemon.log_events("wyoming_connection_given_up")
    assert [(e["address"], e["newcomer"]) for e in given_up] == [(HOG, "127.0.0.1")]


def test_a_stream_keeps_max_pending_per_client_jobs_in_hand_and_speaks_them_all(
        daemon: Daemon) -> None:
    # An LLM writes faster than we speak: each ends unambiguously, so each is a job of its
    # own once its turn comes, and none is refused (busy) for coming early.
    sentences = ["The first one is slow SLOW@2 here. ",
                 *(f"Sentence {n} comes at once. " for n in range(2, 9))]
    queued = len(_wyoming_jobs(daemon))

    async def stream() -> list[Event]:
        async with AsyncTcpClient(*_address(daemon)) as client:
            await client.write_event(SynthesizeStart().event())
            for sentence in sentences:
                await client.write_event(SynthesizeChunk(sentence).event())
            await client.write_event(SynthesizeStop().event())
            events: list[Event] = []
            while not events or events[-1].type != "synthesize-stopped":
                event = await _read(client)
                assert event is not None
                events.append(event)
            return events

    events = asyncio.run(stream())
    assert not [Error.from_event(e) for e in events if Error.is_type(e.type)]
    assert [e.type for e in events].count("audio-stop") == len(sentences)
    jobs = _wyoming_jobs(daemon)[queued:]
    assert len(jobs) == len(sentences)
    # In the log's order: a job is queued only once fewer than the setting are in hand.
    in_hand, most = set(), 0
    for event in daemon.log_events():
        if event.get("event") == "job_queued" and event.get("job") in jobs:
            in_hand.add(event["job"])
            most = max(most, len(in_hand))
        elif event.get("event") == "job" and event.get("job") in jobs:
            in_hand.discard(event["job"])
    assert most == MAX_PENDING_PER_CLIENT


def test_streamed_text_that_says_nothing_is_read_at_a_pace(daemon: Daemon) -> None:
    """A stream's text that says nothing is dropped, so it never waited for the lookahead:
    chunks of 10,000 "。" (one-character sentences, split and checked on the intake's loop)
    were read as fast as the client could send them."""
    unsaid = SynthesizeChunk("。" * 10_000).event()

    async def flood_while_another_speaks() -> Event | None:
        async with AsyncTcpClient(*_address(daemon)) as flooding:
            await flooding.write_event(SynthesizeStart().event())
            for _ in range(4):
                await flooding.write_event(unsaid)
            await asyncio.to_thread(wait_until, lambda: daemon.log_events("unsaid_text_paced"),
                                    WAIT_S, "the stream to be paced")
            async with AsyncTcpClient(*_address(daemon)) as other:
                await other.write_event(Synthesize("Hello there.").event())
                return await _read(other)

    first = asyncio.run(flood_while_another_speaks())
    assert first is not None
    assert first.type == "audio-start", first
    assert daemon.log_events("unsaid_text_paced")[0]["source"] == "wyoming"


def test_a_stream_its_client_never_reads_is_closed_and_its_text_left_unread(
        daemon: Daemon) -> None:
    # Each sentence is 10 s of tone: a few fill the socket buffers between us.
    sentence = _event_bytes(SynthesizeChunk("A sentence of tone that takes a while to say, "
                                            "two hundred characters of it, made and sent "
                                            "whole to a client that will never read a byte of "
                                            "it, however long it waits for us. ").event())
    queued = len(_wyoming_jobs(daemon)) + len(daemon.log_events("request_refused"))
    sent, ended = [0], []

    def flood(sock: socket.socket) -> None:
        try:
            while True:
                sock.sendall(sentence)  # whole events: blocks once the server reads no more
                sent[0] += 1
        except ConnectionError as error:  # the server closed it, its text unread: reset
            ended.append(error)

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(_address(daemon))
        sock.sendall(_event_bytes(SynthesizeStart().event()))
        bounded(lambda: flood(sock), IDLE_TIMEOUT_S + WAIT_S)
    assert ended
    asked = len(_wyoming_jobs(daemon)) + len(daemon.log_events("request_refused")) - queued
    assert asked <= 20, f"{asked} jobs for a client that read nothing ({sent[0]} sentences sent)"
    wait_until(lambda: len([e for e in daemon.log_events("job") if e["job"] in
                            _wyoming_jobs(daemon)[queued:]]) == asked, WAIT_S,
               "its jobs to end")


# -- events the handler cannot use ----------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b'{"type": "synthesize", "data": {}}\n',
    b'{"type": "synthesize", "data": {"text": "Hi.", "voice": "tone"}}\n',
    b'{"type": "synthesize-start", "data": {"voice": 7}}\n',
    b'{"type": "synthesize", "data": {"text": "Hi.", "voice": {"language": 123}}}\n',
    b'{"type": "synthesize", "data": {"text": "Hi.", "voice": {"name": ["tone"]}}}\n',
    b'{"type": "synthesize-start", "data": {}}\n{"type": "synthesize-start", "data": {}}\n',
], ids=["no-text", "voice-not-an-object", "start-voice-not-an-object", "language-not-text",
        "name-not-text", "second-start"])
def test_a_synthesize_the_handler_cannot_use_gets_bad_request(daemon: Daemon,
                                                              raw: bytes) -> None:
    async def send() -> Error:
        async with AsyncTcpClient(*_address(daemon)) as client:
            await _send_raw(client, raw)
            return await _error_then_closed(client)

    assert asyncio.run(send()).code == "bad_request"
    assert daemon.process is not None
    assert daemon.process.poll() is None, "the daemon must outlive a client's event"


def test_a_payload_on_an_event_that_takes_none_is_refused(daemon: Daemon) -> None:
    async def send() -> Error:
        async with AsyncTcpClient(*_address(daemon)) as client:
            await _send_raw(client, b'{"type": "synthesize", "data": {"text": "Hi."}, '
                                    b'"payload_length": 1048576}\n')
            return await _error_then_closed(client)

    error = asyncio.run(send())
    assert error.code == "bad_request"
    assert error.text == ("synthesize: takes no payload (payload_length 1048576); no event "
                          "a TTS server takes has one")


def test_the_payload_of_an_event_we_ignore_is_read_and_thrown_away(daemon: Daemon) -> None:
    async def send() -> Event | None:
        async with AsyncTcpClient(*_address(daemon)) as client:
            sound = AudioChunk(rate=16000, width=2, channels=1, audio=bytes(300_000))
            await client.write_event(sound.event())  # not ours to handle: ignored
            await client.write_event(Ping(text="still here").event())
            return await _read(client)

    pong = asyncio.run(send())
    assert pong is not None
    assert (pong.type, pong.data) == ("pong", {"text": "still here"})


HELD_PAYLOADS = 100


def test_connections_holding_a_payload_back_hold_no_memory(make_daemon: DaemonFactory) -> None:
    """Each sent a ping announcing a 1 MiB payload and all of it but its last byte: the
    daemon kept each one's whole (250 of them grew the supervisor by 260 MiB) for up to
    read_timeout_s. None is kept now: a ping takes no payload, and is refused."""
    port = free_port()
    daemon = make_daemon(engine=TONE, wyoming={"listen": f"tcp://127.0.0.1:{port}"})
    daemon.start()
    assert daemon.process is not None
    # A first wave of 256 KiB each warms the allocator up (the reads of up to 256 KiB a
    # burst of connections has in hand at once grew the peak by 13 MiB the first time).
    _hold_payloads(port, HELD_PAYLOADS, 256 << 10)
    before = peak_rss_bytes(daemon.process.pid)
    _hold_payloads(port, HELD_PAYLOADS, 1 << 20)
    grown = peak_rss_bytes(daemon.process.pid) - before
    assert grown < 20 << 20, f"the supervisor's peak grew {grown >> 20} MiB"  # 77 MiB before


def _hold_payloads(port: int, connections: int, payload_length: int) -> None:
    """`connections` pings announcing a payload, each sent but its last byte; back once
    the server has closed every one of them."""
    header = json.dumps({"type": "ping", "payload_length": payload_length}).encode() + b"\n"
    held: list[socket.socket] = []
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            held.append(sock)
            with contextlib.suppress(ConnectionError):  # refused: closed before it all went
                sock.sendall(header + bytes(payload_length - 1))
        wait_until(lambda: all(_closed(sock) for sock in held), WAIT_S,
                   "the server to close every connection")
    finally:
        for sock in held:
            sock.close()


def _closed(sock: socket.socket) -> bool:
    """The server closed `sock` (what it sent before is skipped); False while it is open."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 16):
            pass
    except BlockingIOError:
        return False
    except ConnectionError:
        pass
    return True


@pytest.fixture
def in_process() -> Iterator[tuple[wyoming_intake.WyomingIntake, tuple[str, int]]]:
    """An intake with no supervisor behind it: submissions stay in its inbound queue."""
    port = free_port()
    intake = wyoming_intake.WyomingIntake(
        lambda: WyomingConfig(listen=f"tcp://127.0.0.1:{port}"), lambda: None)
    intake.start()
    yield intake, ("127.0.0.1", port)
    bounded(intake.stop, 10.0)



def test_an_error_while_handling_an_event_gets_internal(
        in_process: tuple[wyoming_intake.WyomingIntake, tuple[str, int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a handler bug (a test double)")

    monkeypatch.setattr(wyoming_intake, "Pong", broken)

    async def ping() -> Error:
        async with AsyncTcpClient(*in_process[1]) as client:
            await client.write_event(Ping().event())
            return await _error_then_closed(client)

    assert asyncio.run(ping()).code == "internal"


def test_stop_ends_a_connection_waiting_on_its_job_and_lets_the_job_go(
        in_process: tuple[wyoming_intake.WyomingIntake, tuple[str, int]]) -> None:
    intake, address = in_process
    connected = threading.Event()
    leave = threading.Event()

    def client() -> None:
        async def wait() -> None:
            async with AsyncTcpClient(*address) as speaking:
                await speaking.write_event(Synthesize("Never answered.").event())
                connected.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(speaking.read_event(), WAIT_S)
                leave.set()

        asyncio.run(wait())

    threading.Thread(target=client, daemon=True).start()
    assert connected.wait(WAIT_S)
    (submission,) = wait_until(lambda: list(intake.inbound()), WAIT_S, "the submission")
    assert isinstance(submission, Submission)
    assert bounded(intake.stop, 10.0) < 5.0
    assert leave.wait(WAIT_S), "the client saw its connection end"
    released = [m for m in intake.inbound() if isinstance(m, Released)]
    assert released == [Released(submission.job_id, gone=True)]


# -- memory -----------------------------------------------------------------------------------
LONG_TEXT = " ".join(f"Sentence {n} is long enough to give a few seconds of tone, and more, "
                     "and more still." for n in range(70))  # about 290 s of tone
NON_READERS = 20
RSS_TOLERANCE = 64 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _settled_rss(pid: int) -> int:
    """RSS once it stops changing (by 1 MiB in half a second)."""
    readings = [_rss(pid)]

    def settled() -> bool:
        time.sleep(0.5)
        readings.append(_rss(pid))
        return abs(readings[-1] - readings[-2]) < 1 << 20

    wait_until(settled, 30, "RSS to settle")
    return readings[-1]


def _done_jobs(daemon: Daemon) -> int:
    return sum(1 for e in daemon.log_events("job") if e.get("source") == "wyoming")


@pytest.mark.slow
def test_clients_that_never_read_leave_no_memory_behind(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "d", engine=TONE, spool={"max_text_chars": 8000},
                    wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"})
    try:
        # A fixed mmap threshold (glibc's otherwise rises after the first big free) gives
        # every audio buffer its own mapping, returned when freed: RSS then shows what is
        # still referenced, not how the heap happens to be fragmented.
        daemon.start(extra_env={"MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
        assert daemon.process is not None
        pid = daemon.process.pid
        asyncio.run(_non_readers(daemon, 2))  # warm up: allocator arenas, imports
        wait_until(lambda: _done_jobs(daemon) >= 2, 60, "the warm-up jobs")
        baseline = _settled_rss(pid)
        asyncio.run(_non_readers(daemon, NON_READERS))
        wait_until(lambda: _done_jobs(daemon) >= 2 + NON_READERS, 120, "the jobs to end")
        wait_until(lambda: _rss(pid) < baseline + RSS_TOLERANCE, 20,
                   f"RSS back near {baseline >> 20} MiB (it is {_rss(pid) >> 20} MiB)")
    finally:
        daemon.stop()


async def _non_readers(daemon: Daemon, count: int) -> None:
    """`count` clients ask for a long text, never read, wait for the job, then leave."""
    writers: list[asyncio.StreamWriter] = []
    before = _done_jobs(daemon)
    for _ in range(count):
        _reader, writer = await asyncio.open_connection(*_address(daemon))
        writer.write(_event_bytes(Synthesize(LONG_TEXT).event()))
        await writer.drain()
        writers.append(writer)
    deadline = time.monotonic() + 120
    while _done_jobs(daemon) < before + count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    for writer in writers:
        writer.transport.abort()  # gone, without reading a byte of its audio


def _event_bytes(event: Event) -> bytes:
    """The event as the wire has it (the library's writer needs a connected client)."""
    data = json.dumps(event.data).encode()
    return json.dumps({"type": event.type, "data_length": len(data)}).encode() + b"\n" + data


def test_the_example_config_documents_the_new_keys() -> None:
    example = (Path(__file__).resolve().parent.parent / "etc" / "cosyvoiced.toml").read_text()
    section = example.split("[wyoming]", 1)[1].split("\n[", 1)[0]
    for line in ("idle_timeout_s = 60.0", "read_timeout_s = 10.0", "max_connections = 256",
                 "max_pending_per_client = 16"):
        assert f"\n{line}\n" in section
