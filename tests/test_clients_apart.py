"""Clients kept apart: jobs belong to who made them, every client gets its turn, anonymous
clients share one bounded class, and API keys have rate limits and usage figures. Real
daemon, real clients (`openai`, `wyoming`, the ZeroMQ Client)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.event import async_write_event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart

from cosyvoiced import config
from cosyvoiced.client import Client, DaemonError
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until

FAULTY = "tests.engines.faulty:load"
ALICE, BOB, CAROL, ROOT = "sk-alice-0001", "sk-bob-0002", "sk-carol-0003", "sk-root-0004"
FLOOD = 40  # refused requests of one key, in a few tenths of a second


def _keyed_daemon(make_daemon: DaemonFactory, tmp_path: Path, max_pending_per_client: int = 64,
                  **sections: dict[str, Any]) -> Daemon:
    keys = tmp_path / "api_keys"
    keys.write_text(f"alice {ALICE}\nbob {BOB}\ncarol {CAROL}\nroot {ROOT}\n")
    daemon = make_daemon(engine={"name": FAULTY},
                         http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys),
                               "rate_limit": 2,
                               "max_pending_per_client": max_pending_per_client},
                         http__keys__bob={"rate_limit": 0},
                         http__keys__carol={"rate_limit": 0, "chars_per_minute": 30},
                         http__keys__root={"admin": True, "rate_limit": 0},
                         metrics={"listen": f"127.0.0.1:{free_port()}"}, **sections)
    daemon.start()
    return daemon


def _openai(daemon: Daemon, key: str) -> openai.OpenAI:
    listen = config.load(daemon.config_path).http.listen
    return openai.OpenAI(base_url=f"http://{listen}/v1", api_key=key, max_retries=0, timeout=60)


def _speak(client: openai.OpenAI, text: str) -> bytes:
    return client.audio.speech.create(model="tts-1", voice="tone", input=text,
                                      response_format="pcm").content


def _metric(daemon: Daemon, line_start: str) -> float:
    listen = config.load(daemon.config_path).metrics.listen
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(line_start)]
    return sum(values)


def test_a_key_over_its_rate_gets_429_rate_limit_exceeded_with_retry_after(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = _keyed_daemon(make_daemon, tmp_path)
    with _openai(daemon, ALICE) as alice, _openai(daemon, BOB) as bob, \
            _openai(daemon, CAROL) as carol:
        assert _speak(alice, "One.")
        assert _speak(alice, "Two.")
        with pytest.raises(openai.RateLimitError) as refused:
            _speak(alice, "Three.")
        assert refused.value.code == "rate_limit_exceeded"
        retry_after = int(refused.value.response.headers["Retry-After"])
        assert 1 <= retry_after <= 30  # 2 a minute: the next one in about 30 s
        for n in range(4):  # bob's own table: no limit, whatever alice did
            assert _speak(bob, f"Bob speaks {n}.")
        assert _speak(carol, "Twenty characters ok.")  # 21 of her 30 a minute
        with pytest.raises(openai.RateLimitError) as too_much:
            _speak(carol, "Another twenty chars.")
        assert "30 characters per minute" in str(too_much.value)
        for n in range(FLOOD):  # each refusal was a log line: the journal flooded
            with pytest.raises(openai.RateLimitError):
                _speak(alice, f"Again {n}.")
    # Usage per key: characters served, and seconds of audio (50 ms per character).
    assert _metric(daemon, 'cosyvoiced_client_characters_total{client="key:bob"}') == \
        sum(len(f"Bob speaks {n}.") for n in range(4))
    assert _metric(daemon, 'cosyvoiced_client_audio_seconds_total{client="key:alice"}') == \
        pytest.approx(0.05 * len("One.Two."), rel=0.05)
    said = daemon.log_events("rate_limited")
    assert [e["client"] for e in said if e["client"] == "carol"] == ["carol"]
    alices = [e for e in said if e["client"] == "alice"]
    assert said[0]["client"] == "alice"
    assert said[0]["count"] == 1  # her first, at once; the rest counted in one more line
    assert len(alices) <= 2, f"{len(alices)} lines for {FLOOD + 1} refusals"


def test_jobs_belong_to_who_made_them(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Another client's job is as if unknown: `status` and `cancel` answer not_found, and
    `stats` names none of its ids; an admin (the local admin token) may act on all."""
    daemon = _keyed_daemon(make_daemon, tmp_path)
    with Client(daemon.endpoint, timeout_s=30) as owner, \
            Client(daemon.endpoint, timeout_s=30) as stranger, \
            Client(daemon.endpoint, timeout_s=30, admin_token=daemon.admin_token()) as admin:
        job = owner.submit("SLOW@3 A long job of mine.")
        wait_until(lambda: owner.status(job)["state"] == "running", 30, "the job to start")
        for ask in (stranger.status, stranger.cancel):
            with pytest.raises(DaemonError) as refused:
                ask(job)
            assert refused.value.code == "not_found"
        assert job not in str(stranger.stats())
        assert job in admin.stats()["running"]
        assert admin.status(job)["state"] == "running"
        assert job in owner.stats()["running"]
        assert admin.cancel(job)["event"] == "cancelled"
        # An HTTP download is safe from ZeroMQ clients that see the running ids.
        text = "SLOW@2 An HTTP download that nobody else may cut short."
        heard: list[bytes] = []
        speaking = threading.Thread(target=lambda: heard.append(
            _speak(_openai(daemon, BOB), text)))
        speaking.start()
        http_job = wait_until(lambda: admin.stats()["running"], 30, "the HTTP job to start")[0]
        with pytest.raises(DaemonError) as refused:
            stranger.cancel(http_job)
        assert refused.value.code == "not_found"
        speaking.join(60)
        expected_s = 0.05 * len(text)  # the tone engine: 50 ms a character, whole
        assert len(heard[0]) / 2 / 24000 == pytest.approx(expected_s, rel=0.01)


async def _flood(daemon: Daemon, connections: int, jobs_each: int) -> list[AsyncTcpClient]:
    """Anonymous Wyoming clients that stream in `jobs_each` slow sentences each, and never
    read their audio. A stream keeps 4 of its sentences in hand as jobs at a time (one
    refused is no longer in hand: the next comes at once)."""
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    clients = [AsyncTcpClient(host, int(port)) for _ in range(connections)]
    for client in clients:
        await client.connect()
        await client.write_event(SynthesizeStart().event())
        for n in range(jobs_each):
            await client.write_event(SynthesizeChunk(text=f"SLOW@0.2 anonymous {n}. ").event())
    return clients


def test_a_key_is_served_promptly_while_anonymous_clients_flood_the_queue(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = _keyed_daemon(make_daemon, tmp_path,
                           wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"},
                           zmq={"max_pending": 64})
    loop = asyncio.new_event_loop()
    # 144 sentences, up to 72 in hand at once: more than the anonymous half (32) of the queue.
    clients = loop.run_until_complete(_flood(daemon, connections=18, jobs_each=8))
    try:
        wait_until(lambda: len(daemon.log_events("request_refused")) >= 32, 30,
                   "anonymous requests refused once their half of the queue is taken")
        refused = daemon.log_events("request_refused")
        assert all("anonymous clients" in e["message"] for e in refused), refused[0]
        before = len(daemon.log_events("job"))
        assert _speak(_openai(daemon, BOB), "A client with a key.")
        def ended() -> list[str] | None:
            """Sources of the jobs ended since, once the keyed one's line is written (a
            job's line comes just after its reply)."""
            sources = [e["source"] for e in daemon.log_events("job")[before:]]
            return sources if "http" in sources else None

        sources = wait_until(ended, 10, "the keyed request's job line")
        # Served after at most the anonymous jobs in hand or next in turn, not after the
        # 30 or so that were queued before it.
        anonymous_first = sources.index("http")
        assert anonymous_first <= 3, f"{anonymous_first} anonymous jobs went first"
        assert len(daemon.log_events("job")) < 20, "the flood was still queued"
    finally:
        for client in clients:
            loop.run_until_complete(client.disconnect())
        loop.close()


async def _flood_from(host: str, port: int, source: str, connections: int,
                      jobs_each: int) -> list[asyncio.StreamWriter]:
    """As `_flood`, from the address `source` (another host, as loopback sees it)."""
    writers = []
    for _ in range(connections):
        _reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        await async_write_event(SynthesizeStart().event(), writer)
        for n in range(jobs_each):
            await async_write_event(SynthesizeChunk(text=f"SLOW@0.2 flood {n}. ").event(),
                                    writer)
        writers.append(writer)
    return writers


def test_one_hosts_anonymous_flood_leaves_another_host_room_and_its_turn(
        make_daemon: DaemonFactory) -> None:
    """Home Assistant (no key: Wyoming has none) was refused `busy` while another host's
    anonymous flood held every anonymous place, and would then have waited behind all of
    it. One host now holds at most half of those places, and hosts take turns."""
    daemon = make_daemon(engine={"name": FAULTY},
                         wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"},
                         zmq={"max_pending": 16})  # 8 anonymous places, 4 per host
    daemon.start()
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")

    async def run() -> None:
        flood = await _flood_from(host, int(port), "127.0.0.2", connections=6, jobs_each=8)
        refused = wait_until(lambda: daemon.log_events("request_refused"), 30,
                             "the flooding host's requests refused")
        assert "one host's anonymous clients" in refused[0]["message"], refused[0]
        before = len(daemon.log_events("job"))
        async with AsyncTcpClient(host, int(port)) as home:
            await home.write_event(Synthesize(text="Turn on the kitchen lights.").event())
            events = []
            while (event := await asyncio.wait_for(home.read_event(), 30)) is not None:
                assert event.type != "error", event
                events.append(event)
                if event.type == "audio-stop":
                    break
        flood_first = len(daemon.log_events("job")) - before
        chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
        samples = np.frombuffer(b"".join(c.audio for c in chunks), np.int16)
        seconds = len(samples) / chunks[0].rate
        assert seconds == pytest.approx(0.05 * 27, rel=0.01)  # the tone engine: 50 ms a char
        assert np.abs(samples).max() > 300, "silence"
        # After at most the flood's job in hand and the one next in turn, not after its
        # places' worth (and the places freed as its streams went on).
        assert flood_first <= 3, f"{flood_first} of the flood's jobs went first"
        for writer in flood:
            writer.transport.abort()

    asyncio.run(run())


def _submit_until_refused(clients: list[Client], most: int) -> tuple[int, DaemonError]:
    """Submit slow jobs from `clients` in turn until one is refused: how many were
    accepted before it, and the refusal."""
    for n in range(most):
        try:
            clients[n % len(clients)].submit(f"SLOW@1 queued {n}.")
        except DaemonError as error:
            return n, error
    raise AssertionError(f"none of {most} submissions was refused")


def test_zeromq_connections_of_one_host_share_its_part_of_the_anonymous_places(
        make_daemon: DaemonFactory) -> None:
    """Each anonymous ZeroMQ connection was a client of its own: one host with two
    connections held every anonymous place. Its connections now share its part (4 here)."""
    port = free_port()
    daemon = make_daemon(engine={"name": FAULTY},
                         zmq={"bind": [f"tcp://127.0.0.1:{port}"], "max_pending": 16})
    daemon.start()
    from_other_host = f"tcp://127.0.0.2:0;127.0.0.1:{port}"  # libzmq's source address
    with Client(from_other_host) as first, Client(from_other_host) as second:
        accepted, refused = _submit_until_refused([first, second], 12)  # 8: all hosts'
    assert refused.code == "busy"
    assert "one host's anonymous clients" in refused.message, refused
    assert 4 <= accepted <= 5, accepted  # 4 waiting to start, and maybe 1 started
    with Client(f"tcp://127.0.0.1:{port}") as local:  # another host finds room
        assert local.submit("SLOW@1 from here.")


def _request_and_never_read(listen: str, key: str, text: str) -> socket.socket:
    host, port = listen.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps({"model": "tts-1", "voice": "tone", "input": text,
                       "response_format": "pcm"}).encode()
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                 b"application/json\r\nAuthorization: Bearer " + key.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_cache_hits_a_client_does_not_read_still_count_as_in_flight(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A cached result is made at once, but it is in flight (and in our memory) until the
    client has read it: a client that never reads cannot pile up whole results."""
    daemon = _keyed_daemon(make_daemon, tmp_path, max_pending_per_client=3,
                           cache={"max_bytes": "256MiB"}, spool={"max_text_chars": 4000})
    listen = config.load(daemon.config_path).http.listen
    text = " ".join(["A cached answer that takes a while to play."] * 60)  # ~130 s of audio
    with _openai(daemon, BOB) as bob:
        assert _speak(bob, text)  # now in the cache
        held = [_request_and_never_read(listen, BOB, text) for _ in range(3)]
        try:
            wait_until(lambda: len([e for e in daemon.log_events("job")
                                    if e.get("cached")]) >= 3, 30, "three cache hits")
            with pytest.raises(openai.RateLimitError) as refused:
                _speak(bob, "One more.")
            assert refused.value.code == "busy"
            assert "in flight" in str(refused.value)
            assert refused.value.response.headers["Retry-After"]
        finally:
            for sock in held:
                sock.close()
        # Once they are gone, the key may ask again.
        wait_until(lambda: _try_speak(bob, "One more."), 60, "the key's places back")


def _try_speak(client: openai.OpenAI, text: str) -> bool:
    try:
        return bool(_speak(client, text))
    except openai.RateLimitError:
        return False
