"""The ZeroMQ intake's bounds on what one peer can make the supervisor hold: reply bytes a
client does not read (zmq.max_buffered_bytes), and connections that say nothing
(zmq.idle_timeout_s). Real daemons, real pyzmq clients."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from cosyvoiced.admission import TOTAL_BUFFERED_FACTOR, reply_fits
from cosyvoiced.client import Client
from cosyvoiced.config import ZmqConfig
from cosyvoiced.intake import tickbudget
from cosyvoiced.intake import zmq as zmq_intake
from cosyvoiced.intake.zmq_peers import (
    ERROR_ROOM,
    SETTLE_S,
    Departures,
    Outbox,
    Peers,
    is_idle,
)
from cosyvoiced.jobspec import Limits
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

TONE = {"name": "tests.engines.faulty:load"}
TONE_RATE = 22050
# 2,000 characters: about 100 s of tone, a 4.3 MB pcm_s16le reply.
LONG_TEXT = ("Memory held for a client stays bounded. " * 50)[:2000].strip()
LONG_REPLY_BYTES = 4 << 20  # at least
BUFFERED_LIMIT = 8 << 20
WAVES, WAVE = 16, 8  # requests the never-reading client sends, in waves of at most its 16
# The Python heap's own growth over 128 jobs, and the allocator's: the supervisor grew
# 60-61 MiB in all on the 2-core machine (with the limit and a reply), 513 MiB without
# the limit.
SLACK_BYTES = 80 << 20


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _answered(daemon: Daemon, requests: int) -> bool:
    """Whether the ZeroMQ requests so far each made a job or were refused."""
    ends = daemon.log_events("job") + daemon.log_events("request_refused")
    return sum(1 for end in ends if end.get("source") == "zmq") >= requests


def _never_reading_dealer(endpoint: str) -> zmq.Socket[bytes]:
    """A DEALER whose libzmq takes one message off the connection and then no more, as a
    client that stopped reading would (the daemon's endpoint is ipc://, whose kernel buffer
    holds a few hundred kilobytes)."""
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    return dealer


def _synthesize(request_id: str, text: str) -> bytes:
    return json.dumps({"v": 1, "op": "synthesize", "id": request_id, "text": text,
                       "format": "pcm_s16le"}).encode()


def _read_all(dealer: zmq.Socket[bytes], expected: int) -> list[tuple[dict[str, Any], int]]:
    """Every reply the dealer has coming (each request ends in one): (header, payload size)."""
    replies: list[tuple[dict[str, Any], int]] = []
    while len(replies) < expected and dealer.poll(30_000):
        frames = dealer.recv_multipart()
        replies.append((json.loads(frames[0]), len(frames[1]) if len(frames) > 1 else 0))
    return replies


@pytest.fixture
def cached_daemon(make_daemon: DaemonFactory) -> tuple[Daemon, int]:
    """A daemon with LONG_TEXT in its result cache, and the size of its reply."""
    daemon = make_daemon(engine=TONE, cache={"max_bytes": "256MiB"},
                         zmq={"max_buffered_bytes": BUFFERED_LIMIT})
    daemon.start()
    with Client(daemon.endpoint, timeout_s=60, retries=0) as client:
        for cached in (False, True):  # the second one comes from the result cache
            result = client.synthesize(LONG_TEXT, format="pcm_s16le")
            assert result.header["cached"] is cached
            assert len(result.audio) > LONG_REPLY_BYTES
    return daemon, len(result.audio)


def test_a_client_that_never_reads_cached_long_results_holds_a_bounded_amount(
        cached_daemon: tuple[Daemon, int]) -> None:
    """Finding 5 on ZeroMQ: cache hits finish at once, so they stop counting against
    max_pending_per_client; their 4.4 MB replies used to wait in libzmq's queue for the
    peer (SNDHWM was 100,000 messages), 128 of them 565 MB. Now at most
    zmq.max_buffered_bytes waits, the rest is dropped for `client_too_slow`, and further
    `synthesize` requests get `busy` until the client reads."""
    daemon, reply_bytes = cached_daemon
    assert daemon.process is not None
    pid = daemon.process.pid
    baseline = _rss_bytes(pid)
    dealer = _never_reading_dealer(daemon.endpoint)
    try:
        sent = 0
        for _ in range(WAVES):
            for _ in range(WAVE):
                dealer.send(_synthesize(f"r{sent}", LONG_TEXT))
                sent += 1
            wait_until(partial(_answered, daemon, sent), 60, "the daemon to answer the wave")
        grown = _rss_bytes(pid) - baseline
        print(f"supervisor RSS {baseline >> 20} MiB -> {(baseline + grown) >> 20} MiB "
              f"after {sent} unread requests for a {reply_bytes / 1e6:.1f} MB reply")
        assert grown < BUFFERED_LIMIT + reply_bytes + SLACK_BYTES, \
            f"the supervisor grew {grown >> 20} MiB for a client that does not read"
        # Another client is served meanwhile, at once.
        with Client(daemon.endpoint, timeout_s=30, retries=0) as other:
            short = other.synthesize("Another client is still served.", format="pcm_s16le")
            samples = np.frombuffer(short.audio, dtype="<i2")
            assert len(samples) / TONE_RATE > 1.0
            assert np.abs(samples).max() > 1000
        # When the client reads at last: whole replies, then the errors that replaced the
        # rest; every request has its one answer.
        replies = _read_all(dealer, sent)
        assert len(replies) == sent
        events = Counter(header.get("code", header["event"]) for header, _size in replies)
        assert events["client_too_slow"] > 0
        assert events["result"] + events["client_too_slow"] + events["busy"] == sent
        assert {size for header, size in replies if header["event"] == "result"} == \
            {reply_bytes}
        slow = next(header for header, _size in replies if header.get("code") ==
                    "client_too_slow")
        assert "zmq.max_buffered_bytes" in slow["message"]
        assert slow["job"]
        # Their jobs were done (cache hits): the log says that their results were not heard.
        dropped = {header["job"] for header, _size in replies
                   if header.get("code") == "client_too_slow"}
        wait_until(lambda: dropped <= {e["job"] for e in daemon.log_events("reply_undelivered")
                                       if e["source"] == "zmq"}, 10, "the dropped results "
                   "to be counted undelivered")
    finally:
        dealer.close(linger=0)


def test_a_stream_cut_for_an_unread_client_ends_in_one_error(
        cached_daemon: tuple[Daemon, int]) -> None:
    """Four cached streams of 4.3 MB at once for a client that does not read (8 MiB limit):
    the chunks over the limit are dropped; each stream then ends in one `client_too_slow`
    error with nothing after it, or whole (`end`), or is refused `busy` up front."""
    daemon, reply_bytes = cached_daemon
    dealer = _never_reading_dealer(daemon.endpoint)
    try:
        for n in range(4):
            dealer.send(json.dumps({"v": 1, "op": "synthesize", "id": f"s{n}", "stream": True,
                                    "text": LONG_TEXT}).encode())
        wait_until(partial(_answered, daemon, 4), 60, "the daemon to answer the streams")
        # The supervisor queues all of a hit's replies for the socket thread before it logs
        # the job, and that queue is first in, first out: once another client's ping is
        # answered, every chunk was handed to libzmq or dropped. Reading earlier would drain
        # the dealer while chunks are still being handed over, and then all four could fit.
        with Client(daemon.endpoint, timeout_s=30, retries=0) as other:
            other.ping()
        events: dict[str, list[tuple[str, int]]] = {f"s{n}": [] for n in range(4)}
        while dealer.poll(5_000):
            frames = dealer.recv_multipart()
            header = json.loads(frames[0])
            size = len(frames[1]) if len(frames) > 1 else 0
            events[header["id"]].append((header.get("code", header["event"]), size))
        endings = Counter(stream[-1][0] for stream in events.values())
        assert endings["client_too_slow"] > 0, events
        assert endings["client_too_slow"] + endings["end"] + endings["busy"] == 4
        for stream in events.values():
            assert [event for event, _size in stream[:-1]
                    if event not in ("start", "chunk")] == [], "a reply after the last"
            if stream[-1][0] == "end":
                assert sum(size for _event, size in stream) == reply_bytes
    finally:
        dealer.close(linger=0)


def _stream(request_id: str, text: str) -> bytes:
    return json.dumps({"v": 1, "op": "synthesize", "id": request_id, "stream": True,
                       "text": text}).encode()


def test_a_cut_stream_does_not_swallow_another_with_the_same_request_id(
        make_daemon: DaemonFactory) -> None:
    """Request ids are the client's to choose, and may repeat. Stream A is cut for an unread
    client; while its job is still being cancelled (its worker is in a slow sentence),
    stream B, with A's id, is answered from the cache. B's replies used to be dropped as
    A's were, its `end` too: the client never heard of B. Now a cut is the job's."""
    daemon = make_daemon(engine=TONE, cache={"max_bytes": "64MiB"},
                         zmq={"max_buffered_bytes": 1 << 20})
    daemon.start()
    cached = "These words come from the cache."
    with Client(daemon.endpoint, timeout_s=60, retries=0) as client:
        primed = client.stream(cached)
        assert b"".join(primed)
        assert primed.end is not None
    # Each segment (spool.max_segment_chars = 300) is a long sentence, 12 s of tone
    # (530 kB), then a short one that takes 4 s: a long one's chunk is the one cut, while
    # the worker is in the slow one, and the cancel lands when it is done with it.
    slow = " ".join(f"Sentence {n} is {'la ' * 78}done. SLOW@4 Wait." for n in range(8))
    dealer = _never_reading_dealer(daemon.endpoint)
    try:
        dealer.send(_stream("same", slow))
        cut = wait_until(lambda: daemon.log_events("client_too_slow"), 60, "stream A cut")
        cut_job = cut[0]["job"]
        seen: list[dict[str, Any]] = []
        while not any(reply.get("code") == "client_too_slow" for reply in seen):
            assert dealer.poll(10_000), "no client_too_slow error"
            seen.append(json.loads(dealer.recv_multipart()[0]))
        dealer.send(_stream("same", cached))
        after: list[dict[str, Any]] = []
        while dealer.poll(10_000):
            after.append(json.loads(dealer.recv_multipart()[0]))
            if after[-1].get("job") != cut_job and after[-1]["event"] == "end":
                break
        wait_until(lambda: any(e.get("job") == cut_job for e in daemon.log_events("job")), 30,
                   "A's job to be over")
    finally:
        dealer.close(linger=0)
    events = [(reply["event"], reply.get("job") == cut_job) for reply in after]
    assert events[:1] == [("start", False)], events
    assert events[-1] == ("end", False), events
    assert all(not of_a for _event, of_a in events), "a reply of the cut stream after its error"


# 12 sentences of a second each: a job that outlives the grace a client has to come back.
LONG_JOB = " ".join(f"Sentence {n} SLOW@1 here." for n in range(12))


def _job_ended(daemon: Daemon, job_id: str) -> dict[str, Any]:
    ended: dict[str, Any] = wait_until(lambda: next(
        (e for e in daemon.log_events("job") if e["job"] == job_id), None), 60,
        f"job {job_id} to end")
    return ended


def _dealer(daemon: Daemon, routing_id: bytes) -> zmq.Socket[bytes]:
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, routing_id)
    dealer.connect(daemon.endpoint)
    return dealer


def _left_mid_job(make_daemon: DaemonFactory, routing_id: bytes) -> tuple[Daemon, str]:
    """A daemon whose one job (LONG_JOB, running) has a client that closed its socket."""
    daemon = make_daemon(engine=TONE)
    daemon.start()
    dealer = _dealer(daemon, routing_id)
    dealer.send(_synthesize("long", LONG_JOB))
    # The job running: a local cosyvoicectl's admin token sees every client's.
    with Client(daemon.endpoint, timeout_s=30, admin_token=daemon.admin_token()) as operator:
        running = wait_until(lambda: operator.stats()["running"], 30, "a job to run")
    assert len(running) == 1, running
    dealer.close(linger=0)
    return daemon, str(running[0])


def test_a_client_that_left_has_its_waiting_job_cancelled(make_daemon: DaemonFactory) -> None:
    """A non-streamed job's one reply comes at its end: nothing noticed that its client had
    closed its socket, and the job ran to the end for no one. Now a client that does not
    come back within GONE_GRACE_S has its jobs cancelled."""
    daemon, job = _left_mid_job(make_daemon, b"leaver")
    ended = _job_ended(daemon, job)
    assert ended["outcome"] == "cancelled", ended
    assert any(e["job"] == job for e in daemon.log_events("client_gone"))


def test_a_client_back_within_the_grace_keeps_its_job(make_daemon: DaemonFactory) -> None:
    daemon, job = _left_mid_job(make_daemon, b"returner")
    # Away for 2 s of the 5 s grace (the scenario, not a wait): the daemon looks for
    # departed clients every second, so it has seen this one leave.
    time.sleep(2.0)
    back = _dealer(daemon, b"returner")  # as cosyvoiced.client.Client reconnects
    try:
        back.send(json.dumps({"v": 1, "op": "ping", "id": "back"}).encode())
        replies = _read_all(back, 2)
    finally:
        back.close(linger=0)
    assert [(header["event"], header["id"]) for header, _size in replies] == \
        [("pong", "back"), ("result", "long")]
    assert replies[1][0]["job"] == job
    assert replies[1][1] > 12 * TONE_RATE  # 12 sentences of pcm_s16le


def test_the_limit_is_a_pure_rule() -> None:
    limit = 8 << 20
    assert reply_fits(0, 70 << 20, limit)  # one reply bigger than the limit, alone
    assert reply_fits(1 << 20, 7 << 20, limit)
    assert not reply_fits(1 << 20, 7 << 20 + 1, limit)
    assert not reply_fits(1, 70 << 20, limit)


def test_all_peers_together_are_bounded_too_and_a_reader_never_cut() -> None:
    limit = 8 << 20
    assert TOTAL_BUFFERED_FACTOR * limit == 64 << 20  # the total the lines below meet
    assert reply_fits(1 << 20, 1 << 20, limit, 62 << 20)
    assert not reply_fits(1 << 20, 1 << 20, limit, (63 << 20) + 1)
    # One that holds little (a stream's last chunk) reads: it goes on up to twice the total.
    assert reply_fits(limit // 64, 1 << 20, limit, 100 << 20)
    assert not reply_fits((limit // 64) + 1, 1 << 20, limit, 100 << 20)
    assert reply_fits(0, 1 << 20, limit, 100 << 20)
    assert not reply_fits(0, 1 << 20, limit, 128 << 20)
    assert reply_fits(0, 300 << 20, limit, 0)  # the one reply anywhere
    assert not reply_fits(1, 300 << 20, limit, 1)


MEDIUM_TEXT = LONG_TEXT[:600].strip()  # a 1.3 MB reply: 6 fit under 8 MiB
PILERS, PILED = 20, 6


def test_many_clients_that_never_read_hold_a_bounded_amount_together(
        make_daemon: DaemonFactory) -> None:
    """Each within its own zmq.max_buffered_bytes, 20 clients that never read held 15
    times it (1,024 connections could hold 64 GiB). Together they may hold 8 times it:
    past that their replies are dropped for `client_too_slow`, and a client that reads
    is served all the while."""
    daemon = make_daemon(engine=TONE, cache={"max_bytes": "256MiB"},
                         zmq={"max_buffered_bytes": BUFFERED_LIMIT})
    daemon.start()
    with Client(daemon.endpoint, timeout_s=60, retries=0) as reader:
        reader.synthesize(MEDIUM_TEXT, format="pcm_s16le")  # now in the cache
    dealers = [_never_reading_dealer(daemon.endpoint) for _ in range(PILERS)]
    try:
        for n, dealer in enumerate(dealers):
            for m in range(PILED):
                dealer.send(_synthesize(f"d{n}-{m}", MEDIUM_TEXT))
        wait_until(partial(_answered, daemon, 1 + PILERS * PILED), 60, "every request")
        with Client(daemon.endpoint, timeout_s=30, retries=0) as reader:
            for _ in range(3):
                assert reader.synthesize(MEDIUM_TEXT, format="pcm_s16le").header["cached"]
        events: Counter[str] = Counter()
        held = 0  # the result bytes the daemon held for them at once: none was read before
        for dealer in dealers:
            replies = _read_all(dealer, PILED)
            assert len(replies) == PILED
            events.update(header.get("code", header["event"]) for header, _size in replies)
            held += sum(size for header, size in replies if header["event"] == "result")
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
    assert events["client_too_slow"] > 0, events
    reply = held // max(1, events["result"])  # every result is the one cached reply
    # Each may also take one reply into its own libzmq, and have one alone held here.
    assert held <= 8 * BUFFERED_LIMIT + 2 * PILERS * reply, f"{held >> 20} MiB held"


def test_departures_are_a_pure_rule() -> None:
    departures = Departures(grace_s=5.0, most=2)
    assert departures.left(b"a", 0.0) == []
    assert departures.left(b"b", 1.0) == []
    departures.back(b"b")  # it came back: never gone
    assert departures.left(b"c", 2.0) == []
    assert departures.left(b"a", 3.0) == []  # left again: its grace starts over
    assert departures.gone(7.9) == [b"c"]
    assert departures.gone(7.9) == []  # each once
    assert departures.left(b"d", 8.0) == []
    assert departures.left(b"e", 8.0) == [b"a"]  # over `most`: the longest away goes now
    assert departures.gone(13.0) == [b"d", b"e"]


def test_idleness_is_a_pure_rule() -> None:
    assert is_idle(100.0, 400.0, 300.0)
    assert not is_idle(100.0, 399.0, 300.0)
    assert not is_idle(0.0, 1e9, 0.0)  # 0: off


# -- zmq.idle_timeout_s ---------------------------------------------------------------------
IDLE_S = 2.0


def _watched_dealer(endpoint: str, reconnect: bool = True) -> tuple[zmq.Socket[bytes],
                                                                    zmq.Socket[bytes]]:
    """A DEALER and its own monitor, to see the daemon end its connection."""
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if not reconnect:  # a peer that is gone for good once dropped
        dealer.setsockopt(zmq.RECONNECT_IVL, -1)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    dealer.connect(endpoint)
    return dealer, monitor


def _close_watched(dealer: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    """Monitoring stops before its PAIR closes: libzmq sends each event blocking, so an
    event raised after the PAIR's reader is gone hangs this process's I/O thread for good,
    and every later ZeroMQ client in it (libzmq #3575; it failed a whole CI worker)."""
    dealer.disable_monitor()
    monitor.close(linger=0)
    dealer.close(linger=0)


def _next_event(monitor: zmq.Socket[bytes], timeout_s: float) -> int | None:
    if not monitor.poll(int(timeout_s * 1000)):
        return None
    return int(recv_monitor_message(monitor)["event"])


def _dropped_within(monitor: zmq.Socket[bytes], timeout_s: float) -> float | None:
    """Seconds until the daemon ended the connection (None: it did not, in time)."""
    began = time.monotonic()
    while (left := timeout_s - (time.monotonic() - began)) > 0:
        if _next_event(monitor, left) == zmq.EVENT_DISCONNECTED:
            return time.monotonic() - began
    return None


@pytest.fixture
def idle_daemon(make_daemon: DaemonFactory) -> Daemon:
    daemon = make_daemon(engine=TONE, zmq={"idle_timeout_s": IDLE_S, "max_connections": 3})
    daemon.start()
    return daemon


def test_idle_peers_are_dropped_and_busy_ones_kept(idle_daemon: Daemon) -> None:
    """A peer that never sends, and one that sent a ping and then nothing, are disconnected
    after zmq.idle_timeout_s; one whose job runs longer than that keeps its connection and
    gets its result."""
    silent, silent_monitor = _watched_dealer(idle_daemon.endpoint)
    pinged, pinged_monitor = _watched_dealer(idle_daemon.endpoint)
    busy, busy_monitor = _watched_dealer(idle_daemon.endpoint)
    try:
        for monitor in (silent_monitor, pinged_monitor, busy_monitor):
            assert _next_event(monitor, 10) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        pinged.send_json({"v": 1, "op": "ping", "id": "p"})
        assert pinged.poll(10_000)
        assert json.loads(pinged.recv())["event"] == "pong"
        # One sentence the tone engine takes 3 x the idle timeout over.
        busy.send_json({"v": 1, "op": "synthesize", "id": "b", "format": "pcm_s16le",
                        "text": f"SLOW@{3 * IDLE_S:g} waits."})
        for monitor in (silent_monitor, pinged_monitor):
            assert _dropped_within(monitor, 4 * IDLE_S + 2) is not None, "an idle peer was kept"
        assert busy.poll(int(6 * IDLE_S * 1000))
        result = busy.recv_multipart()
        assert json.loads(result[0])["event"] == "result"
        assert len(result[1]) > 0
        assert _next_event(busy_monitor, 0.1) is None, "the busy peer was dropped"
        assert idle_daemon.log_events("zmq_idle_peers_dropped")
    finally:
        for dealer, monitor in ((silent, silent_monitor), (pinged, pinged_monitor),
                                (busy, busy_monitor)):
            _close_watched(dealer, monitor)


def test_idle_peers_at_max_connections_make_room(idle_daemon: Daemon) -> None:
    """Three peers that connect and say nothing fill zmq.max_connections (3): a new client
    is refused, until the idle timeout drops them; then it gets in."""
    idle = [_watched_dealer(idle_daemon.endpoint, reconnect=False) for _ in range(3)]
    late: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    late.setsockopt(zmq.LINGER, 0)
    try:
        for _dealer, monitor in idle:
            assert _next_event(monitor, 10) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        late.connect(idle_daemon.endpoint)
        late.send_json({"v": 1, "op": "ping", "id": "late"})
        assert not late.poll(int(IDLE_S * 500)), "a fourth peer got in at max_connections"
        for _dealer, monitor in idle:
            assert _dropped_within(monitor, 4 * IDLE_S + 2) is not None
        # libzmq does not retry a refused handshake: the late client connects again.
        late.close(linger=0)
        late = zmq.Context.instance().socket(zmq.DEALER)
        late.setsockopt(zmq.LINGER, 0)
        late.connect(idle_daemon.endpoint)
        late.send_json({"v": 1, "op": "ping", "id": "again"})
        assert late.poll(10_000), "no room was made"
        assert json.loads(late.recv())["event"] == "pong"
    finally:
        late.close(linger=0)
        for dealer, monitor in idle:
            _close_watched(dealer, monitor)


def test_the_example_config_documents_the_bounds() -> None:
    example = (Path(__file__).resolve().parent.parent / "etc" / "cosyvoiced.toml").read_text()
    zmq_section = example.split("[zmq]", 1)[1].split("\n[", 1)[0]
    assert 'max_buffered_bytes = "64MiB"' in zmq_section
    assert "idle_timeout_s = 300.0" in zmq_section


def test_error_replies_a_peer_leaves_unread_are_bounded(make_daemon: DaemonFactory) -> None:
    """Errors always went out: a peer that sent bad requests with long ids and read nothing
    held up to SNDHWM (10,000) of them, about 5 MB, and they counted against every client's
    unread total (300 such peers cut every other client's audio off). Past ERROR_ROOM of
    them unread, a peer's errors of no job are dropped, with a log line."""
    daemon = make_daemon(engine=TONE)
    daemon.start()
    dealer = _never_reading_dealer(daemon.endpoint)
    try:
        bad = json.dumps({"v": 1, "op": "no_such_op", "id": "x" * 200}).encode()
        for _ in range(5000):  # 2.5 MB of errors: more than every buffer on the way holds
            dealer.send(bad)
        dropped = wait_until(lambda: daemon.log_events("zmq_error_replies_dropped"), 30,
                             "errors dropped for a peer that reads none")
        assert dropped[0]["count"] >= 1
        assert dropped[0]["error_room_bytes"] == ERROR_ROOM
    finally:
        dealer.close(linger=0)
    with Client(daemon.endpoint, timeout_s=30) as client:  # the others are served
        assert client.synthesize("Still here.", format="pcm_s16le").audio


class _Tracker:
    """A reply libzmq holds (done: let go of)."""

    def __init__(self, done: bool = False) -> None:
        self.done = done


def test_a_reply_handed_over_just_now_is_not_judged_unread_yet() -> None:
    """A client that read its 1.2 MiB reply and asked again at once was refused `busy` for
    it while every client's unread total was over its bound: libzmq lets go of a reply a
    moment after writing it, and pyzmq learns of it on a thread of its own (a CI flake)."""
    outbox = Outbox()
    older, newest = cast(zmq.MessageTracker, _Tracker()), cast(zmq.MessageTracker, _Tracker())
    outbox.hold(b"peer", older, 1000, now=10.0)
    outbox.hold(b"peer", newest, 5000, now=10.4)
    assert outbox.buffered(b"peer") == 6000  # both count against the totals
    assert outbox.unread(b"peer", 10.5) == 1000  # the newest is too recent to judge
    assert outbox.unread(b"peer", 10.4 + SETTLE_S) == 6000
    older.done = True  # type: ignore[misc]
    assert outbox.unread(b"peer", 10.4 + SETTLE_S) == 5000


def test_a_peer_that_left_and_came_back_starts_with_no_errors_held() -> None:
    """`forget` (the connection ended: libzmq dropped what it held) left the peer's count of
    unread errors behind, so a client that came back with its routing id found its error
    replies dropped for bytes libzmq no longer held."""
    outbox = Outbox()
    outbox.hold(b"peer", cast(zmq.MessageTracker, _Tracker()), ERROR_ROOM, error=True)
    assert not outbox.error_fits(b"peer", 1)
    outbox.forget(b"peer")
    assert outbox.error_fits(b"peer", ERROR_ROOM)
    assert outbox.total == 0


def test_a_routing_id_heard_after_its_descriptor_was_reused_is_not_kept_for_good() -> None:
    """A client that sends and hangs up at once: its end can be seen before its message is
    read, and a new connection can take the descriptor's number meanwhile. Its routing id
    was then kept for good (about 1.5% of such clients measured, every one of them while a
    tick was slow): anonymous ids are new each time, so the table grew without end."""
    first, second = socket.socketpair()
    with first, second:
        fd = first.fileno()
        # A's message read late, before or after B's first one (libzmq reads connections
        # in turn): B stays known while it is connected, and both go with the descriptor.
        for heard in ((b"A", b"B"), (b"B", b"A")):
            peers = Peers()
            peers.accepted(fd, 0.0)
            assert peers.disconnected(fd) == []  # A's end, before its message was read
            peers.accepted(fd, 1.0)  # B, on the same number
            for client in heard:
                peers.heard(fd, client, 1.0)
            assert peers.fd_of(b"B") == fd
            assert sorted(peers.disconnected(fd)) == [b"A", b"B"]
            assert (peers.fd_of(b"A"), peers.fd_of(b"B")) == (None, None)
        # One connection's id heard on a newer one (a client back under its own id) is
        # the newer one's: the older one's end does not take it.
        peers = Peers()
        peers.accepted(fd, 0.0)
        peers.heard(fd, b"C", 0.0)
        peers.accepted(second.fileno(), 1.0)
        peers.heard(second.fileno(), b"C", 1.0)
        assert peers.disconnected(fd) == []
        assert peers.fd_of(b"C") == second.fileno()


class _Undelivered:
    """A service that counts the jobs it is told were not all delivered."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def cancel(self, _job_id: str, _identity: Any = None) -> bool:
        return False  # ended

    def undelivered(self, job_id: str, _source: str) -> None:
        self.jobs.append(job_id)


def test_only_a_dropped_reply_of_the_jobs_output_counts_it_undelivered() -> None:
    """A `status`, `accepted` or `cancelled` reply about a job, dropped for a client too
    slow, says nothing of what the client got of its audio: counted undelivered, it marked
    a job whose result had gone out whole."""
    intake = zmq_intake.ZmqIntake(ZmqConfig(), lambda: Limits(100, "wav"), lambda: None)
    service = _Undelivered()
    for event in ("status", "accepted", "cancelled", "chunk", "end", "result"):
        intake._inbound.put(zmq_intake.ClientTooSlow(b"peer", f"job-{event}", event))
    intake.handle_inbound(service, tickbudget.TickBudget())  # type: ignore[arg-type]
    assert service.jobs == ["job-chunk", "job-end", "job-result"]
