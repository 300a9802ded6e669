"""The console's event streams against the HTTP listener's connection slots: a stream holds
its connection for as long as its page is open, so one host's streams gave up none at the
cap (`limits.py`) and one client could open as many as it liked. Each test starts the real
daemon (the tone engine) and follows /console/events with aiohttp, as a page's fetch does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np

from cosyvoiced.intake.console import MAX_STREAMS_PER_CLIENT, TOO_MANY_STREAMS
from tests.audiofile import read_audio
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until

TONE = "tests.engines.faulty:load"
HOG = "127.0.0.2"  # another host, as loopback sees it (all of 127/8 is this machine)
NEWCOMER = "127.0.0.1"
VIEWER_KEY, OTHER_KEY = "sk-streams-viewer-01", "sk-streams-other-02"
# The newcomer tries this long: past crowding.QUIET_S (5 s, the quiet that a WebSocket
# needs before it gives way), and a loaded machine's scheduling.
LET_IN_S = 10.0
TIMEOUT_S = 15.0


def _daemon(make_daemon: DaemonFactory, tmp_path: Path, **http: object) -> tuple[Daemon, str]:
    listen = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(engine={"name": TONE}, http={"listen": listen, **http})
    daemon.start()
    return daemon, f"http://{listen}"


def _session(source: str) -> aiohttp.ClientSession:
    """A client on `source`, with no cap of its own on the connections it opens."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(source, 0), limit=0),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))


@contextlib.asynccontextmanager
async def _streams(session: aiohttp.ClientSession, base: str, count: int,
                   key: str = "") -> AsyncIterator[list[aiohttp.ClientResponse]]:
    """`count` event streams, each open (200, its first event read) until the `with` ends."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    opened: list[aiohttp.ClientResponse] = []
    try:
        for _ in range(count):
            reply = await session.get(f"{base}/console/events", headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=None))
            opened.append(reply)
            assert reply.status == 200, (reply.status, await reply.text())
            async with asyncio.timeout(TIMEOUT_S):
                assert (await reply.content.readuntil(b"\n\n")).startswith(b"event: ")
        yield opened
    finally:
        for reply in opened:
            reply.close()


async def _ended(reply: aiohttp.ClientResponse) -> bool:
    """Whether the daemon closed this stream (its page would open another)."""
    try:
        async with asyncio.timeout(0.5):
            while await reply.content.readany():
                pass
        return True
    except TimeoutError:
        return False
    except aiohttp.ClientError:
        return True


async def _speak(session: aiohttp.ClientSession, base: str) -> tuple[int, bytes]:
    body = {"model": "tts-1", "voice": "tone", "input": "Let me in.", "response_format": "wav"}
    async with session.post(f"{base}/v1/audio/speech", json=body,
                            headers={"Connection": "close"}) as reply:
        return reply.status, await reply.read()


def test_a_host_holding_every_slot_with_console_streams_gives_one_up(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Event streams never gave way at the cap: a host that opened max_connections of them
    (reading a keepalive every 15 s) locked every other host out of speech, voices and the
    console for good (503 at every try for 14 s, nothing given up). One of them is given
    up now, at once, for another host's newcomer."""
    daemon, base = _daemon(make_daemon, tmp_path, max_connections=MAX_STREAMS_PER_CLIENT)

    async def hog_then_speak() -> tuple[float, int, bytes, list[bool]]:
        async with _session(HOG) as hog, _session(NEWCOMER) as newcomer, \
                _streams(hog, base, MAX_STREAMS_PER_CLIENT) as held:
            began = time.monotonic()
            status, audio = await _speak(newcomer, base)
            while status == 503 and time.monotonic() - began < LET_IN_S:
                await asyncio.sleep(0.5)
                status, audio = await _speak(newcomer, base)
            waited = time.monotonic() - began
            return waited, status, audio, [await _ended(reply) for reply in held]

    waited, status, audio, ended = asyncio.run(hog_then_speak())
    print(f"the newcomer got {status} after {waited:.2f} s")
    assert status == 200, f"the newcomer got {status} for {waited:.1f} s"
    samples, rate = read_audio(audio)
    assert len(samples) > rate // 10, "under 0.1 s of audio"
    assert float(np.abs(samples).max()) > 0.01
    assert waited < 5.0, f"the newcomer waited {waited:.1f} s for a slot"
    assert ended.count(True) == 1, ended
    given_up = wait_until(lambda: daemon.log_events("connections_given_up"), TIMEOUT_S,
                          "the stream given up to be logged")
    assert (given_up[0]["address"], given_up[0]["newcomer"]) == (HOG, NEWCOMER)


def test_a_key_over_its_streams_is_refused_and_others_are_not(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """One key could open as many streams as it liked, from any number of hosts (or behind
    a proxy, where no host holds more than another): every slot of http.max_connections.
    Past MAX_STREAMS_PER_CLIENT it gets 429 `too_many_streams`; another key does not, and
    the key gets one again once one of its own is closed."""
    keys = tmp_path / "api_keys"
    keys.write_text(f"viewer {VIEWER_KEY}\nother {OTHER_KEY}\n")
    daemon, base = _daemon(make_daemon, tmp_path, api_keys_file=str(keys))

    async def open_too_many() -> None:
        async with _session(NEWCOMER) as here, _session(HOG) as there, \
                _streams(here, base, MAX_STREAMS_PER_CLIENT - 1, VIEWER_KEY), \
                _streams(there, base, 1, VIEWER_KEY) as last:
            await _refused(there, base, VIEWER_KEY)  # the same key, from another host
            await _refused(here, base, VIEWER_KEY)
            async with _streams(here, base, 1, OTHER_KEY):
                pass
            last[0].close()  # a page closed: the key has room again, soon
            await _let_in(here, base, VIEWER_KEY)

    asyncio.run(open_too_many())
    refused = wait_until(lambda: daemon.log_events("console_streams_refused"), TIMEOUT_S,
                         "the refusals to be counted in the log")
    assert refused[0]["client"] == "viewer"  # the key's name, never the key
    assert refused[0]["count"] >= 1


def test_a_host_over_its_streams_is_refused_without_keys(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Without keys a client is its host: every loopback peer is the operator, but each
    address holds its own MAX_STREAMS_PER_CLIENT."""
    _, base = _daemon(make_daemon, tmp_path)

    async def open_too_many() -> None:
        async with _session(HOG) as hog, _session(NEWCOMER) as newcomer, \
                _streams(hog, base, MAX_STREAMS_PER_CLIENT):
            await _refused(hog, base)
            async with _streams(newcomer, base, 1):
                pass

    asyncio.run(open_too_many())


async def _refused(session: aiohttp.ClientSession, base: str, key: str = "") -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(f"{base}/console/events", headers=headers) as reply:
        assert reply.status == 429, reply.status
        error = (await reply.json())["error"]
        assert error["code"] == TOO_MANY_STREAMS, error
        assert f"{MAX_STREAMS_PER_CLIENT} console event streams" in error["message"]
        assert int(reply.headers["Retry-After"]) >= 1


async def _let_in(session: aiohttp.ClientSession, base: str, key: str) -> None:
    """A stream for `key`, retried as the page does until its closed one is seen gone."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        async with session.get(f"{base}/console/events",
                               headers={"Authorization": f"Bearer {key}"}) as reply:
            if reply.status == 200:
                return
            assert reply.status == 429, reply.status
        assert time.monotonic() < deadline, "the key never got a stream again"
        await asyncio.sleep(0.2)
