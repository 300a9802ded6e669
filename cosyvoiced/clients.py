"""Who is asking: one identity per client, whichever intake it came by, and the limits that
keep clients apart. Pure: no sockets, no processes, the clock passed in.

- `owner`: who may see (`status`) and cancel a job. An API key, a CURVE public key, or,
  for anonymous clients, the connection. Another owner's job answers `not_found`; an
  admin (an admin API key, or a local `cosyvoicectl` holding the daemon's admin token)
  may act on every job.
- `client`: whose requests in flight count against the intake's max_pending_per_client.
- `share`: whose turn it is in the scheduler (scheduler.py). Every anonymous client is in
  one share, `anonymous`, whose queued jobs are bounded as a class (`anonymous_room`): a
  flood of unauthenticated connections cannot fill the queue for those with keys.
- `party`: who takes turns within a share: for anonymous clients, the `host` they connect
  from (by HTTP, Wyoming or ZeroMQ over TCP alike), which may also hold only a part of the
  anonymous places (`host_room`). So one host's flood neither takes every anonymous place
  nor goes ahead of another host's request (Home Assistant's, say). A client whose host is
  not known (a Unix socket's) is a party of its own. A key's share is one party.
- `name`: how it is named in logs and metrics (a key's name; never a secret).
- `voice_owner`: whom a voice it registers belongs to. Every client may speak with every
  voice, but only its owner or an admin may replace or remove it. A key's voices are its
  own; anonymous clients share theirs (a connection does not outlive its voice); an admin's
  belong to the operator (`OPERATOR`), as do voices stored before voices had owners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cosyvoiced.job import Job

ANONYMOUS = "anonymous"
INBOX = "inbox"  # the drop folder: whoever can write to it is trusted like a local admin
ANONYMOUS_QUEUE_PART = 2  # anonymous clients may fill 1/2 of the queue's places
ANONYMOUS_HOST_PART = 2  # and one host's anonymous clients 1/2 of those
OPERATOR = "operator"  # the owner of voices registered by an admin
HOST_PARTY = "host:"  # an anonymous party named by its host's address


@dataclass(frozen=True)
class Identity:
    owner: str
    client: str
    share: str = ANONYMOUS
    admin: bool = False
    name: str = ANONYMOUS
    host: str = ""  # an anonymous client's address ("": not known)

    @property
    def anonymous(self) -> bool:
        return self.share == ANONYMOUS

    @property
    def party(self) -> str:
        if not self.anonymous:
            return self.share
        return f"{HOST_PARTY}{self.host}" if self.host else self.client

    def stamp(self, job: Job) -> Job:
        """The job as this client's: its owner, and its place in the turns."""
        return replace(job, owner=self.owner, share=self.share, party=self.party)

    def may_see(self, owner: str) -> bool:
        """May this client see or cancel a job of `owner`?"""
        return self.admin or (bool(owner) and owner == self.owner)

    @property
    def voice_owner(self) -> str:
        return OPERATOR if self.admin else self.share

    def may_manage(self, voice_owner: str) -> bool:
        """May this client replace or remove a voice of `voice_owner` ("": the operator's)?"""
        return self.admin or voice_owner == self.voice_owner


def keyed(kind: str, name: str, *, admin: bool = False) -> Identity:
    """A client that proved who it is (an API key's name, a CURVE key): one identity, on
    every connection."""
    who = f"{kind}:{name}"
    return Identity(owner=who, client=who, share=who, admin=admin, name=name)


def anonymous(connection: str, client: str | None = None, host: str | None = None) -> Identity:
    """A client that did not say who it is: it owns what it asked on `connection`, its
    in-flight requests count under `client` (e.g. its address) when given, and its turns
    and places are its `host`'s (None or "": not known, its client's)."""
    return Identity(owner=connection, client=client or connection, host=host or "")


def drop_folder() -> Identity:
    return Identity(owner=INBOX, client=INBOX, share=INBOX, admin=True, name=INBOX)


LOCAL_ADMIN = Identity(owner="admin", client="admin", share="admin", admin=True, name="admin")


def cache_share(job: Job) -> str:
    """Whose result-cache entries `job`'s audio joins: its share's, but an anonymous
    client's are its host's, so that no host learns from a hit (or from how fast it came)
    what another host asked for. Anonymous clients of no known host (a local socket's,
    whose file's permissions decide who may connect) keep theirs together: a connection of
    its own would miss on every reconnect."""
    if job.share == ANONYMOUS and job.party.startswith(HOST_PARTY):
        return job.party
    return job.share


def anonymous_room(max_pending: int) -> int:
    """How many unstarted jobs anonymous clients may hold together."""
    return max(1, max_pending // ANONYMOUS_QUEUE_PART)


def host_room(max_pending: int) -> int:
    """How many unstarted jobs the anonymous clients of one host may hold together."""
    return max(1, anonymous_room(max_pending) // ANONYMOUS_HOST_PART)


@dataclass(frozen=True)
class RateLimit:
    """Requests and characters per minute (0: no limit)."""

    requests_per_minute: float = 0.0
    chars_per_minute: float = 0.0

    @property
    def limited(self) -> bool:
        return self.requests_per_minute > 0 or self.chars_per_minute > 0


@dataclass
class _Bucket:
    """A token bucket, full at the start: `capacity` tokens, refilled at capacity/60 s."""

    capacity: float
    tokens: float
    at: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.capacity / 60)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` tokens are there (0: now). More than a minute's worth
        is never there: it may go once the bucket is full."""
        missing = min(amount, self.capacity) - self.tokens
        return 0.0 if missing <= 0 else missing * 60 / self.capacity


@dataclass
class RateLimiter:
    """Token buckets per client; `take` says how long to wait, or takes and says 0."""

    buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def _bucket(self, client: str, kind: str, capacity: float, now: float) -> _Bucket:
        bucket = self.buckets.get((client, kind))
        if bucket is None or bucket.capacity != capacity:  # new, or the limit changed
            bucket = _Bucket(capacity, capacity, now)
            self.buckets[client, kind] = bucket
        bucket.refill(now)
        return bucket

    def take(self, client: str, limit: RateLimit, chars: int, now: float,
             requests: int = 1) -> float:
        """0.0 and the request is counted; else the seconds after which it would pass."""
        wanted = [(self._bucket(client, kind, capacity, now), amount)
                  for kind, capacity, amount in (("requests", limit.requests_per_minute,
                                                  requests),
                                                 ("chars", limit.chars_per_minute, chars))
                  if capacity > 0]
        wait = max((bucket.wait_for(amount) for bucket, amount in wanted), default=0.0)
        if wait > 0:
            return wait
        for bucket, amount in wanted:
            bucket.tokens -= min(amount, bucket.capacity)
        return 0.0

    def forget_idle(self, now: float) -> None:
        """Full buckets hold nothing worth keeping: bounded by active clients."""
        for key, bucket in list(self.buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self.buckets[key]


def retry_after_s(wait_s: float) -> int:
    """Retry-After is whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))
