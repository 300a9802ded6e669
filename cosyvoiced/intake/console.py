"""The web console on the HTTP listener: the page at `/`, its static files, a pushed stream
of the board and the log tail (Server-Sent Events), and the operator's actions.

It runs on the HTTP intake's loop thread and owns no state of the daemon: every read and
every action is a question put to the supervisor's tick (`ask`), answered by `board.py`
against the service. The page itself (cosyvoiced/console/) is plain HTML, CSS and JS
modules, with relative URLs, so it works offline and behind a reverse proxy's sub-path.
Keys are the API's: with http.api_keys_file set, the stream and the actions need one
(`board.rights` says which). An action is held to its client's rate limit (a key's
rate_limit, else http.rate_limit; without keys a host's), counted apart from its speech so
that a client over its speech rate may still cancel; an action refused or not found is
logged as a count, at most once per limits.THROTTLE_INTERVAL_S.

An event stream holds its connection for as long as the page is open, so a client (a key;
without keys, a host) may hold at most MAX_STREAMS_PER_CLIENT of them, and at the
listener's cap each may be given up like an idle connection (limits.py, crowding.py): it
holds nothing its client would lose, as the page opens another and is sent the whole board.
When the listener stops, its event streams are ended first, each with a clean end of its
body (`end_streams`): aiohttp would wait for them for its whole shutdown timeout, then cut
them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol, TypeVar

from aiohttp import web

from cosyvoiced import board, clients, logs
from cosyvoiced.clients import Identity
from cosyvoiced.config import HttpConfig
from cosyvoiced.intake import limits
from cosyvoiced.logring import RING
from cosyvoiced.untrusted import NotJSON, json_value

T = TypeVar("T")
PAGE = "index.html"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                ".svg": "image/svg+xml"}
# An action's body is {"slot": N} or {"job": ID}: a few bytes, read within
# http.body_timeout_s like every body on this listener.
MAX_ACTION_BYTES = 4096
KEEPALIVE_S = 15.0  # a comment line, so proxies do not close a quiet stream
REFRESH_S = 1.0  # the board is looked at this often at least (progress moves)
SETTLE_S = 0.15  # after a wake, so a burst of log lines is one update
END_STREAMS_S = 0.5  # at shutdown, for the streams to write their last bytes
# A page follows the board on one stream. A few let one person keep the console open in a
# few tabs, or reload a page before its old stream is seen closed (within REFRESH_S); more
# only hold connections: one host's at the cap are given up to other hosts, but a client
# behind a proxy (one address for all) or one key used from many hosts is not a host
# holding more, and would keep every slot of http.max_connections.
MAX_STREAMS_PER_CLIENT = 4
TOO_MANY_STREAMS = "too_many_streams"
STREAMS_RETRY_AFTER_S = 2  # a stream closed by its page is seen gone within REFRESH_S
RATE_LIMITED = "rate_limit_exceeded"  # the API's code for it (http.py)
FORGET_IDLE_S = 60.0  # a full bucket is forgotten this often: bounded by active clients
# The page loads nothing from elsewhere; audio is played from blobs it makes.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; "
                               "img-src 'self' data: blob:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache"}

log = logs.get_logger("cosyvoiced.console")


class Host(Protocol):
    """The HTTP intake, as the console uses it."""

    async def ask(self, question: Callable[[Any], T], timeout_s: float = ...) -> T: ...

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None: ...

    async def read_body(self, request: web.Request, limit: int, setting: str) -> bytes: ...


def _from_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _nothing_in_hand() -> bool:
    """An event stream, whenever asked: closing it loses its client nothing (the page
    opens another, whose first event is the whole board)."""
    return True


def _refused(status: int, code: str, message: str) -> web.Response:
    """An OpenAI-shaped error, as the API's."""
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"
                                         if status < 500 else "server_error",
                                         "param": None, "code": code}}, status=status)


class Console:
    def __init__(self, host: Host, identify: Callable[[web.Request], Identity],
                 settings: Callable[[], HttpConfig]) -> None:
        self._host = host
        self._identify = identify  # raises the API's 401 for a missing or wrong key
        self._settings = settings
        self._boards = _Boards(host)
        self._streams: Counter[str] = Counter()  # open event streams by client (loop thread)
        self._streams_refused: limits.Throttled | None = None  # made on the loop's thread
        self._action_rates = clients.RateLimiter()  # by client (loop thread)
        self._next_forget = 0.0
        self._actions_refused: limits.Throttled | None = None  # made on the loop's thread
        self._following: set[asyncio.Task[None]] = set()  # each stream's loop (loop thread)
        self._ending = False  # the listener stops: no stream goes on or begins

    def add_routes(self, app: web.Application) -> None:
        app.add_routes([
            web.get("/", self._page),
            web.get("/console/static/{name}", self._static),
            web.get("/console/session", self._session),
            web.get("/console/events", self._events),
            # 100 Continue only for a good key, as the API's routes.
            web.post("/console/recycle", self._recycle,
                     expect_handler=self._host.expect_continue),
            web.post("/console/reload", self._reload,
                     expect_handler=self._host.expect_continue),
            web.post("/console/cancel", self._cancel,
                     expect_handler=self._host.expect_continue),
        ])
        app.on_shutdown.append(self.end_streams)

    async def end_streams(self, _app: web.Application) -> None:
        """Each event stream ends, its body closed as a finished one (the page reconnects
        to whatever serves next). A stream may be waiting on the tick, which is stopping
        this listener and answers nothing more: its loop is cancelled, not its handler."""
        self._ending = True
        for following in self._following:
            following.cancel()
        if self._following:
            await asyncio.wait(self._following, timeout=END_STREAMS_S)

    # -- who is asking ----------------------------------------------------------------------
    def _keys_on(self) -> bool:
        return bool(self._settings().api_keys_file)

    def _who(self, request: web.Request) -> tuple[Identity, board.Rights]:
        """The asker and its rights; a missing or wrong key is the API's 401."""
        if not self._keys_on():
            if _from_loopback(request):
                return board.OPERATOR, board.rights(None, keys_on=False)
            return self._identify(request), board.rights(None, keys_on=False, loopback=False)
        identity = self._identify(request)
        return identity, board.rights(identity, keys_on=True)

    # -- the page ---------------------------------------------------------------------------
    async def _page(self, _request: web.Request) -> web.StreamResponse:
        return _file(PAGE)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == PAGE or "/" in name or name.startswith("."):
            raise web.HTTPNotFound()
        return _file(name)

    async def _session(self, request: web.Request) -> web.StreamResponse:
        """Whether the page must ask for a key, and what this one may do. Without a key
        where keys are on: 401, which the page answers with its key form."""
        identity, rights = self._who(request)
        return web.json_response({"keys": self._keys_on(), "name": identity.name,
                                  "view": rights.view, "logs": rights.logs,
                                  "act": rights.act})

    # -- the stream -------------------------------------------------------------------------
    def _client(self, request: web.Request, identity: Identity) -> str:
        """Whose streams and actions count together: a key's, from wherever it is used;
        without keys, a host's (the operator's identity is every loopback peer's)."""
        return identity.client if self._keys_on() else f"peer:{request.remote or ''}"

    @staticmethod
    def _shown(client: str, identity: Identity) -> str:
        """A client as a log line names it: a host, or a key's name (never the key)."""
        return client if client.startswith("peer:") else identity.name

    async def _events(self, request: web.Request) -> web.StreamResponse:
        identity, rights = self._who(request)
        client = self._client(request, identity)
        if self._ending:  # a keep-alive connection's last request
            return _refused(503, "stopping", "the daemon is stopping")
        if self._streams[client] >= MAX_STREAMS_PER_CLIENT:
            return self._too_many_streams(client, identity)
        self._streams[client] += 1
        try:
            # It gives way whenever the listener's cap picks its host's connection.
            with limits.giving_way(request, _nothing_in_hand):
                return await self._follow(request, identity, rights)
        finally:
            self._streams[client] -= 1
            if not self._streams[client]:
                del self._streams[client]

    def _too_many_streams(self, client: str, identity: Identity) -> web.Response:
        if self._streams_refused is None:
            self._streams_refused = limits.Throttled(
                asyncio.get_running_loop(), "console_streams_refused",
                max_streams_per_client=MAX_STREAMS_PER_CLIENT)
        self._streams_refused.count(client=self._shown(client, identity))
        refusal = _refused(429, TOO_MANY_STREAMS, f"this client has {MAX_STREAMS_PER_CLIENT} "
                           "console event streams open, the most one client may hold at "
                           "once; close a console page, or retry later")
        refusal.headers["Retry-After"] = str(STREAMS_RETRY_AFTER_S)
        return refusal

    async def _follow(self, request: web.Request, identity: Identity,
                      rights: board.Rights) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})  # nginx: pass each event on at once
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:  # any thread: a log line came in
            loop.call_soon_threadsafe(woken.set)

        if rights.logs:
            RING.listen(wake)
        following = asyncio.create_task(self._stream(request, response, identity, rights,
                                                     woken))
        self._following.add(following)
        try:
            await following
        except (ConnectionResetError, TimeoutError):
            pass  # the page went away, or stopped reading: its stream ends here
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the handler's own (its client hung up): the loop goes with it
            # end_streams': the handler returns, and aiohttp ends the body cleanly
        finally:
            following.cancel()
            self._following.discard(following)
            RING.unlisten(wake)
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse,
                      identity: Identity, rights: board.Rights, woken: asyncio.Event) -> None:
        send = _Sender(response, self._settings().send_timeout_s)
        seen_line, shown = 0, ""
        # Until its connection is gone (the page left, or it gave way): aiohttp does not end
        # the handler, and a quiet stream's next write (a keepalive) may be 15 s away, all
        # that time counted against its client's streams.
        while _connected(request):
            woken.clear()
            if rights.logs:
                lines, seen_line = RING.since(seen_line)
                if lines:
                    await send.event("log", {"lines": lines})
            text = await self._boards.text(identity) or shown  # None: the tick is busy
            if text != shown:
                shown = text
                await send.event("board", text)
            if asyncio.get_running_loop().time() - send.last >= KEEPALIVE_S:
                await send.comment("keepalive")
            try:
                async with asyncio.timeout(REFRESH_S):
                    await woken.wait()
                await asyncio.sleep(SETTLE_S)
            except TimeoutError:
                pass

    # -- the actions ------------------------------------------------------------------------
    async def _acting(self, request: web.Request, on_daemon: bool = True) -> \
            tuple[Identity, dict[str, Any]] | web.Response:
        """The asker and the request's JSON body, or the refusal. `on_daemon`: an action on
        the daemon itself (recycle, reload), which needs the right to act; a cancel is
        checked against the job's owner instead. Every action counts against the client's
        rate, refused ones too: each costs this loop and, but for a 403, the tick."""
        identity, rights = self._who(request)
        client = self._client(request, identity)
        over = self._over_rate(client, identity)
        if over is not None:
            self._refuse_action(request, client, identity, RATE_LIMITED)
            return over
        if on_daemon and not rights.act:
            self._refuse_action(request, client, identity, "forbidden")
            return _refused(403, "forbidden", "this key may not act on the daemon: it needs "
                            "[http.keys.NAME] admin = true")
        # The intake's reader: a slow or endless body is cut off (408), a large one 413.
        data = await self._host.read_body(request, MAX_ACTION_BYTES,
                                          "a console action's body") \
            if request.can_read_body else b"{}"
        try:
            body = json_value(data)
        except NotJSON:
            body = None
        if not isinstance(body, dict):
            return _refused(400, "bad_json", "body: expected a JSON object")
        return identity, body

    def _over_rate(self, client: str, identity: Identity) -> web.Response | None:
        """429 rate_limit_exceeded, with Retry-After, for a client over its requests per
        minute (a key's rate_limit, else http.rate_limit); None: the action is counted."""
        settings = self._settings()
        key = None if identity.anonymous else settings.keys.get(identity.name)
        per_minute = key.rate_limit if key is not None and key.rate_limit is not None \
            else settings.rate_limit
        if not per_minute:
            return None
        now = time.monotonic()
        if now >= self._next_forget:
            self._action_rates.forget_idle(now)
            self._next_forget = now + FORGET_IDLE_S
        wait_s = self._action_rates.take(client, clients.RateLimit(per_minute), 0, now)
        if wait_s <= 0:
            return None
        retry = clients.retry_after_s(wait_s)
        refusal = _refused(429, RATE_LIMITED, f"this client is over its rate limit for "
                           f"console actions ({per_minute:g} per minute): retry in {retry} s")
        refusal.headers["Retry-After"] = str(retry)
        return refusal

    def _refuse_action(self, request: web.Request, client: str, identity: Identity,
                       code: str) -> None:
        """A refused or missed action, counted: one line per interval however many come."""
        if self._actions_refused is None:
            self._actions_refused = limits.Throttled(asyncio.get_running_loop(),
                                                     "console_actions_refused")
        self._actions_refused.count(path=request.path, code=code,
                                    client=self._shown(client, identity))

    async def _recycle(self, request: web.Request) -> web.StreamResponse:
        acting = await self._acting(request)
        if isinstance(acting, web.Response):
            return acting
        identity, body = acting
        slot = body.get("slot")
        if not isinstance(slot, int) or isinstance(slot, bool):
            return _refused(400, "invalid_field", "slot: expected a worker's slot number")
        done = await self._host.ask(lambda daemon: board.recycle(daemon, slot, identity.name))
        if not done:
            return _refused(404, "not_found", f"slot: no worker in slot {slot}")
        return web.json_response({"recycling": slot})

    async def _reload(self, request: web.Request) -> web.StreamResponse:
        acting = await self._acting(request)
        if isinstance(acting, web.Response):
            return acting
        identity, _body = acting
        board.reload(identity.name)
        return web.json_response({"reloading": True})

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        acting = await self._acting(request, on_daemon=False)
        if isinstance(acting, web.Response):
            return acting
        identity, body = acting
        job_id = body.get("job")
        if not isinstance(job_id, str) or not job_id:
            return _refused(400, "invalid_field", "job: expected a job id")
        if not await self._host.ask(lambda daemon: board.cancel(daemon, job_id, identity)):
            self._refuse_action(request, self._client(request, identity), identity,
                                "not_found")
            return _refused(404, "not_found", f"job: no job {job_id!r} in progress that this "
                            "key may cancel")
        return web.json_response({"cancelled": job_id})


# Whom every anonymous viewer is on the board: no one. Its stream's connection owns no job,
# so all of them see the same board, taken once for all (each was a snapshot a second).
_ANONYMOUS_VIEWER = Identity(owner="", client="console")


class _Boards:
    """The board as each client sees it, taken once for all of its event streams within
    SETTLE_S: a client that opens hundreds of streams costs the supervisor's tick (and this
    loop's JSON) what one stream does, and so do all anonymous viewers together."""

    def __init__(self, host: Host) -> None:
        self._host = host
        # (owner, admin), all a snapshot depends on -> (when taken, its JSON)
        self._taken: dict[tuple[str, bool], tuple[float, asyncio.Task[str | None]]] = {}

    async def text(self, identity: Identity) -> str | None:
        """The board's JSON; None when the tick did not answer in time (busy or stuck)."""
        now = asyncio.get_running_loop().time()
        if identity.anonymous and not identity.admin:
            identity = _ANONYMOUS_VIEWER
        key = (identity.owner, identity.admin)
        taken = self._taken.get(key)
        if taken is None or now - taken[0] >= SETTLE_S:
            self._taken = {k: v for k, v in self._taken.items() if now - v[0] < REFRESH_S}
            taken = self._taken[key] = (now, asyncio.create_task(self._take(identity)))
        # Shielded: a stream that ends meanwhile does not cancel the others' snapshot.
        return await asyncio.shield(taken[1])

    async def _take(self, identity: Identity) -> str | None:
        try:
            return json.dumps(await self._host.ask(
                lambda daemon: board.snapshot(daemon, identity)))
        except TimeoutError:
            return None


class _Sender:
    """Server-Sent Events on a response; a client that takes nothing for `timeout_s` ends
    its stream (its writes would pile up here)."""

    def __init__(self, response: web.StreamResponse, timeout_s: float) -> None:
        self._response = response
        self._timeout_s = timeout_s
        self.last = 0.0

    async def _write(self, data: str) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._response.write(data.encode())
        self.last = asyncio.get_running_loop().time()

    async def event(self, name: str, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        await self._write(f"event: {name}\ndata: {text}\n\n")

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n")


def _file(name: str) -> web.StreamResponse:
    """One of the page's files, shipped as package data."""
    suffix = name[name.rfind("."):] if "." in name else ""
    if suffix not in STATIC_TYPES:
        raise web.HTTPNotFound()
    try:
        data = resources.files("cosyvoiced").joinpath("console", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise web.HTTPNotFound() from None
    return web.Response(body=data, content_type=STATIC_TYPES[suffix],
                        charset="utf-8", headers=SECURITY_HEADERS)

