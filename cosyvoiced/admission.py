"""Admission: the one rule every intake applies before it queues a job, the one count of
each client's requests in flight it reads, and the one unknown-voice check; the bounds on
voice uploads in hand and on replies left unread (`reply_fits`). Pure: the service
(service.py) and the intakes pass in what they know; nothing here holds a socket or a clock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from cosyvoiced import clients
from cosyvoiced.clients import Identity
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import ErrorCode, JobError
from cosyvoiced.protocol import quoted

MAX_UPLOADS_AT_ONCE = 4  # so at most 4 uploads (http.max_upload_bytes each) in memory
MAX_UPLOADS_PER_CLIENT = 2  # and one client (a key, or an address without keys) 2 of them
# All clients' unread replies together (an intake's), at most this many times what one
# client may leave unread: a thousand connections that never read held that much each.
TOTAL_BUFFERED_FACTOR = 8
# A client that holds at most this part of its bound unread reads as it goes (a stream's
# last chunk or two): it is served up to twice the total, so that those who stopped reading
# cannot cut off those who read.
READER_PART = 64


class Queue(Protocol):
    """What admission reads of the ledger."""

    def unstarted(self) -> int: ...

    def unstarted_of(self, share: str, party: str | None = None) -> int: ...


@dataclass(frozen=True)
class PerClient:
    """An intake's bound on one client's requests in flight, and the setting it comes from
    (named in the refusal)."""

    setting: str
    limit: int


class InFlight:
    """Each client's requests in flight, one count for every intake, keyed by
    `Identity.client`: from admission until the intake has answered the request whole or
    found its client gone (the intake says when: `done`)."""

    def __init__(self) -> None:
        self._client_of: dict[str, str] = {}  # request (its job id) -> its client
        self._counts: Counter[str] = Counter()

    def count(self, client: str) -> int:
        return self._counts[client]

    def add(self, job_id: str, identity: Identity) -> None:
        self.done(job_id)  # counted once, whatever happens
        self._client_of[job_id] = identity.client
        self._counts[identity.client] += 1

    def done(self, job_id: str) -> None:
        client = self._client_of.pop(job_id, None)
        if client is not None:
            self._counts[client] -= 1
            if not self._counts[client]:
                del self._counts[client]  # bounded by the clients with requests in flight


def refusal(identity: Identity, queue: Queue, *, stopping: bool, max_pending: int,
            in_flight: InFlight, per_client: PerClient | None = None) -> JobError | None:
    """Why a job of `identity` is not queued now (None: it is), in this order, for every
    intake alike: not while stopping; not when zmq.max_pending jobs wait to start;
    anonymous clients all together in at most their part of that (so that clients with
    keys always find room), and one host's in at most its part of theirs; and no client
    over its intake's bound of requests in flight."""
    if stopping:
        return JobError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping; send the "
                        "request again")
    if queue.unstarted() >= max_pending:
        return JobError(ErrorCode.BUSY, "the queue is full (zmq.max_pending); retry later")
    room = clients.anonymous_room(max_pending)
    if identity.anonymous and queue.unstarted_of(clients.ANONYMOUS) >= room:
        return JobError(ErrorCode.BUSY, f"the {room} places of anonymous clients in the "
                        "queue are taken (half of zmq.max_pending); retry later, or use "
                        "an API key or a CURVE key")
    host_room = clients.host_room(max_pending)
    if identity.anonymous and identity.host and \
            queue.unstarted_of(clients.ANONYMOUS, identity.party) >= host_room:
        return JobError(ErrorCode.BUSY, f"the {host_room} places of one host's anonymous "
                        "clients in the queue are taken (a quarter of zmq.max_pending); "
                        "retry later, or use an API key or a CURVE key")
    held = in_flight.count(identity.client)
    if per_client is not None and held >= per_client.limit:
        return JobError(ErrorCode.BUSY, f"{held} requests of this client are in flight "
                        f"({per_client.setting} = {per_client.limit}); retry later")
    return None


def unknown_voice(voice: Any, voices: list[VoiceInfo]) -> JobError | None:
    """A voice the engine does not have, refused before queueing with the worker's own
    error. Before the engine is ready (no voices known yet), the worker decides."""
    names = sorted(v.name for v in voices)
    if not isinstance(voice, str) or not names or voice in names:
        return None
    return JobError(ErrorCode.UNKNOWN_VOICE, f"voice: {quoted(voice)} is not available; "
                    f"choose one of: {', '.join(names)}", "voice")


class UploadSlots:
    """Voice uploads in hand at once (one thread's): at most `size` in all, and `per_client`
    of one client's (`Identity.client`), so one that stalls or floods its uploads does not
    hold every slot. HTTP holds one while it reads a body over http.max_body_bytes, ZeroMQ
    while the encoder process decodes a `register_voice`'s audio."""

    def __init__(self, size: int = MAX_UPLOADS_AT_ONCE,
                 per_client: int = MAX_UPLOADS_PER_CLIENT) -> None:
        self._free = size
        self._per_client = per_client
        self._held: Counter[str] = Counter()

    def take(self, client: str) -> bool:
        """A slot, if one is free to `client` (then `give` it back when the body is dealt
        with)."""
        if self._free <= 0 or self._held[client] >= self._per_client:
            return False
        self._free -= 1
        self._held[client] += 1
        return True

    def give(self, client: str) -> None:
        self._free += 1
        self._held[client] -= 1
        if self._held[client] <= 0:
            del self._held[client]


def reply_fits(buffered: int, size: int, limit: int, total: int = 0) -> bool:
    """Whether a reply of `size` bytes may join the `buffered` bytes a client has not taken:
    within `limit` (one reply, however big, goes to a client that holds nothing), and the
    `total` of every client's within TOTAL_BUFFERED_FACTOR times it, or within twice that
    for a client that holds little (it reads: READER_PART), so that a thousand that stopped
    reading cut off neither those who read nor more memory than that. Nothing held anywhere:
    it goes."""
    if buffered and buffered + size > limit:
        return False
    if buffered == 0 and total == 0:
        return True
    total_limit = TOTAL_BUFFERED_FACTOR * limit
    reads = buffered <= limit // READER_PART
    return total + size <= (2 * total_limit if reads else total_limit)


def holds_too_much(buffered: int, limit: int, total: int) -> bool:
    """Whether a client's new request is refused (busy) for what it has not read: its own
    bound, or its part of every client's together while it does not read."""
    return buffered >= limit or (buffered > limit // READER_PART
                                 and total >= TOTAL_BUFFERED_FACTOR * limit)
