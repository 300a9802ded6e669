"""The one admission rule of every intake (admission.py), without processes: the queue is a
stand-in that says how many jobs wait to start."""

from __future__ import annotations

from dataclasses import dataclass, field

from cosyvoiced.admission import InFlight, PerClient, refusal, unknown_voice
from cosyvoiced.clients import ANONYMOUS, LOCAL_ADMIN, Identity, anonymous, keyed
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import ErrorCode

PER_CLIENT = PerClient("zmq.max_pending_per_client", 2)


@dataclass
class _Queue:
    """Jobs waiting to start, by share, and by party (of the anonymous share)."""

    waiting: dict[str, int] = field(default_factory=dict)
    by_party: dict[str, int] = field(default_factory=dict)

    def unstarted(self) -> int:
        return sum(self.waiting.values())

    def unstarted_of(self, share: str, party: str | None = None) -> int:
        return self.waiting.get(share, 0) if party is None else self.by_party.get(party, 0)


def _refusal(identity: Identity, queue: _Queue | None = None, *, stopping: bool = False,
             in_flight: InFlight | None = None,
             per_client: PerClient | None = PER_CLIENT) -> tuple[ErrorCode, str] | None:
    error = refusal(identity, queue or _Queue(), stopping=stopping, max_pending=4,
                    in_flight=in_flight or InFlight(), per_client=per_client)
    return None if error is None else (error.code, error.message)


def _holding(identity: Identity, requests: int) -> InFlight:
    in_flight = InFlight()
    for n in range(requests):
        in_flight.add(f"job-{n}", identity)
    return in_flight


def test_a_client_at_its_limit_while_stopping_is_told_the_daemon_stops() -> None:
    # The stop comes first for every intake: a client that retries then finds a daemon
    # that started again, not one that is only busy.
    client = anonymous("zmq:01")
    refused = _refusal(client, stopping=True, in_flight=_holding(client, 2))
    assert refused is not None
    assert refused[0] == ErrorCode.SHUTTING_DOWN


def test_a_full_queue_then_the_anonymous_part_then_the_client_own_limit() -> None:
    client, other = anonymous("zmq:01"), keyed("curve", "abc")
    full = _Queue({ANONYMOUS: 1, other.share: 3})
    assert _refusal(other, full, in_flight=_holding(other, 2)) == \
        (ErrorCode.BUSY, "the queue is full (zmq.max_pending); retry later")
    anonymous_part = _Queue({ANONYMOUS: 2})
    refused = _refusal(client, anonymous_part, in_flight=_holding(client, 2))
    assert refused is not None
    assert "places of anonymous clients" in refused[1]
    assert _refusal(other, anonymous_part) is None  # a key finds room
    assert _refusal(client, in_flight=_holding(client, 2)) == (
        ErrorCode.BUSY, "2 requests of this client are in flight "
        "(zmq.max_pending_per_client = 2); retry later")
    assert _refusal(client, in_flight=_holding(client, 1)) is None
    assert _refusal(client, in_flight=_holding(client, 2), per_client=None) is None


def test_one_host_holds_at_most_half_of_the_anonymous_places() -> None:
    # max_pending 4: anonymous clients hold 2 places, one host 1 of them.
    flood, home = anonymous("wyoming:1", host="192.0.2.9"), anonymous("wyoming:2", host="::1")
    queue = _Queue({ANONYMOUS: 1}, {flood.party: 1})
    refused = _refusal(anonymous("wyoming:3", host="192.0.2.9"), queue)  # same host
    assert refused is not None
    assert refused[0] == ErrorCode.BUSY
    assert "places of one host's anonymous clients" in refused[1]
    assert _refusal(home, queue) is None
    # A host not known (a Unix socket's peer) is no host: its client is a party of its own,
    # held only to the anonymous places of all.
    local = anonymous("zmq:ab")
    assert local.party == "zmq:ab"
    assert _refusal(local, _Queue({ANONYMOUS: 1}, {local.party: 1})) is None


def test_requests_in_flight_are_counted_per_client_whichever_intake_and_connection() -> None:
    key = keyed("curve", "abc")
    in_flight = InFlight()
    in_flight.add("a", key)
    in_flight.add("b", key)  # another connection, the same key: the same client
    in_flight.add("c", anonymous("wyoming:1"))
    in_flight.add("c", anonymous("wyoming:1"))  # added twice, counted once
    assert (in_flight.count(key.client), in_flight.count("wyoming:1")) == (2, 1)
    in_flight.done("a")
    in_flight.done("a")  # done twice (its reply, then its client gone): once
    in_flight.done("unknown")
    assert (in_flight.count(key.client), in_flight.count("wyoming:1")) == (1, 1)
    in_flight.done("b")
    in_flight.done("c")
    assert in_flight.count(key.client) == in_flight.count("wyoming:1") == 0


def test_the_queue_full_answer_is_the_refusal_of_a_client_with_a_key() -> None:
    # Service.queue_full (HTTP's health) is this: no anonymous part, no per-client limit.
    assert _refusal(LOCAL_ADMIN, _Queue({ANONYMOUS: 2}), per_client=None) is None
    assert _refusal(LOCAL_ADMIN, _Queue({ANONYMOUS: 4}), per_client=None) is not None
    assert _refusal(LOCAL_ADMIN, stopping=True, per_client=None) is not None


def test_an_unknown_voice_names_the_voices_there_are() -> None:
    voices = [VoiceInfo(name, "en-us", 22050, "tone") for name in ("tone", "bell")]
    error = unknown_voice("nobody", voices)
    assert error is not None
    assert (error.code, error.field) == (ErrorCode.UNKNOWN_VOICE, "voice")
    assert error.message == "voice: 'nobody' is not available; choose one of: bell, tone"
    assert unknown_voice("bell", voices) is None
    assert unknown_voice(None, voices) is None  # the default voice
    assert unknown_voice(7, voices) is None  # not a name: build_job says why
    assert unknown_voice("nobody", []) is None  # not ready: the worker decides
