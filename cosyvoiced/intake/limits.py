"""Connection limits for the aiohttp listeners (the HTTP intake, the metrics endpoint):
nginx's `client_header_timeout`, `keepalive_timeout`, `send_timeout` and `limit_conn`.

aiohttp bounds a request's size and closes a connection that idles between requests (its
`keepalive_timeout`; only its newest releases also close a fresh connection that never
sends). It does not bound how long a request's line and headers may take to arrive, how
long a response may wait for a client that reads none of it (its writer waits for the
client to drain, with no timeout: a client that pipelines requests and never reads held its
connection for good), nor how many connections are open. These live here, in the protocol
each connection gets (`_GuardedHandler`, aiohttp's `RequestHandler` with four checks
added); `listen` accepts connections with it, in place of aiohttp's own `TCPSite`. When the
cap is reached, the slots are shared between peer addresses (`crowding`): one host cannot
hold them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cosyvoiced import logs
from cosyvoiced.intake.crowding import AddressBook, peer_address

THROTTLE_INTERVAL_S = 10.0  # a repeated warning is logged at most this often, with a count
MAX_THROTTLED_CLIENTS = 1024  # clients whose repeated warnings are counted apart
# aiohttp reads a body nobody asked for this long after the response, so the client sees
# the response before its unread bytes make our close a reset; then the connection closes.
LINGER_S = 2.0
REFUSAL_CODE = "too_many_connections"
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, dropping what is unsent
RETRY_AFTER_S = 1

log = logs.get_logger("cosyvoiced.intake.limits")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float  # from a request's first byte to its last header
    idle_timeout_s: float  # with no request in hand: fresh, or kept alive after a response
    max_connections: int  # open at once; one more is answered 503 and closed
    # Writing stays paused (the client takes too little) twice this long: reset. Twice, so
    # that the routes that time their own writes (a speech reply, an event stream) answer
    # first, naming their job; this bounds the writes no route times (aiohttp's own).
    send_timeout_s: float


class Throttled:
    """One warning that may repeat very often (an attack, a full file table): logged at most
    once per interval, with how many times it happened since the last line. Used on the
    loop's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: str,
                 interval_s: float = THROTTLE_INTERVAL_S, **fields: Any) -> None:
        self._loop = loop
        self._event = event
        self._interval_s = interval_s
        self._fields = fields
        self._count = 0
        self._latest: dict[str, Any] = {}
        self._next_at = 0.0
        self._pending: asyncio.TimerHandle | None = None

    def count(self, **latest: Any) -> None:
        """One more; `latest` (e.g. the error) goes into the next line."""
        self._count += 1
        self._latest = latest
        if self._pending is None:
            delay = max(0.0, self._next_at - self._loop.time())
            self._pending = self._loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._pending = None
        log.warning(self._event, count=self._count, **self._fields, **self._latest)
        self._count = 0
        self._next_at = self._loop.time() + self._interval_s


class ThrottledByClient:
    """`Throttled`, one per client: each client's line at most once per interval, so one
    client's flood neither floods the log nor hides another client's line. The most
    recently counted MAX_THROTTLED_CLIENTS are kept (one forgotten has its line pending
    still logged, and starts afresh). Used on the loop's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: str, **fields: Any) -> None:
        self._loop = loop
        self._event = event
        self._fields = fields
        self._clients: OrderedDict[str, Throttled] = OrderedDict()

    def count(self, client: str, **latest: Any) -> None:
        throttled = self._clients.pop(client, None)
        if throttled is None:
            throttled = Throttled(self._loop, self._event, **self._fields)
            while len(self._clients) >= MAX_THROTTLED_CLIENTS:
                self._clients.popitem(last=False)
        self._clients[client] = throttled
        throttled.count(client=client, **latest)


def _refusal(name: str, limit: int) -> bytes:
    """The whole 503 response for a connection over the cap, written without reading."""
    body = json.dumps({"error": {
        "message": f"{limit} connections are open ({name} max_connections); retry later",
        "type": "server_error", "param": None, "code": REFUSAL_CODE}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Retry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class _Listener:
    """What the connections of one listening socket share: those open, by address, and the
    counted log lines of those refused, closed for another host's, or cut off."""

    def __init__(self, name: str, limits: ConnectionLimits,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.book: AddressBook[_GuardedHandler] = AddressBook()
        self.refusal = _refusal(name, limits.max_connections)
        self.refused = Throttled(loop, "connections_refused", listener=name,
                                 max_connections=limits.max_connections)
        self.evicted = Throttled(loop, "connections_given_up", listener=name,
                                 max_connections=limits.max_connections)
        self.too_slow = Throttled(loop, "header_timeout", listener=name,
                                  header_timeout_s=limits.header_timeout_s)
        self.not_reading = Throttled(loop, "send_timeout_cut", listener=name,
                                     paused_s=2 * limits.send_timeout_s)


class _GuardedHandler(web.RequestHandler):
    """aiohttp's connection protocol, with a cap on open connections (shared between
    addresses), a deadline for the first byte of a fresh connection, one for each request's
    line and headers (slowloris), counted from its first byte, and one for a client that
    takes too little of what we send (asyncio pauses our writing until it does).

    It reads one piece of aiohttp's state: `_waiter` is pending while the connection waits
    for a request to be parsed (aiohttp's own keep-alive check reads it the same way)."""

    def __init__(self, manager: web.Server, listener: _Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._refused = False
        self._address = ""
        self._first_byte_deadline: asyncio.TimerHandle | None = None
        self._header_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self.session_idle: Callable[[], bool] | None = None  # see session_may_give_way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        self._address = peer_address(transport.get_extra_info("peername"))
        if listener.book.open >= listener.limits.max_connections and not self._room_made():
            self._refused = True
            listener.refused.count(address=self._address)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(listener.refusal)
            transport.close()  # after the refusal is written
            return
        listener.book.add(self._address, self)
        super().connection_made(transport)
        self._first_byte_deadline = self._loop.call_later(listener.limits.idle_timeout_s,
                                                          self._silent_too_long)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._listener.book.remove(self._address, self)
        self._stop_first_byte_clock()
        self._stop_header_clock()
        self._stop_send_clock()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self._loop.call_later(
                2 * self._listener.limits.send_timeout_s, self._took_too_little)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_send_clock()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._stop_first_byte_clock()
        super().data_received(data)
        if not self._awaiting_request():
            self._stop_header_clock()  # a whole request came, or this was its body
        elif data and self._header_deadline is None:
            self._header_deadline = self._loop.call_later(
                self._listener.limits.header_timeout_s, self._headers_too_slow)

    def _room_made(self) -> bool:
        """Close a connection of an address that holds more than ours, if one can go."""
        listener = self._listener
        other = listener.book.make_room(self._address, _GuardedHandler._can_give_way)
        if other is None:
            return False
        listener.evicted.count(address=other._address, newcomer=self._address)
        other.force_close()
        return True

    def _can_give_way(self) -> bool:
        """No request in hand: idle, or its line and headers not yet all in; or its open
        session (a WebSocket, a console event stream) says it has nothing in hand
        (`session_may_give_way`, `giving_way`)."""
        return self.transport is not None and (
            self._awaiting_request() or (self.session_idle is not None and self.session_idle()))

    def _awaiting_request(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    def _stop_first_byte_clock(self) -> None:
        if self._first_byte_deadline is not None:
            self._first_byte_deadline.cancel()
            self._first_byte_deadline = None

    def _silent_too_long(self) -> None:
        self._first_byte_deadline = None
        if self.transport is not None:
            self.force_close()

    def _stop_header_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _stop_send_clock(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _took_too_little(self) -> None:
        """Our writing stayed paused for 2 x send_timeout_s: the client is not reading. Reset,
        not closed: a close would wait to send what it never takes, and the kernel would
        keep its megabytes of send buffer until it gave up."""
        self._send_deadline = None
        if self.transport is not None:
            self._listener.not_reading.count()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.transport.abort()

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._awaiting_request() and self.transport is not None:
            self._listener.too_slow.count()
            self.force_close()


def session_may_give_way(request: web.Request, idle: Callable[[], bool]) -> None:
    """`request` opened a session that holds its connection (a WebSocket): while `idle()`,
    the connection may be closed for a newcomer of a less crowded address (crowding.py),
    as an idle keep-alive connection may."""
    if isinstance(request.protocol, _GuardedHandler):
        request.protocol.session_idle = idle


@contextlib.contextmanager
def giving_way(request: web.Request, idle: Callable[[], bool]) -> Iterator[None]:
    """`session_may_give_way` for the span of the `with` only: a session that ends with its
    connection still open (kept alive after a streamed response) leaves the next request
    on it in hand, never given up."""
    session_may_give_way(request, idle)
    try:
        yield
    finally:
        if isinstance(request.protocol, _GuardedHandler):
            request.protocol.session_idle = None


async def listen(runner: web.AppRunner, host: str, port: int, limits: ConnectionLimits,
                 name: str) -> asyncio.AbstractServer:
    """Accept connections for `runner` (set up) on host:port, each held to `limits`. Close
    the returned server before `runner.cleanup()`, which ends the connections."""
    server = runner.server
    assert server is not None, "the runner is set up first"
    loop = asyncio.get_running_loop()
    listener = _Listener(name, limits, loop)

    def connection() -> web.RequestHandler:
        return _GuardedHandler(server, listener, loop=loop, access_log=None,
                               keepalive_timeout=limits.idle_timeout_s,
                               lingering_time=LINGER_S)

    return await loop.create_server(connection, host, port, reuse_address=True)
