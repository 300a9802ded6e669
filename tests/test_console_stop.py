"""Stopping the daemon with console pages open: aiohttp waited for their event streams for
its whole shutdown timeout, then cut them. The test starts the real daemon (the tone
engine), follows /console/events with aiohttp as a page's fetch does, and sends SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp

from tests.conftest import DaemonFactory
from tests.daemon import free_port

TONE = "tests.engines.faulty:load"
STREAMS = 2  # the operator's log tail, and a second tab
STOP_S = 1.5  # with no stream open, the daemon stops in about 0.05 s
TIMEOUT_S = 15.0


async def _follow_then_stop(base: str, stop: Callable[[], None]) -> tuple[float, list[str]]:
    """`STREAMS` streams, each at its first event; then `stop()`: how long until every
    stream ended, and how each did ("clean", or the client's error)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        streams = []
        for _ in range(STREAMS):
            reply = await session.get(f"{base}/console/events")
            assert reply.status == 200, reply.status
            async with asyncio.timeout(TIMEOUT_S):
                await reply.content.readuntil(b"\n\n")
            streams.append(reply)

        async def ended(reply: aiohttp.ClientResponse) -> str:
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    while await reply.content.readany():
                        pass
            except (aiohttp.ClientError, TimeoutError) as error:
                return repr(error)
            return "clean"

        began = time.monotonic()
        stop()
        how = await asyncio.gather(*map(ended, streams))
        return time.monotonic() - began, how


def test_a_stop_ends_the_console_s_streams_at_once_and_cleanly(
        make_daemon: DaemonFactory) -> None:
    """With one event stream open, stopping took 4.05 s (0.05 s without), and the page saw
    its chunked body cut (TransferEncodingError), not its end."""
    listen = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(engine={"name": TONE}, http={"listen": listen})
    daemon.start()
    took, how = asyncio.run(_follow_then_stop(f"http://{listen}",
                                              lambda: daemon.signal(signal.SIGTERM)))
    assert how == ["clean"] * STREAMS, how
    assert daemon.wait_exit(TIMEOUT_S) == 0
    [stopping], [stopped] = daemon.log_events("stopping"), daemon.log_events("stopped")
    stop_s = (_at(stopped) - _at(stopping)).total_seconds()
    print(f"streams ended {took:.2f} s after SIGTERM; stopping -> stopped {stop_s:.2f} s")
    assert took < STOP_S, f"the streams ended {took:.2f} s after SIGTERM"
    assert stop_s < STOP_S, f"stopping -> stopped took {stop_s:.2f} s"


def _at(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(line["timestamp"]))
