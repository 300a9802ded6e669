"""Wyoming connections refused at wyoming.max_connections are counted and logged at most
once per interval, as HTTP's and ZeroMQ's are: a flood of connect-and-close made one warning
line each. A real daemon; the `wyoming` client holds the slots, raw sockets flood."""

from __future__ import annotations

import asyncio
import json
import socket

from wyoming.client import AsyncTcpClient
from wyoming.ping import Ping

from cosyvoiced import config
from cosyvoiced.intake.limits import THROTTLE_INTERVAL_S
from tests.conftest import DaemonFactory
from tests.daemon import free_port, wait_until

TONE = {"name": "tests.engines.faulty:load"}
MAX_CONNECTIONS = 2
FLOOD = 300  # the probe's: 300 connect-and-close cycles (each made a line)
WAIT_S = 10.0


def _refused_once(address: tuple[str, int]) -> dict[str, object]:
    """Connect, read the refusal up to the close, close: one connection of the flood."""
    with socket.create_connection(address, timeout=WAIT_S) as sock:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return dict(json.loads(data.split(b"\n", 1)[0]))


def test_a_flood_of_refused_connections_is_logged_once_per_interval_with_a_count(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine=TONE, wyoming={
        "listen": f"tcp://127.0.0.1:{free_port()}", "idle_timeout_s": 60,
        "max_connections": MAX_CONNECTIONS})
    daemon.start()
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    address = (host, int(port))

    async def flood() -> None:
        held = [AsyncTcpClient(*address) for _ in range(MAX_CONNECTIONS)]
        for client in held:  # every slot taken (a ping answered: it counts)
            await client.connect()
            await client.write_event(Ping().event())
            assert await asyncio.wait_for(client.read_event(), WAIT_S) is not None
        for _ in range(FLOOD):  # each refused, and its client told why
            header = await asyncio.to_thread(_refused_once, address)
            assert header["type"] == "error", header
        for client in held:
            await client.disconnect()

    asyncio.run(flood())

    def counted() -> int:
        return sum(int(line.get("count", 1))
                   for line in daemon.log_events("wyoming_connection_refused"))

    # The first refusal's line at once, the rest in one line an interval later.
    wait_until(lambda: counted() >= FLOOD, THROTTLE_INTERVAL_S + WAIT_S, "every refusal counted")
    lines = daemon.log_events("wyoming_connection_refused")
    assert counted() == FLOOD
    assert len(lines) <= 2, f"{len(lines)} lines for {FLOOD} refusals"
    assert lines[-1]["max_connections"] == MAX_CONNECTIONS
    assert lines[-1]["address"] == host
