"""The ZeroMQ intake: one ROUTER socket for LAN clients (DEALER for streams, or REQ).

Two threads share the work and never wait on each other or on synthesis:
- the socket thread owns the ROUTER. It parses each request (malformed ones get their error
  reply right there) and passes good ones to the supervisor; it sends the replies the
  supervisor queues for it on an inproc PUSH/PULL pair, in order.
- the supervisor's thread answers ops and routes each job's events to its requester.
A reply that cannot be routed (the client went away) is reported back, and that client's
jobs are cancelled. What one peer can make the supervisor hold is bounded (zmq_peers.py):
the reply bytes it has not taken (zmq.max_buffered_bytes), its connection once it is idle
(zmq.idle_timeout_s), and the requests it sent that are not answered yet: INBOUND_ROOM wait
for the supervisor, which answers a tick's budget of them (tickbudget.py), and RCVHWM in
libzmq.

The socket thread reads bytes from anyone who can connect: whatever one message does to it,
that message gets an error reply and the thread goes on. Should the thread die anyway,
`failure()` says why, and every call from the supervisor's thread still returns: replies
and the stop are sent without blocking, and each wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from cosyvoiced import __version__, audio, clients, logs
from cosyvoiced.admission import (
    MAX_UPLOADS_AT_ONCE,
    MAX_UPLOADS_PER_CLIENT,
    TOTAL_BUFFERED_FACTOR,
    InFlight,
    PerClient,
    UploadSlots,
    holds_too_much,
    reply_fits,
)
from cosyvoiced.clients import Identity
from cosyvoiced.config import ZmqConfig
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.intake.crowding import QUIET_S, ip_host
from cosyvoiced.intake.service import IntakeService
from cosyvoiced.intake.tickbudget import TickBudget
from cosyvoiced.intake.zmq_peers import (
    ERROR_ROOM,
    NON_FINAL_EVENTS,
    Departures,
    Handoff,
    Outbox,
    Peer,
    Peers,
    shut_down,
)
from cosyvoiced.job import (
    PCM_FORMAT,
    REPLY_FORMATS,
    SINK_REPLY,
    Deferred,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    ResultAudio,
    new_job_id,
)
from cosyvoiced.jobspec import FIELDS, REPLY_ONLY, Limits, build_job
from cosyvoiced.protocol import Limits as WireLimits
from cosyvoiced.protocol import (
    Op,
    ProtocolError,
    Request,
    WireCode,
    encode_reply,
    error_reply,
    parse,
    quoted,
    split_envelope,
)

SOURCE = "zmq"
# Prompt audio comes as attachment frame 1, never as a name: a client has no inbox.
SUBMIT_FIELDS = tuple(name for name in FIELDS if name != "prompt_audio")
# `synthesize` also takes `stream`, which is read (and removed) before these are checked.
SYNTHESIZE_FIELDS = (*(name for name in SUBMIT_FIELDS if name not in ("output", "captions")),
                     *REPLY_ONLY)
# Ops whose attachment frame 1 is audio.
AUDIO_OPS = (Op.SYNTHESIZE, Op.SUBMIT, Op.REGISTER_VOICE)
_STOP = b"stop"
# [b"", _DROP, routing id]: that idle peer has no job, drop it (no routing id is empty).
_DROP = b"drop"
REFUSED_LOG_INTERVAL_S = 10.0
ZAP_DOMAIN = "cosyvoiced"  # every connection is authenticated (ZAP) in this domain
_BATCH = 256  # messages handled per socket per poll round, so neither side starves
# Requests waiting for the supervisor, at most (and their bytes, but one always fits). Past
# this the socket thread reads no more: the rest wait in libzmq's queue of each peer (RCVHWM
# messages), then in the peer's own, and libzmq reads those queues round-robin, so a client
# that pipelines thousands of requests waits behind itself, not ahead of the others.
INBOUND_ROOM = 64
INBOUND_BYTES = 32 << 20
RCVHWM = 4
_FULL_POLL_MS = 10  # how soon a socket thread that stopped reading looks for room again
_MONITOR_DRAIN_MS = 1000  # the socket thread reads connection events at least this often
STOP_TIMEOUT_S = 5.0  # for the socket thread to flush the last replies and end
_ROUTER_FLUSH_MS = 1000  # how long closing the ROUTER may spend sending the last replies
# Messages queued per peer. Streams are bursty (a cached 20-minute text is 2,400 chunks);
# their bytes are bounded by zmq.max_buffered_bytes, and a full HWM cancels the job.
SNDHWM = 10_000
# libzmq PINGs every peer this often, and drops one that sends nothing back for this long.
HEARTBEAT_IVL_S = 5.0
HEARTBEAT_TIMEOUT_S = 15.0
_IDLE_CHECK_S = 1.0  # how often peers are checked for zmq.idle_timeout_s
# A client whose connection ended has this long to reconnect with its routing id and keep
# its jobs (libzmq reconnects after 100 ms); then they are cancelled.
GONE_GRACE_S = 5.0
_MOST_DEPARTED = 4096  # routing ids waiting out the grace; past it, the oldest is gone

BUSY_DECODING = (f"{MAX_UPLOADS_AT_ONCE} voices' audio (at most {MAX_UPLOADS_PER_CLIENT} "
                 "of one client's) are being decoded now; retry once one is answered")

log = logs.get_logger("cosyvoiced.intake.zmq")


@dataclass(frozen=True)
class ClientGone:
    """A reply to this client could not be routed (it disconnected, or stopped reading), or
    its connection ended and it did not come back within GONE_GRACE_S."""

    client: bytes


# The replies that carry a job's output: one of them dropped, the client did not get it all.
JOB_OUTPUT = frozenset({"start", "chunk", "timing", "end", "result"})
# A `submit`'s one reply. The job is in the spool already and runs whatever becomes of it:
# an error in its place must name the job, or the client can neither ask for its `status`
# nor know not to send it again (and have it run twice).
ACCEPTED = "accepted"
# A job's own replies: its output, its end when it is cancelled (the same event answers a
# `cancel`, once for each job in flight), and `accepted`: one per job, so their errors are
# bounded as the jobs are (zmq.max_pending, ...). A `status` reply names a job too, but
# answers one request of as many as a client sends.
JOB_REPLIES = JOB_OUTPUT | {"cancelled", ACCEPTED}


@dataclass(frozen=True)
class ClientTooSlow:
    """A reply of this client's job was dropped: it left zmq.max_buffered_bytes unread."""

    client: bytes
    job: str
    event: str  # the reply's: one of JOB_REPLIES


@dataclass(frozen=True)
class IdlePeer:
    """This client sent nothing for zmq.idle_timeout_s: it is dropped unless it has jobs."""

    client: bytes


@dataclass(frozen=True)
class PromptRead:
    """A voice to register, whose audio the encoder process has decoded (or refused)."""

    request: Request
    prepared: Future[bytes]


# What the supervisor's thread is handed (by the socket thread; PromptRead by the encoder).
Inbound = Request | ClientGone | ClientTooSlow | IdlePeer | PromptRead


# Decodes and checks a voice's audio file away from the supervisor (Encoder.read_prompt).
PromptReader = Callable[[bytes], "Future[bytes]"]


class Service(IntakeService, Protocol):
    """What the ZeroMQ ops need from the supervisor."""

    def is_admin_token(self, token: Any) -> bool: ...

    def submit(self, fields: dict[str, Any], job_id: str, prompt: bytes | None,
               identity: Identity = ...) -> Job: ...

    def check_prompt(self, prompt: bytes | None) -> None: ...

    def job_status(self, job_id: str, identity: Identity = ...) -> dict[str, Any] | None: ...

    def stats(self, identity: Identity = ...) -> dict[str, Any]: ...


class _Gate(ThreadAuthenticator):
    """ZAP for every connection (NULL and CURVE alike): over zmq.max_connections, a new
    connection's handshake is refused and libzmq closes it, which frees its descriptor,
    unless a host holding more connections gives one up for it (`_Connections.admits`).
    Under it, pyzmq's own rules apply (CURVE keys, or NULL allowed)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], admits: Callable[[str], bool],
                 on_refused: Callable[[], None]) -> None:
        super().__init__(context)
        self._admits, self._on_refused = admits, on_refused
        self._address = ""  # the host of the handshake being answered (one at a time)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP's frames: version, request id, domain, address (the peer's host), ...
        self._address = ip_host(msg[3].decode(errors="replace")) if len(msg) >= 4 else ""
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        """A peer pyzmq lets in (its CURVE key checked) is let in only if there is room
        for it: room is never made (another host's connection given up) for a peer that
        would be refused anyway."""
        if status_code == b"200" and not self._admits(self._address):
            self._on_refused()
            status_code, status_text = b"400", b"too many connections"
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class _CountedWarning:
    """A warning a flood may repeat very often, from a thread with no event loop (the
    loops' threads have `limits.Throttled`): logged at most once per interval, with how
    many times it happened since the last line. One thread uses each."""

    def __init__(self, event: str, **fields: Any) -> None:
        self._event, self._fields = event, fields
        self._count = 0  # since the last line
        self._next_at = 0.0

    def count(self, **latest: Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next_at:
            log.warning(self._event, count=self._count, **self._fields, **latest)
            self._count, self._next_at = 0, now + REFUSED_LOG_INTERVAL_S


class _Connections:
    """How many peers are connected to the ROUTER, from its monitor's events.

    The ZAP thread reads the monitor itself before it decides: the socket thread may not
    have seen a new peer's ACCEPTED event yet when that peer's handshake reaches ZAP (a
    race CI caught). The socket thread drains it too, so events never pile up to the
    monitor's HWM and get dropped. The lock serialises the two threads' use of the one
    monitor socket (libzmq allows a socket to move between threads behind a barrier), and
    their use of the peers (each connection by descriptor, for zmq.idle_timeout_s)."""

    def __init__(self, limit: Callable[[], int], reading: Callable[[], bool]) -> None:
        self.count = 0
        self._limit = limit
        self._reading = reading  # the socket thread takes requests (the handoff has room)
        self._lock = threading.Lock()
        self._peers = Peers()
        self._left: list[bytes] = []  # routing ids whose connection ended, not yet taken
        self._monitor: zmq.Socket[bytes] | None = None
        self._refused = _CountedWarning("zmq_connections_refused")  # the ZAP thread's
        self._given_up = _CountedWarning(
            "zmq_connections_given_up", message="a host holding more connections gave one "
            "with nothing in hand up for another host's")  # the ZAP thread's
        self._working: Counter[bytes] = Counter()  # jobs in flight per routing id

    def watch(self, router: zmq.Socket[bytes]) -> None:
        self._monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)

    def unwatch(self, router: zmq.Socket[bytes]) -> None:
        with self._lock:
            if self._monitor is None:
                return
            with contextlib.suppress(zmq.ZMQError):
                router.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def drain(self) -> None:
        with self._lock:
            while self._monitor is not None:
                try:
                    event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    return
                self._seen(int(event["event"]), int(event["value"]))

    @contextlib.contextmanager
    def peers(self) -> Iterator[Peers]:
        with self._lock:
            yield self._peers

    def take_left(self) -> list[bytes]:
        """The routing ids whose connection ended since the last call."""
        with self._lock:
            left, self._left = self._left, []
        return left

    def admits(self, address: str) -> bool:
        """May a connection from `address` (at its handshake) stay? Yes under the cap; over
        it, if a host holding at least two more connections gives up one that has nothing
        in hand (crowding.py's rule, as for HTTP and Wyoming)."""
        self.drain()
        with self._lock:
            # The connection asking is counted already (it was accepted before its
            # handshake); those given up are not, though libzmq has not seen them go yet.
            if self.count - self._peers.leaving <= self._limit():
                return True
            now = time.monotonic()
            chosen = self._peers.make_room(address, lambda peer: self._can_go(peer, now))
            if chosen is None or not shut_down(chosen[0], chosen[1].inode):
                return False
            chosen[1].given_up = True
        self._given_up.count(address=chosen[1].address, newcomer=address)
        return True

    def _can_go(self, peer: Peer, now: float) -> bool:
        """Whether a connection has nothing in hand: it sent nothing yet, or it has no job
        (or voice upload) in flight, took all its replies, and neither asked nor was answered
        for QUIET_S (a request may wait for the supervisor that long with no job yet), while
        the socket thread reads requests (else one may wait unread in libzmq). Without
        ZMQ_SRCFD a silent connection may be a known client's: none can go."""
        if not self._peers.placed:
            return False
        if peer.client is None:
            return True
        return (not self._working[peer.client] and not peer.holding
                and now - peer.active >= QUIET_S and self._reading())

    def job_began(self, client: bytes) -> None:
        """(Supervisor thread) a job of `client`'s is in flight: its connection stays."""
        with self._lock:
            self._working[client] += 1

    def job_ended(self, client: bytes) -> None:
        with self._lock:
            self._working[client] -= 1
            if self._working[client] <= 0:
                del self._working[client]

    def holders(self, clients: frozenset[bytes]) -> None:
        """(Socket thread) the peers with replies not yet taken."""
        with self._lock:
            self._peers.holders(clients)

    def refused_one(self) -> None:
        """Logged at most once per interval, with a count: a flood must not flood the log."""
        self._refused.count(max_connections=self._limit(), connected=self.count)

    def _seen(self, event: int, fd: int) -> None:
        """`fd`: the connection's descriptor (the value of both events)."""
        if event == zmq.EVENT_ACCEPTED:
            self.count += 1
            self._peers.accepted(fd, time.monotonic())
        elif event == zmq.EVENT_DISCONNECTED:
            self.count = max(0, self.count - 1)
            self._left.extend(self._peers.disconnected(fd))


@dataclass(frozen=True)
class _Route:
    envelope: tuple[bytes, ...]
    request_id: str


class _SocketThread(threading.Thread):
    def __init__(self, router: zmq.Socket[bytes], replies: zmq.Socket[bytes],  # noqa: PLR0917
                 limits: Callable[[], WireLimits], inbound: Handoff[Inbound],
                 wake: Callable[[], None], connections: _Connections,
                 curve: bool, *, settings: Callable[[], ZmqConfig]) -> None:
        super().__init__(name="zmq-socket", daemon=True)
        self._curve = curve
        self._settings = settings  # read live: max_buffered_bytes, idle_timeout_s
        self._outbox = Outbox()
        self._errors_dropped = _CountedWarning(
            "zmq_error_replies_dropped", error_room_bytes=ERROR_ROOM,
            message="a peer left that many error replies unread")
        self._departures = Departures(GONE_GRACE_S, _MOST_DEPARTED)
        self._next_idle_check = 0.0
        self._connections = connections
        connections.watch(router)
        self._router = router
        self._replies = replies
        self._limits = limits
        self._inbound = inbound
        self._wake = wake
        self.failure: str | None = None  # why the thread died, if it did

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # a dead intake must never be silent
            self.failure = f"the zmq socket thread died: {type(error).__name__}: {error}"
            log.critical("intake_thread_died", intake="zmq", reason=self.failure,
                         exc_info=True)
            self._wake()  # the supervisor's tick notices at once
        finally:
            self._connections.unwatch(self._router)
            self._router.close(linger=_ROUTER_FLUSH_MS)  # flush the last replies
            self._replies.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        while True:
            room = self._inbound.has_room()
            poller.modify(self._router, zmq.POLLIN if room else 0)
            ready = dict(poller.poll(_MONITOR_DRAIN_MS if room else _FULL_POLL_MS))
            self._connections.drain()
            for client in self._connections.take_left():
                self._outbox.forget(client)
                self._give_up(self._departures.left(client, time.monotonic()))
            self._check_idle()
            if self._replies in ready and not self._send_replies():
                return
            if self._router in ready:
                self._take_requests()

    def _take_requests(self) -> None:
        for _ in range(_BATCH):
            if not self._inbound.has_room():
                return
            try:
                message = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame.bytes for frame in message]
            try:
                with self._connections.peers() as peers:
                    peers.heard(_source_fd(message[0]), frames[0], time.monotonic())
                self._departures.back(frames[0])
                # A user id is a CURVE key only with CURVE on (ZAP names NULL peers too).
                self._take(frames, _user_id(message[-1]) if self._curve else None,
                           _peer_host(message[-1]), sum(len(frame) for frame in frames))
            except Exception:  # one message must not end the thread
                log.error("zmq_message_failed", frames=len(frames), exc_info=True)
                self._send(error_reply(split_envelope(frames)[0], ProtocolError(
                    WireCode.INTERNAL, "the request could not be handled (an internal error; "
                    "it is logged)")))

    def _take(self, frames: list[bytes], user: str | None, host: str | None,
              size: int) -> None:
        route, body = split_envelope(frames)
        try:
            request = parse(route, body, self._limits())
        except ProtocolError as error:
            self._send(error_reply(route, error))
            return
        if self._refused_unread(request):
            return
        self._inbound.put(replace(request, user=user, host=host), size)
        self._wake()

    def _refused_unread(self, request: Request) -> bool:
        """A `synthesize` from a peer that has not taken its replies gets `busy`, as over
        HTTP: its audio would only pile up here (so does one that holds any while all
        peers together hold TOTAL_BUFFERED_FACTOR times the limit: `holds_too_much`)."""
        buffered = self._outbox.unread(request.client, time.monotonic())
        limit = self._settings().max_buffered_bytes
        if request.op != Op.SYNTHESIZE or \
                not holds_too_much(buffered, limit, self._outbox.total):
            return False
        log.debug("request_refused", source=SOURCE, code="busy", buffered_bytes=buffered)
        self._send(error_reply(request.route, ProtocolError(
            WireCode.BUSY, f"{_mib(buffered)} of replies to this client are not read yet "
            f"({self._bounds(limit)}); read them, then retry", request.id)))
        return True

    def _send_replies(self) -> bool:
        """Forward queued replies; False once told to stop."""
        for _ in range(_BATCH):
            try:
                frames = self._replies.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if frames == [_STOP]:
                return False
            if frames[:2] == [b"", _DROP]:
                self._drop_idle(frames[2])
            else:
                self._send(frames)
        return True

    def _send(self, frames: list[bytes]) -> None:
        """A reply, if it fits the peer's zmq.max_buffered_bytes; else it is dropped for a
        `client_too_slow` error, and so are the rest of its job's replies. A job's errors
        always go (one ends each job), and count against the buffered bytes: each is under
        1 KiB (protocol.py bounds the request id and what a message quotes). Errors of no
        job (a bad request's) go while the peer leaves fewer than ERROR_ROOM bytes of them
        unread; past that they are dropped, with a log line."""
        client = frames[0]
        route, body = split_envelope(frames)
        header = _reply_header(body)
        event = header.get("event")
        final = event not in NON_FINAL_EVENTS
        # A cut is its job's, not every request of that id: ids are the client's to choose,
        # and may repeat. (A reply about a job, `status` or `cancel`, has an id of its own.)
        cut = (header.get("job"), header.get("id"))
        if self._outbox.swallowed(client, cut, final):
            return
        size = sum(len(frame) for frame in body)
        buffered = self._outbox.buffered(client)
        limit = self._settings().max_buffered_bytes
        if event == "error":
            self._send_error(frames, size, job_less=header.get("job") is None)
            return
        if reply_fits(buffered, size, limit, self._outbox.total):
            self._hand_over(frames, size)
            return
        if not final:
            self._outbox.fail(client, cut)
        self._too_slow(route, header, buffered)

    def _send_error(self, frames: list[bytes], size: int, job_less: bool) -> None:
        if job_less and not self._outbox.error_fits(frames[0], size):
            self._errors_dropped.count()
            return
        self._hand_over(frames, size, error=job_less)

    def _too_slow(self, route: tuple[bytes, ...], header: dict[str, Any],
                  buffered: int) -> None:
        """The error in place of a reply that does not fit. In place of one of a job's own
        replies (JOB_REPLIES) it names that job and always goes, as a job's errors do: there
        is one per job. Its output or `cancelled` end: the job is cancelled. Its `accepted`:
        the job runs on, to outbox/ or failed/ (the client asks for its `status`). Any other
        (a `pong`, `voices`, `stats`, a job's `status`: one per request, as many as a peer
        pipelines) is an error of no job, held to ERROR_ROOM: it went out unbounded, up to
        SNDHWM (10,000 a peer)."""
        event = header.get("event")
        job = header.get("job") if event in JOB_REPLIES else None
        limit = self._settings().max_buffered_bytes
        error = ProtocolError(WireCode.CLIENT_TOO_SLOW, f"{_mib(buffered)} of replies to this "
                              f"client are not read yet ({self._bounds(limit)}): this reply "
                              "was dropped" + _fate(event if job else None), header.get("id"))
        reply = encode_reply(route, error.request_id, "error",
                             **({"job": job} if job else {}), **error.fields())
        size = len(reply[-1])  # its one body frame: the header
        if not isinstance(job, str):
            self._send_error(reply, size, job_less=True)
            return
        self._hand_over(reply, size)
        self._inbound.put(ClientTooSlow(route[0], job, str(event)))
        self._wake()

    def _bounds(self, limit: int) -> str:
        """The bounds on unread replies, as an error names them."""
        return (f"zmq.max_buffered_bytes = {_mib(limit)}; all clients' together, "
                f"{_mib(self._outbox.total)} of {_mib(TOTAL_BUFFERED_FACTOR * limit)}")

    def _hand_over(self, frames: list[bytes], size: int, error: bool = False) -> None:
        """Queue it on the ROUTER; its last frame zero-copy with a tracker, so the outbox
        counts its bytes until libzmq lets go of them."""
        *head, last = frames
        try:
            tracker = self._router.send_multipart(
                [*head, zmq.Frame(last, track=True, copy=False)], zmq.NOBLOCK, track=True)
        except (zmq.Again, zmq.error.ZMQError):
            # ROUTER_MANDATORY: the peer is gone (EHOSTUNREACH) or not reading (EAGAIN).
            self._inbound.put(ClientGone(frames[0]))
            self._wake()
            return
        if tracker is not None:
            self._outbox.hold(frames[0], tracker, size, error, time.monotonic())
        with self._connections.peers() as peers:
            peers.replied(frames[0], time.monotonic())

    def _check_idle(self) -> None:
        """Peers silent for zmq.idle_timeout_s: one that never sent a message is dropped at
        once (no job can be its); for the others the supervisor is asked (`IdlePeer`)."""
        now = time.monotonic()
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + _IDLE_CHECK_S
        self._connections.holders(self._outbox.sweep())
        self._give_up(self._departures.gone(now))
        timeout_s = self._settings().idle_timeout_s
        dropped = 0
        with self._connections.peers() as peers:
            for fd, peer in peers.idle(now, timeout_s):
                if peer.client is not None:
                    peer.asked = now
                    self._inbound.put(IdlePeer(peer.client))
                elif peers.placed:  # else a silent connection may be a known client's
                    dropped += shut_down(fd, peer.inode)
                    peer.asked = now  # its DISCONNECTED removes it; until then, once
        if dropped:
            log.info("zmq_idle_peers_dropped", count=dropped, idle_timeout_s=timeout_s)
        if self._inbound:
            self._wake()

    def _give_up(self, clients: list[bytes]) -> None:
        """These clients left and did not come back: their jobs are cancelled."""
        for client in clients:
            self._inbound.put(ClientGone(client))
        if clients:
            self._wake()

    def _drop_idle(self, client: bytes) -> None:
        """The supervisor found no job of this idle peer: drop it, unless it was heard from
        (or replied to) since it was asked about."""
        with self._connections.peers() as peers:
            fd, peer = peers.fd_of(client), peers.peer_of(client)
            dropped = fd is not None and peer is not None and peer.asked is not None \
                and shut_down(fd, peer.inode)
        if dropped:
            log.info("zmq_idle_peers_dropped", count=1,
                     idle_timeout_s=self._settings().idle_timeout_s)


def _fate(event: Any) -> str:
    """What became of the job whose reply (`event`, None: no job's) was dropped."""
    if event is None:
        return ""
    if event == ACCEPTED:
        return "; its job goes on: ask for its status (`job`), do not send it again"
    return " and its job cancelled"


def _new_router(context: zmq.Context[zmq.Socket[bytes]], settings: ZmqConfig) -> zmq.Socket[bytes]:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Without CURVE, a client that reconnects under its own (random, never shown) routing id
    # takes its route over at once: its jobs stay its own across a reconnect (anyone may
    # connect then, so an id taken over costs nothing that was protected).
    # With CURVE, no: routes are keyed by routing id, not by key, and a client may choose
    # its id (many set a fixed one), so another authorised key would take over its replies,
    # and cancel its jobs by leaving. libzmq then ignores a connection whose id is in use
    # until it connects again: at once after a clean close, or once the heartbeat has
    # dropped a vanished one (cosyvoiced.client connects anew after each timeout).
    router.setsockopt(zmq.ROUTER_HANDOVER, 0 if settings.curve else 1)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, SNDHWM)
    router.setsockopt(zmq.RCVHWM, RCVHWM)
    # Bigger than the app-level limits (the header's too: it may be the larger) so oversized
    # frames get an error reply; far bigger ones cost the sender its connection rather than
    # our memory.
    router.setsockopt(zmq.MAXMSGSIZE,
                      4 * max(settings.max_attachment_bytes, settings.max_header_bytes))
    # Notice dead peers on a silent network: the read bound of a connection with no request.
    router.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
    # A peer that connects and never completes the ZMTP (or CURVE) handshake is dropped.
    router.setsockopt(zmq.HANDSHAKE_IVL, int(settings.handshake_timeout_s * 1000))
    if settings.curve:
        public, secret = zmq.auth.load_certificate(settings.server_secret_key)
        if secret is None:
            raise ValueError(f"{settings.server_secret_key} holds no secret key")
        router.curve_secretkey = secret
        router.curve_publickey = public
        router.curve_server = True
    return router


class ZmqIntake:
    def __init__(self, settings: ZmqConfig, limits: Callable[[], Limits],
                 wake: Callable[[], None], read_prompt: PromptReader | None = None,
                 in_flight: InFlight | None = None) -> None:
        """`settings` may be replaced on reload; `limits` is read for every job, so both
        follow a SIGHUP. `read_prompt` decodes a voice to register (None: none can be).
        `in_flight`: the service's count of each client's requests, which this intake ends
        as it sends a request's last reply."""
        self.settings = settings
        self._in_flight = in_flight if in_flight is not None else InFlight()
        self._limits = limits
        self._wake = wake
        self._read_prompt = read_prompt
        self._decoding = UploadSlots()  # register_voice audio in the encoder (this thread)
        self._inbound: Handoff[Inbound] = Handoff(INBOUND_ROOM, INBOUND_BYTES)
        self._routes: dict[str, _Route] = {}  # job id -> requester, for reply jobs
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._auth: _Gate | None = None
        self.connections = _Connections(lambda: self.settings.max_connections,
                                        self._inbound.has_room)
        self._push: zmq.Socket[bytes] | None = None
        self._thread: _SocketThread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.bind)

    def failure(self) -> str | None:
        """Why the socket thread died; None while it runs, before start and after stop."""
        return self._thread.failure if self._thread is not None else None

    def _wire_limits(self) -> WireLimits:
        """Read by the socket thread for each message: the running settings' limits."""
        settings = self.settings
        return WireLimits(settings.max_header_bytes, settings.max_attachment_bytes)

    # -- lifecycle (supervisor thread) ----------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._context = context
        self._auth = _Gate(context, self.connections.admits, self.connections.refused_one)
        self._auth.start()
        if self.settings.curve:
            self._auth.configure_curve(domain=ZAP_DOMAIN,
                                       location=self.settings.authorized_keys_dir)
        router = _new_router(context, self.settings)
        router.zap_domain = ZAP_DOMAIN.encode()  # ZAP for NULL connections too: the cap
        for endpoint in self.settings.bind:
            router.bind(endpoint)
        inproc = f"inproc://cosyvoiced-replies-{os.getpid()}"
        pull = context.socket(zmq.PULL)
        pull.bind(inproc)
        self._push = context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never drop or block a reply on this side
        self._push.connect(inproc)
        self._thread = _SocketThread(router, pull, self._wire_limits, self._inbound,
                                     self._wake, self.connections, self.settings.curve,
                                     settings=lambda: self.settings)
        self._thread.start()
        log.info("zmq_listening", endpoints=self.settings.bind, curve=self.settings.curve)

    def stop(self) -> None:
        """Send what is queued, then close (the last replies are flushed, not dropped).

        Bounded whatever state the socket thread is in: the stop message is sent without
        blocking (a dead thread's PULL end is gone), the join has a timeout, and a thread
        that did not end leaves its sockets to `destroy`, which closes them with linger 0
        rather than waiting on them as `term` would.
        """
        push, thread, context = self._push, self._thread, self._context
        if push is None or thread is None or context is None:
            return
        self._push = None
        with contextlib.suppress(zmq.ZMQError):  # zmq.Again: nobody is reading the replies
            push.send_multipart([_STOP], zmq.NOBLOCK)
        thread.join(timeout=STOP_TIMEOUT_S)
        push.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if thread.is_alive():
            log.error("zmq_stop_timeout", timeout_s=STOP_TIMEOUT_S,
                      message="the socket thread did not end; closing its sockets")
            context.destroy(linger=0)
        else:
            context.term()  # every socket is closed: returns at once

    def reload_keys(self) -> None:
        if self._auth is not None and self.settings.curve:
            self._auth.configure_curve(domain=ZAP_DOMAIN,
                                       location=self.settings.authorized_keys_dir)

    def inbound(self) -> Iterator[Inbound]:
        while (message := self._inbound.take()) is not None:
            yield message

    def handle_inbound(self, service: Service, budget: TickBudget) -> None:
        """The requests the socket thread took, and the clients it found gone (their jobs
        are cancelled), on the supervisor's thread, as every intake does: within what is
        left of the tick's budget, so that a flood never holds the tick (and WATCHDOG=1)
        for long."""
        if budget.spent:
            if self._inbound:
                self._wake()
            return
        for message in self.inbound():
            self._handle_message(message, service)
            text = message.header.get("text") if isinstance(message, Request) else None
            if not budget.spend(text):
                if self._inbound:
                    self._wake()  # the next tick takes the rest
                return

    def _handle_message(self, message: Inbound, service: Service) -> None:
        if isinstance(message, Request):
            self.handle(message, service)
        elif isinstance(message, PromptRead):
            self.handle(message.request, service, message.prepared)
        elif isinstance(message, ClientTooSlow):
            self._client_too_slow(message, service)
        elif isinstance(message, IdlePeer):
            self._drop_if_idle(message.client)
        else:
            for job_id in self.jobs_of(message.client):
                log.info("client_gone", job=job_id)
                service.cancel(job_id)

    def _client_too_slow(self, message: ClientTooSlow, service: Service) -> None:
        """A job's reply was dropped: the job is cancelled, unless the reply was a `submit`'s
        `accepted` (a spool job: it runs on, and ends in outbox/ or failed/ as if it had
        been heard; only a reply job is this connection's to cancel)."""
        log.warning("client_too_slow", job=message.job, source=SOURCE, reply=message.event,
                    max_buffered_bytes=self.settings.max_buffered_bytes)
        if message.event == ACCEPTED:
            return
        cancelled = message.job in self.jobs_of(message.client) and service.cancel(message.job)
        if message.event in JOB_OUTPUT and not cancelled:  # it had ended: not all heard
            service.undelivered(message.job, SOURCE)

    def _drop_if_idle(self, client: bytes) -> None:
        """An idle peer with no job in flight is dropped (by the socket thread)."""
        if self._push is None or self.jobs_of(client):
            return
        with contextlib.suppress(zmq.ZMQError):  # no socket thread reads: nothing to drop
            self._push.send_multipart([b"", _DROP, client], zmq.NOBLOCK)

    def _send(self, route: tuple[bytes, ...], request_id: str | None, event: str,
              payload: bytes | None = None, **fields: Any) -> None:
        """Queue a reply for the socket thread. The PUSH socket's HWM is off, so this only
        fails when no socket thread reads: then the reply is dropped, never waited on."""
        if self._push is None:
            return
        try:
            self._push.send_multipart(encode_reply(route, request_id, event, payload,
                                                   **fields), zmq.NOBLOCK)
        except zmq.ZMQError as error:
            log.warning("zmq_reply_dropped", reply=event, request=request_id,
                        error=str(error), failure=self.failure())

    def _reply(self, request: Request, event: str, payload: bytes | None = None,
               **fields: Any) -> None:
        self._send(request.route, request.id, event, payload, **fields)

    def _error(self, request: Request, error: ProtocolError) -> None:
        error.request_id = request.id
        self._send(request.route, request.id, "error", **error.fields())

    # -- ops ------------------------------------------------------------------------------
    def handle(self, request: Request, service: Service,
               prepared: Future[bytes] | None = None) -> None:
        """Answer one request: its reply, or one `error` reply, whatever goes wrong.
        `prepared`: a voice to register, back from the encoder process."""
        try:
            if prepared is not None:
                self._decoding.give(self._identity(request, service).party)
                self.connections.job_ended(request.route[0])
                self._store_voice(request, service, prepared)
                return
            _check_attachments(request)
            self._answer(request, service)
        except ProtocolError as error:
            self._error(request, error)
        except JobFailure as failure:
            self._error(request, ProtocolError.from_job_error(failure.error, request.id))
        except Exception:  # a request from the network must not end the tick
            log.error("zmq_request_failed", op=str(request.op), request=request.id,
                      exc_info=True)
            self._error(request, ProtocolError(WireCode.INTERNAL, "the request could not be "
                                               "handled (an internal error; it is logged)"))

    def _answer(self, request: Request, service: Service) -> None:
        match request.op:
            case Op.PING:
                self._reply(request, "pong", version=__version__, engine=service.engine_name,
                            ready=service.ready)
            case Op.VOICES:
                self._reply(request, "voices", voices=[_voice(v) for v in service.voices])
            case Op.REGISTER_VOICE | Op.REMOVE_VOICE:
                self._voice_op(request, service)
            case Op.SYNTHESIZE:
                self._synthesize(request, service)
            case Op.SUBMIT:
                identity = self._admit(request, service)
                job = service.submit(request.fields(), new_job_id(),
                                     request.attachments[0] if request.attachments else None,
                                     identity)
                self._reply(request, ACCEPTED, job=job.id)
            case Op.STATUS:
                job_id = _job_field(request)
                status = service.job_status(job_id, self._identity(request, service))
                if status is None:
                    raise ProtocolError(WireCode.NOT_FOUND, f"job: no job {quoted(job_id)} is "
                                        "known", request.id, "job")
                self._reply(request, "status", job=job_id, **status)
            case Op.CANCEL:
                job_id = _job_field(request)
                if not service.cancel(job_id, self._identity(request, service)):
                    raise ProtocolError(WireCode.NOT_FOUND, f"job: {quoted(job_id)} is not queued "
                                        "or running", request.id, "job")
                self._reply(request, "cancelled", job=job_id)
            case Op.STATS:
                self._reply(request, "stats", **service.stats(self._identity(request, service)))

    def _voice_op(self, request: Request, service: Service) -> None:
        fields = request.fields()
        identity = self._identity(request, service)
        if request.op == Op.REMOVE_VOICE:
            refusal = service.catalog.remove_voice(identity, fields.get("name"))
            if refusal is not None and refusal.code == ErrorCode.UNKNOWN_VOICE:
                raise ProtocolError(WireCode.NOT_FOUND, refusal.message, request.id, "name")
            if refusal is not None:
                raise ProtocolError.from_job_error(refusal, request.id)
            self._reply(request, "voice_removed", name=fields.get("name"))
            return
        if not request.attachments:
            raise ProtocolError(WireCode.BAD_REQUEST, "frame 1: register_voice needs the "
                                "prompt audio as an attachment frame", request.id,
                                "prompt_audio")
        refusal = service.catalog.registration_refusal(identity, fields.get("name"),
                                                       fields.get("prompt_text"),
                                                       fields.get("language", ""))
        if refusal is not None:
            raise ProtocolError.from_job_error(refusal, request.id)
        if self._read_prompt is None:
            raise ProtocolError(WireCode.INTERNAL, "voices cannot be registered here (no "
                                "encoder process)", request.id)
        if not self._decoding.take(identity.party):  # a host's, as HTTP's
            raise ProtocolError(WireCode.BUSY, BUSY_DECODING, request.id)
        # Decoded in the encoder process, never here; answered when it is done (its
        # connection is kept till then, as a job's is).
        try:
            prepared = self._read_prompt(request.attachments[0])
        except BaseException:
            self._decoding.give(identity.party)  # no answer comes back to give it
            raise
        self.connections.job_began(request.route[0])
        prepared.add_done_callback(lambda done: self._put_back(PromptRead(request, done)))

    def _put_back(self, message: PromptRead) -> None:
        self._inbound.put(message)
        self._wake()

    def _store_voice(self, request: Request, service: Service, prepared: Future[bytes]) -> None:
        fields = request.fields()
        stored = service.catalog.store_voice(self._identity(request, service),
                                             fields.get("name"), fields.get("prompt_text"),
                                             prepared.result(), fields.get("language", ""))
        if isinstance(stored, JobError):
            raise ProtocolError.from_job_error(stored, request.id)
        self._reply(request, "voice_registered", voice=_voice(stored))

    def _identity(self, request: Request, service: Service) -> Identity:
        """A CURVE key is one client on every connection; without CURVE, each connection
        (its routing id) is an anonymous client. The admin token makes either an admin."""
        if request.user:
            identity = clients.keyed("curve", request.user)
        else:
            identity = clients.anonymous(f"zmq:{request.client.hex()}", host=request.host)
        if service.is_admin_token(request.header.get("admin")):
            identity = replace(identity, admin=True)
        return identity

    def _admit(self, request: Request, service: Service,
               per_client: PerClient | None = None) -> Identity:
        """The same admission as every intake's."""
        identity = self._identity(request, service)
        refusal = service.refusal(identity, per_client)
        if refusal is not None:
            raise ProtocolError.from_job_error(refusal, request.id)
        return identity

    def _synthesize(self, request: Request, service: Service) -> None:
        fields = request.fields()
        stream = fields.pop("stream", False)
        if not isinstance(stream, bool):
            raise ProtocolError(WireCode.BAD_REQUEST, "stream: expected true or false",
                                request.id, "stream")
        if stream and not request.can_stream:
            raise ProtocolError(WireCode.UNSUPPORTED, "stream: streaming needs a DEALER "
                                "socket; a REQ socket takes one reply", request.id, "stream")
        if fields.get("timestamps") is not None and not request.can_stream:
            raise ProtocolError(WireCode.UNSUPPORTED, "timestamps: the `timing` event is a "
                                "reply of its own, which needs a DEALER socket; a REQ socket "
                                "takes one reply", request.id, "timestamps")
        identity = self._admit(request, service, PerClient(
            "zmq.max_pending_per_client", self.settings.max_pending_per_client))
        # As HTTP and Wyoming answer a reply's unknown voice: up front. (A `submit` is a
        # spool job: like a dropped file, it ends in failed/ with the same code.)
        service.check_voice(fields.get("voice"))
        prompt = request.attachments[0] if request.attachments else None
        service.check_prompt(prompt)  # as HTTP: nothing is written for an engine that can't
        job_id = new_job_id()
        job = build_job(fields, job_id=job_id, source=SOURCE, origin=job_id,
                        default_output=job_id, limits=self._limits(),
                        known=SYNTHESIZE_FIELDS,
                        formats=REPLY_FORMATS, sink=SINK_REPLY, stream=stream)
        job = identity.stamp(job)
        if prompt is not None:
            job = replace(job, prompt_audio=service.keep_prompt(job_id, prompt))
        service.enqueue(job)  # raises before anything is recorded, or the job is queued
        self._routes[job.id] = _Route(request.route, request.id)
        self.connections.job_began(request.route[0])
        self._in_flight.add(job.id, identity)

    # -- a reply job's events (supervisor thread) -------------------------------------------
    def jobs_of(self, client: bytes) -> list[str]:
        """The reply jobs of one connection (cancelled when it is gone)."""
        return [job_id for job_id, route in self._routes.items() if route.envelope[0] == client]

    def _end_route(self, job_id: str) -> None:
        """The request's last reply is sent: it is no longer in flight."""
        route = self._routes.pop(job_id, None)
        if route is not None:
            self.connections.job_ended(route.envelope[0])
        self._in_flight.done(job_id)

    def _job_event(self, job: Job, event: str, payload: bytes | None = None,
                   **fields: Any) -> None:
        route = self._routes.get(job.id)
        if route is not None:
            self._send(route.envelope, route.request_id, event, payload, job=job.id, **fields)

    def started(self, job: Job, sample_rate: int) -> None:
        if job.stream:
            self._job_event(job, "start", sample_rate=sample_rate, channels=1,
                            format=PCM_FORMAT)

    def chunk(self, job: Job, seq: int, samples: npt.NDArray[np.float32]) -> None:
        self._job_event(job, "chunk", audio.to_pcm16(samples).tobytes(), seq=seq)

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> Deferred | str:
        served: dict[str, Any] = {"served_by": result.served_by} if result.served_by else {}
        if job.timestamps is not None:  # before the audio's last event, which ends the route
            self._job_event(job, "timing", **_timing(result))
        if job.stream:
            self._job_event(job, "end", audio_s=round(result.audio_s, 4),
                            synth_s=round(result.synth_s, 4),
                            first_chunk_s=round(result.first_chunk_s, 4), cached=result.cached,
                            **served)
            self._end_route(job.id)
            return f"reply:{job.id}"

        def publish(data: bytes) -> str:  # once the encoder process has made the file
            self._job_event(job, "result", data, format=job.format,
                            sample_rate=result.sample_rate, audio_s=round(result.audio_s, 4),
                            synth_s=round(result.synth_s, 4), voice=result.voice,
                            cached=result.cached, **served)
            self._end_route(job.id)
            return f"reply:{job.id}"

        # Raw PCM too: a long result is minutes of audio to convert, never on the tick.
        return Deferred(made, job.format, publish)

    def fail_job(self, job: Job, error: JobError) -> str:
        failure = ProtocolError.from_job_error(error, None)
        self._job_event(job, "error", **failure.fields())
        self._end_route(job.id)
        return f"reply:{job.id}"

    def cancelled(self, job: Job) -> None:
        self._job_event(job, "cancelled")
        self._end_route(job.id)


def _timing(result: JobResult) -> dict[str, Any]:
    """A `timing` event's fields (captions.py); `words` is null where the engine has no
    alignment."""
    if result.captions is None:
        return {"sentences": [], "words": None}
    return result.captions.to_dict()


def _source_fd(frame: zmq.Frame) -> int | None:
    """The descriptor of the connection a message came in on (ZMQ_SRCFD)."""
    try:
        fd = frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None
    return fd if isinstance(fd, int) else None


def _reply_header(body: list[bytes]) -> dict[str, Any]:
    """A reply's own header (made here by `encode_reply`, never a peer's bytes)."""
    try:
        header = json.loads(body[0]) if body else {}
    except ValueError:
        return {}
    return header if isinstance(header, dict) else {}


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _user_id(frame: zmq.Frame) -> str | None:
    """The CURVE public key (Z85) that ZAP authenticated this message's sender with."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:  # no metadata: not a CURVE connection
        return None
    return user if isinstance(user, str) and user else None


def _peer_host(frame: zmq.Frame) -> str | None:
    """The IP address the message's connection comes from (libzmq's Peer-Address), if it
    has one: an IPC peer's names its process (``localhost:UID:GID:PID``), not a host."""
    try:
        return ip_host(frame.get("Peer-Address")) or None
    except zmq.ZMQError:  # no metadata
        return None


def _voice(voice: VoiceInfo) -> dict[str, Any]:
    return {"name": voice.name, "language": voice.language, "sample_rate": voice.sample_rate,
            "engine": voice.engine, "kind": voice.kind}


def _check_attachments(request: Request) -> None:
    allowed = 1 if request.op in AUDIO_OPS else 0
    if len(request.attachments) > allowed:
        raise ProtocolError(WireCode.BAD_REQUEST, f"frame {allowed + 1}: op {request.op!r} "
                            f"takes {allowed or 'no'} attachment frame{'s' * (allowed != 1)}",
                            request.id)


def _job_field(request: Request) -> str:
    job_id = request.header.get("job")
    if not isinstance(job_id, str) or not job_id:
        raise ProtocolError(WireCode.BAD_REQUEST, "job: required job id is missing or not a "
                            "string", request.id, "job")
    return job_id
