"""Identities and rate limits, without processes: the clock is passed in."""

from __future__ import annotations

from cosyvoiced.clients import (
    Identity,
    RateLimit,
    RateLimiter,
    anonymous,
    anonymous_room,
    cache_share,
    keyed,
    retry_after_s,
)
from cosyvoiced.job import Job


def test_a_key_owns_its_jobs_on_every_connection_and_no_one_else_does() -> None:
    alice, bob = keyed("key", "alice"), keyed("key", "bob")
    assert alice.may_see(alice.owner)
    assert not bob.may_see(alice.owner)
    assert keyed("key", "root", admin=True).may_see(alice.owner)
    assert not alice.anonymous


def test_cache_entries_are_a_keys_or_an_anonymous_hosts() -> None:
    """One host's anonymous clients share entries, another host's do not; so do the
    anonymous clients of no known host (a local socket's), and a key's are its own."""
    def share(identity: Identity) -> str:
        return cache_share(identity.stamp(Job(id="j", source="zmq", origin="o", text="t")))
    here, again = anonymous("zmq:1", host="10.0.0.5"), anonymous("http:2", host="10.0.0.5")
    assert share(here) == share(again) != share(anonymous("zmq:3", host="10.0.0.6"))
    assert share(anonymous("zmq:4")) == share(anonymous("zmq:5")) == "anonymous"
    assert share(keyed("key", "alice")) == "key:alice" != share(keyed("key", "bob"))


def test_anonymous_clients_own_their_connection_and_share_one_class() -> None:
    one, two = anonymous("wyoming:1"), anonymous("wyoming:2")
    assert one.may_see("wyoming:1")
    assert not two.may_see("wyoming:1")
    assert one.share == two.share == "anonymous"
    assert not one.may_see("")  # a job nobody owns is an admin's
    assert anonymous_room(256) == 128


def test_requests_per_minute_refill_over_the_minute() -> None:
    limiter, limit = RateLimiter(), RateLimit(requests_per_minute=10)
    assert all(limiter.take("key:a", limit, 5, 0.0) == 0.0 for _ in range(10))
    wait = limiter.take("key:a", limit, 5, 0.0)
    assert 5.9 < wait < 6.1  # one request back every 6 s
    assert retry_after_s(wait) == 6
    assert retry_after_s(0.2) == 1
    assert limiter.take("key:b", limit, 5, 0.0) == 0.0  # another key has its own
    assert limiter.take("key:a", limit, 5, 6.0) == 0.0


def test_characters_per_minute_and_a_text_bigger_than_a_minute() -> None:
    limiter, limit = RateLimiter(), RateLimit(chars_per_minute=600)
    assert limiter.take("k", limit, 500, 0.0) == 0.0
    assert limiter.take("k", limit, 200, 0.0) == 10.0  # 100 more chars: 10 s
    assert limiter.take("k", limit, 5000, 60.0) == 0.0  # once full, even a big one goes
    assert limiter.take("k", limit, 1, 60.0) > 0


def test_a_refused_request_takes_nothing() -> None:
    limiter, limit = RateLimiter(), RateLimit(requests_per_minute=1, chars_per_minute=100)
    assert limiter.take("k", limit, 100, 0.0) == 0.0
    assert limiter.take("k", limit, 10, 30.0) > 0
    assert limiter.take("k", limit, 10, 60.0) == 0.0


def test_idle_buckets_are_forgotten() -> None:
    limiter = RateLimiter()
    limiter.take("k", RateLimit(requests_per_minute=2), 1, 0.0)
    limiter.forget_idle(10.0)
    assert limiter.buckets
    limiter.forget_idle(60.0)
    assert not limiter.buckets
