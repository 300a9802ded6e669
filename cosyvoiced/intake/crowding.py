"""Who gives up a connection when a listener is full: the connection slots shared fairly
between the addresses they come from.

A listener's `max_connections` is one pool for every peer. Without this, one host that opens
that many connections and leaves them idle (or trickles their headers) locks every other
host out until its connections time out, and then takes the slots again. So when the pool is
full and a connection comes from an address that holds fewer than another, that other
address closes one of its connections that has no request in hand (idle, or still sending
its first headers: nothing of it was accepted yet), and the newcomer takes its slot. Slots
tend to equal shares; connections from one address (a reverse proxy, loopback clients) see
the cap exactly as before: the newcomer is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeVar

Connection = TypeVar("Connection")
# A connection whose session stays open between requests (a WebSocket, a Wyoming stream,
# ZeroMQ) has nothing in hand once nothing of it is being made or sent and its client has
# said nothing for this long (a request may wait that long for the supervisor before it is
# a job, and a reply to begin); much shorter than any idle timeout.
QUIET_S = 5.0


def evictee(held: Mapping[str, int], evictable: Collection[str], newcomer: str) -> str | None:
    """The address that gives a connection up for one from `newcomer`: of those that can
    (`evictable`), the one holding the most, if it holds at least two more than `newcomer`
    does (so that it still holds as many after); None: refuse the newcomer."""
    fewest_to_give = held.get(newcomer, 0) + 2
    candidates = [address for address in evictable
                  if address != newcomer and held.get(address, 0) >= fewest_to_give]
    return max(candidates, key=lambda address: held[address], default=None)


class AddressBook(Generic[Connection]):
    """One listener's open connections by peer address, oldest first. Used on the listener's
    loop thread only."""

    def __init__(self) -> None:
        self._by_address: dict[str, list[Connection]] = {}
        self.open = 0

    def add(self, address: str, connection: Connection) -> None:
        self._by_address.setdefault(address, []).append(connection)
        self.open += 1

    def remove(self, address: str, connection: Connection) -> None:
        held = self._by_address.get(address, [])
        if connection in held:
            held.remove(connection)
            self.open -= 1
        if not held:
            self._by_address.pop(address, None)

    def make_room(self, newcomer: str,
                  can_go: Callable[[Connection], bool]) -> Connection | None:
        """The connection to close so that one from `newcomer` may open (the oldest that
        `can_go` of the address `evictee` picks), taken out of the book now (its slot is the
        newcomer's, not once it has closed); or None: refuse the newcomer."""
        idle = {address: next((c for c in held if can_go(c)), None)
                for address, held in self._by_address.items()}
        held_counts = {address: len(held) for address, held in self._by_address.items()}
        address = evictee(held_counts, [a for a, c in idle.items() if c is not None], newcomer)
        if address is None:
            return None
        chosen = idle[address]
        assert chosen is not None
        self.remove(address, chosen)
        return chosen


def peer_address(peername: object) -> str:
    """The host part of a transport's `peername` (the port differs per connection); a Unix
    socket's peers are all one address."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return ""


def ip_host(text: object) -> str:
    """The IP address `text` names, spelt one way; "" when it names none (a local socket's
    peer: libzmq names an IPC peer's process, ``localhost:UID:GID:PID``)."""
    if not isinstance(text, str):
        return ""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return ""
