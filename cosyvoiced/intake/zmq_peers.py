"""What the ZeroMQ socket thread knows of each peer: the reply bytes libzmq still holds for it
(`Outbox`), and its connection, when it was last heard from and how to drop it (`Peers`);
and what it has handed the supervisor's thread and how much that weighs (`Handoff`).

libzmq says neither when a peer took a message nor which connection is whose, and a ROUTER
cannot close one peer. So:
- every reply's last frame is sent zero-copy with a tracker, which libzmq lets go of once the
  message is written to the connection's kernel buffer (or dropped with the connection);
  the bytes of a peer's untaken replies are the sum over its trackers not yet done;
- the monitor names each connection's descriptor (ACCEPTED, DISCONNECTED) and every message
  carries its connection's (ZMQ_SRCFD), which ties a routing id to a descriptor;
- a peer is dropped by shutting down its socket through a duplicate of that descriptor:
  libzmq sees the connection end, closes its own descriptor and frees the peer's pipe. The
  descriptor is never closed here, and the socket's inode is checked first, so a number
  that was reused meanwhile is left alone.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

import zmq

from cosyvoiced.intake.crowding import evictee, ip_host, peer_address

# A request's replies before its last one: a stream's `start` and `chunk`s, and the `timing`
# event before the audio. Every other event ends its request.
NON_FINAL_EVENTS = frozenset({"start", "chunk", "timing"})
# What a reply's drop cuts short: its (job, request id); a reply of no job, its request's.
Cut = tuple[object, object]
Message = TypeVar("Message")


def is_idle(active: float, now: float, timeout_s: float) -> bool:
    """Whether a peer last heard from (or replied to) at `active` is idle at `now`; a
    timeout of 0 turns idleness off."""
    return timeout_s > 0 and now - active >= timeout_s


# Error replies of no job (a bad request's, a refusal's) that one peer may leave unread;
# past it they are dropped: a peer that sends bad requests and reads nothing held up to
# SNDHWM of them (about 5 MB each), and they counted against every client's total.
ERROR_ROOM = 64 << 10
# libzmq lets go of a reply a moment after it is written to the connection, and pyzmq learns
# of it on a thread of its own: a reply handed over this recently is not judged unread yet,
# so a client that asks again as soon as it has read its reply is not refused for it.
SETTLE_S = 0.5


class Outbox:
    """Per peer (routing id): the reply bytes libzmq holds (and how many of them are errors
    of no job), and the jobs (or requests) whose replies were dropped (their later replies
    are dropped too, up to the last)."""

    def __init__(self) -> None:
        # per peer, oldest first: (tracker, size, an error of no job, when handed over)
        self._held: dict[bytes, deque[tuple[zmq.MessageTracker, int, bool, float]]] = {}
        self._bytes: dict[bytes, int] = {}
        self._errors: dict[bytes, int] = {}
        self._failed: dict[bytes, set[Cut]] = {}
        self.total = 0  # every peer's bytes (as of each one's last look: `sweep` each second)

    def buffered(self, client: bytes) -> int:
        """Bytes of replies to `client` that libzmq has not let go of yet. A connection
        writes in order, so done trackers are let go of from the front."""
        held = self._held.get(client)
        if held is None:
            return 0
        while held and held[0][0].done:
            _tracker, size, error, _at = held.popleft()
            self._bytes[client] -= size
            self.total -= size
            if error:
                self._errors[client] -= size
        if not held:
            del self._held[client], self._bytes[client]
            self._errors.pop(client, None)
            return 0
        return self._bytes[client]

    def unread(self, client: bytes, now: float) -> int:
        """`buffered`, less the replies handed over in the last SETTLE_S (the newest: a
        few at most, looked at from the back)."""
        buffered = self.buffered(client)
        for _tracker, size, _error, at in reversed(self._held.get(client, ())):
            if now - at >= SETTLE_S:
                break
            buffered -= size
        return buffered

    def error_fits(self, client: bytes, size: int) -> bool:
        """May one more error reply of no job, of `size` bytes, wait for `client`?"""
        self.buffered(client)
        return self._errors.get(client, 0) + size <= ERROR_ROOM

    def hold(self, client: bytes, tracker: zmq.MessageTracker, size: int,
             error: bool = False, now: float = 0.0) -> None:
        """`error`: an error reply of no job (`error_fits`); `now`: when it is handed over."""
        self._held.setdefault(client, deque()).append((tracker, size, error, now))
        self._bytes[client] = self._bytes.get(client, 0) + size
        self.total += size
        if error:
            self._errors[client] = self._errors.get(client, 0) + size

    def fail(self, client: bytes, cut: Cut) -> None:
        """A reply of `cut` was dropped: so are the rest of its replies."""
        self._failed.setdefault(client, set()).add(cut)

    def swallowed(self, client: bytes, cut: Cut, final: bool) -> bool:
        """Whether this reply belongs to a cut job or request (and is dropped); its last
        reply ends the entry."""
        failed = self._failed.get(client)
        if failed is None or cut not in failed:
            return False
        if final:
            failed.discard(cut)
            if not failed:
                del self._failed[client]
        return True

    def sweep(self) -> frozenset[bytes]:
        """Forget the trackers libzmq is done with, for peers no longer replied to; the
        peers that still have replies to take."""
        for client in list(self._held):
            self.buffered(client)
        return frozenset(self._held)

    def forget(self, client: bytes) -> None:
        """The peer's connection ended: libzmq dropped what it held for it."""
        self._held.pop(client, None)
        self.total -= self._bytes.pop(client, 0)
        self._errors.pop(client, None)
        self._failed.pop(client, None)


class Handoff(Generic[Message]):
    """Messages from the socket thread to the supervisor's thread, in order (thread-safe).
    The socket thread reads requests only while there is room: what waits past that stays
    in libzmq's queue of its peer (ZMQ_RCVHWM messages), then in the peer's own."""

    def __init__(self, most: int, most_bytes: int) -> None:
        self._most, self._most_bytes = most, most_bytes
        self._waiting: deque[tuple[Message, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, message: Message, size: int = 0) -> None:
        with self._lock:
            self._waiting.append((message, size))
            self._bytes += size

    def take(self) -> Message | None:
        with self._lock:
            if not self._waiting:
                return None
            message, size = self._waiting.popleft()
            self._bytes -= size
            return message

    def has_room(self) -> bool:
        """Room for one more request; one alone always fits, whatever it weighs."""
        with self._lock:
            return len(self._waiting) < self._most and self._bytes < self._most_bytes

    def __len__(self) -> int:
        return len(self._waiting)


class Departures:
    """Routing ids whose connection ended, and since when. A libzmq client reconnects by
    itself, with the same id if it set one (`cosyvoiced.client.Client` does), and keeps its
    jobs; one that stays away for `grace_s` is gone, and its jobs are cancelled. At most
    `most` are kept: past that the longest away is given up at once."""

    def __init__(self, grace_s: float, most: int) -> None:
        self._grace_s = grace_s
        self._most = most
        self._since: dict[bytes, float] = {}  # in the order they left

    def left(self, client: bytes, now: float) -> list[bytes]:
        """`client`'s connection ended; the clients given up now to make room."""
        self._since.pop(client, None)
        self._since[client] = now
        over = len(self._since) - self._most
        given_up = list(itertools.islice(self._since, max(0, over)))
        for gone in given_up:
            del self._since[gone]
        return given_up

    def back(self, client: bytes) -> None:
        """A message from `client`: it came back (or never left)."""
        self._since.pop(client, None)

    def gone(self, now: float) -> list[bytes]:
        """The clients away for `grace_s` by `now`, each once."""
        gone = list(itertools.takewhile(lambda client: now - self._since[client] >=
                                        self._grace_s, self._since))
        for client in gone:
            del self._since[client]
        return gone


@dataclass
class Peer:
    """One connection to the ROUTER."""

    inode: int  # its socket's: a descriptor number is reused, an open socket's inode is not
    active: float  # monotonic time of its last request or reply
    address: str = ""  # the host it connects from ("": a local socket's)
    client: bytes | None = None  # its routing id, once it sent a message
    asked: float | None = None  # when the supervisor was asked whether it has jobs
    holding: bool = False  # replies to it were not all taken, at the last look
    given_up: bool = False  # shut down for another host's connection; not yet gone


class Peers:
    """The ROUTER's connections by descriptor, and which routing id is on which."""

    def __init__(self) -> None:
        self.by_fd: dict[int, Peer] = {}
        self._fd_of: dict[bytes, int] = {}
        # Every routing id heard on a descriptor since it was accepted: a message read late,
        # after its own connection ended and a new one took the number, names an id that
        # will never be heard again (anonymous ids are new each time). All go with the fd.
        self._heard_on: dict[int, set[bytes]] = {}
        self.placed = True  # every message so far named its descriptor (ZMQ_SRCFD)

    def accepted(self, fd: int, now: float) -> None:
        self.by_fd[fd] = Peer(_inode(fd), now, _address(fd))

    @property
    def leaving(self) -> int:
        """Connections given up (shut down) whose end libzmq has not reported yet."""
        return sum(peer.given_up for peer in self.by_fd.values())

    def make_room(self, newcomer: str,
                  can_go: Callable[[Peer], bool]) -> tuple[int, Peer] | None:
        """The connection (descriptor, peer) to give up for one from `newcomer` that is
        being let in (and is counted here already): the least recently active that `can_go`
        of the address `crowding.evictee` picks; None: refuse the newcomer."""
        held: dict[str, int] = {}
        least_active: dict[str, tuple[int, Peer]] = {}
        for fd, peer in self.by_fd.items():
            if peer.given_up:
                continue
            held[peer.address] = held.get(peer.address, 0) + 1
            chosen = least_active.get(peer.address)
            if can_go(peer) and (chosen is None or peer.active < chosen[1].active):
                least_active[peer.address] = (fd, peer)
        if newcomer in held:
            held[newcomer] -= 1  # the connection asking
        address = evictee(held, least_active, newcomer)
        return None if address is None else least_active[address]

    def holders(self, clients: Collection[bytes]) -> None:
        """`clients` are those whose replies are not all taken; every other peer's are."""
        for peer in self.by_fd.values():
            peer.holding = peer.client is not None and peer.client in clients

    def disconnected(self, fd: int) -> list[bytes]:
        """The routing ids that were on `fd` (those no newer connection took)."""
        self.by_fd.pop(fd, None)
        gone = [client for client in self._heard_on.pop(fd, ())
                if self._fd_of.get(client) == fd]
        for client in gone:
            del self._fd_of[client]
        return gone

    def heard(self, fd: int | None, client: bytes, now: float) -> None:
        """A message from `client` came in on `fd`."""
        if fd is None or fd < 0:
            self.placed = False  # then a silent connection may be this client's: keep it
            return
        peer = self.by_fd.get(fd)
        if peer is not None:
            peer.client, peer.active, peer.asked = client, now, None
            self._fd_of[client] = fd
            self._heard_on.setdefault(fd, set()).add(client)

    def replied(self, client: bytes, now: float) -> None:
        peer = self.peer_of(client)
        if peer is not None:
            peer.active, peer.asked = now, None

    def peer_of(self, client: bytes) -> Peer | None:
        fd = self._fd_of.get(client)
        return None if fd is None else self.by_fd.get(fd)

    def fd_of(self, client: bytes) -> int | None:
        return self._fd_of.get(client)

    def idle(self, now: float, timeout_s: float) -> list[tuple[int, Peer]]:
        """Idle connections not yet asked about (or asked a timeout ago, unanswered)."""
        return [(fd, peer) for fd, peer in self.by_fd.items()
                if is_idle(peer.active, now, timeout_s)
                and (peer.asked is None or is_idle(peer.asked, now, timeout_s))]


def shut_down(fd: int, inode: int) -> bool:
    """End the connection on libzmq's descriptor `fd` if it is still the socket `inode`:
    shut down through a duplicate (closing only the duplicate), so that libzmq sees the
    peer leave and cleans up after it as it would after any disconnect."""
    try:
        duplicate = os.dup(fd)
    except OSError:  # closed meanwhile
        return False
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:  # reused by something that is not a socket
        os.close(duplicate)
        return False
    with sock:
        if _inode(sock.fileno()) != inode:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
    return True


def _address(fd: int) -> str:
    """The host a connection on libzmq's descriptor `fd` comes from (read through a
    duplicate, closing only the duplicate); "" when not known."""
    try:
        duplicate = os.dup(fd)
    except OSError:
        return ""
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return ""
    with sock:
        try:
            return ip_host(peer_address(sock.getpeername()))
        except OSError:
            return ""


def _inode(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1
