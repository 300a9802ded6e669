"""Entries in Redis as untrusted as a LAN request (another version's, a bug's, or written by
whoever can write to Redis): a real daemon on a real Redis takes them off the shared stream
and must neither die nor write outside its spool."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from cosyvoiced import cluster
from cosyvoiced import clusterwire as wire
from cosyvoiced.client import Client
from cosyvoiced.config import ClusterConfig
from cosyvoiced.job import SINK_REPLY, Job
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401

INTERACTIVE = "cosyvoiced:jobs:interactive"
BULK = "cosyvoiced:jobs:bulk"


def _entry(host: str, **change: object) -> dict[str, bytes]:
    job = Job("1a0000000000000c3", "zmq", "r1", "A shared job.", sink=SINK_REPLY)
    return {"job": json.dumps(asdict(job) | change).encode(), "host": host.encode()}


def test_job_entries_of_the_wrong_types_or_names_are_dropped_and_the_daemon_serves_on(
        make_daemon: DaemonFactory, redis_server: RedisServer, tmp_path: Path) -> None:
    """A job whose text was a number killed the tick that took it (exit 5), and the host
    that took it over next, and the next. A receiving host named like a path put the
    entry's prompt bytes where it pointed, outside the spool."""
    daemon = make_daemon("a", engine={"name": "tests.engines.faulty:load"},
                         cluster={"redis": redis_server.url, "name": "a"})
    daemon.start()
    wait_until(lambda: daemon.log_events("cluster_joined"), 30, "the host to join")
    outside = tmp_path / "outside"
    outside.mkdir()
    redis = redis_server.client()
    redis.xadd(INTERACTIVE, _entry("b", text=1))  # type: ignore[arg-type]
    redis.xadd(INTERACTIVE, _entry(f"/../../../../../../..{outside}/")  # type: ignore[arg-type]
               | {"prompt": b"RIFF written where the entry said"})
    dropped = wait_until(lambda: len(daemon.log_events("shared_job_unreadable")) == 2 and
                         daemon.log_events("shared_job_unreadable"), 30, "both dropped")
    assert {e["error"].split(":")[1].strip() for e in dropped} == {"job.text", "host"}
    assert not list(outside.iterdir()), "a file was written outside the spool"
    daemon.drop("after.txt", "Still serving.")
    assert daemon.wait_done("after.txt")["served_by"] == "a"
    assert daemon.process is not None
    assert daemon.process.poll() is None


def test_a_shared_job_over_this_hosts_limits_fails_back_to_its_host(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """The wire's bounds are wider than a host's: a serving host checks a received job's
    text against its own limits, and an over-long one ends, with the reason, at the host
    that received it (exactly one outcome), instead of running."""
    daemon = make_daemon("a", engine={"name": "tests.engines.faulty:load"},
                         cluster={"redis": redis_server.url, "name": "a"},
                         spool={"max_text_chars": 1000})
    daemon.start()
    wait_until(lambda: daemon.log_events("cluster_joined"), 30, "the host to join")
    redis = redis_server.client()
    redis.set("cosyvoiced:job:b:1a0000000000000c3", "shared")  # b waits for it
    redis.xadd(INTERACTIVE, _entry("b", text="Words. " * 300))  # type: ignore[arg-type]
    events = wait_until(lambda: redis.xrange("cosyvoiced:events:b"), 30, "b's outcome")
    (_entry_id, fields), = events
    assert fields["kind"] == "failed"
    error = json.loads(fields["detail"])["error"]
    assert error["code"] == "text_too_long", error


def test_the_event_reader_waits_while_the_tick_holds_its_bound_of_audio(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One read took up to 512 events, and the reader never waited for the tick: a `done`
    event carries a drop-folder job's whole audio (about 100 MB for 20,000 characters), so
    a restarted host that found hundreds held gigabytes at once. It reads 16 at a time now,
    and waits while the tick has not taken EVENT_BYTES_WAITING of them (1 MiB here)."""
    monkeypatch.setattr(cluster, "EVENT_BYTES_WAITING", 1 << 20)
    redis = redis_server.client(decode_responses=False)
    for n in range(40):  # 100 kB of audio each
        redis.xadd("cosyvoiced:events:a", {
            "kind": "chunk", "job": "1a0000000000000d4", "from": "b",
            "detail": json.dumps({"seq": n}), "audio": bytes(100_000)})
    link = cluster.ClusterLink(ClusterConfig(redis=redis_server.url, name="a"), "a",
                               lambda: None)
    link.start()
    try:
        # One read at first, then twice as many each time (clusterwire.ReadCount): 1, 2,
        # 4, 8 events (1.5 MB) and then the reader waits.
        wait_until(lambda: link.events_read >= 15, 30, "the first reads")
        assert link.events_read == 15, "read on past the bound"
        taken = 0
        while taken < 40:  # the tick's part: take them, and more are read
            wait_until(lambda: not link.inbound.empty(), 30, "more events")
            while not link.inbound.empty():
                event = link.inbound.get_nowait()
                assert isinstance(event, wire.Event)
                link.taken(event)
                taken += 1
        assert link.event_bytes.held == 0
    finally:
        link.stop()


def test_an_outcome_with_numbers_no_arithmetic_takes_is_dropped_and_its_host_lives_on(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A `done` whose `timings.started_at` was a string killed the receiving host's tick
    (exit 5), and again at every restart: the event stayed in Redis, and the job in work/.
    One of 400 digits killed the event reader at every try (OverflowError): it read the
    stream again from its first entry, for good."""
    daemon = make_daemon("a", engine={"name": "tests.engines.faulty:never_ready"},
                         worker={"start_timeout_s": 3600.0},
                         cluster={"redis": redis_server.url, "name": "a"})
    daemon.start(wait_ready=False)
    wait_until(lambda: daemon.log_events("cluster_joined"), 30, "the host to join")
    daemon.drop_job("shared", text="Waits for another host to serve it.")
    redis = redis_server.client()
    [marker] = wait_until(lambda: redis.keys("cosyvoiced:job:a:*"), 30, "the job shared")
    job_id = marker.rsplit(":", 1)[1]
    done = {"voice": "v", "sample_rate": 22050, "samples": 0, "synth_s": 0.1,
            "first_chunk_s": 0.1}
    for started_at in ("x", 10**400):
        redis.xadd("cosyvoiced:events:a", {
            "kind": "done", "job": job_id, "from": "b",
            "detail": json.dumps(done | {"timings": {"started_at": started_at}})})
    dropped = wait_until(lambda: len(daemon.log_events("event_unreadable")) == 2 and
                         daemon.log_events("event_unreadable"), 30, "both dropped")
    assert all("timings: an object of numbers" in event["error"] for event in dropped)
    assert not daemon.log_events("cluster_thread_failed")
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert not list(daemon.outbox.glob("*.json")), "the job still waits for its outcome"


def test_the_events_of_a_host_gone_for_good_leave_redis_after_outcome_ttl_s(
        redis_server: RedisServer) -> None:
    """A host's event stream was trimmed only as events were added to it: that of a host
    gone for good (or of any name a writer made up) kept every outcome, with its audio."""
    settings = ClusterConfig(redis=redis_server.url, name="a", outcome_ttl_s=600.0)
    link = cluster.ClusterLink(settings, "a", lambda: None)
    link.start()
    try:
        link.send("gone", wire.Event(wire.STARTED, "1a0000000000000e5", "a",
                                     {"sample_rate": 16000}))
        redis = redis_server.client()
        wait_until(lambda: redis.exists("cosyvoiced:events:gone"), 30, "the event written")
        assert 0 < redis.ttl("cosyvoiced:events:gone") <= 600
    finally:
        link.stop()


def test_a_command_redis_refuses_is_dropped_and_the_writer_goes_on(
        redis_server: RedisServer) -> None:
    """Redis out of memory (maxmemory, noeviction) refused an event too big for it: the
    writer tried it again every 0.5 s for good, every later command of the host (outcomes,
    the deletes that would free memory) waited behind it, and the link went down and up
    over and over (the job reader's reads still worked)."""
    admin = redis_server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "3mb")
    went: list[bool] = []
    link = cluster.ClusterLink(ClusterConfig(redis=redis_server.url, name="a"), "a",
                               lambda: went.append(link.up))
    assert link.connect()
    link.start()
    try:
        link.send("b", wire.Event(wire.CHUNK, "1a0000000000000f1", "a", {"seq": 0},
                                  bytes(4 << 20)))
        link.send("c", wire.Event(wire.STARTED, "1a0000000000000f2", "a",
                                  {"sample_rate": 22050}))
        wait_until(lambda: admin.exists("cosyvoiced:events:c"), 30,
                   "the command behind the refused one to run")
        assert not admin.exists("cosyvoiced:events:b")
        assert link.up
        assert False not in went, "the link went down: Redis answered all along"
    finally:
        link.stop()
        admin.config_set("maxmemory", "0")


def test_a_shared_job_its_host_withdrew_is_dropped_not_served(
        redis_server: RedisServer) -> None:
    """A host that served a job itself withdraws it by deleting its marker; its entry may
    be unknown to it (shared by its life before a crash). A host that took such an entry
    served it again, for nobody: an entry whose marker is gone is dropped now."""
    redis = redis_server.client()
    redis.xgroup_create(BULK, wire.GROUP, id="0", mkstream=True)
    job = Job("1a0000000000000a1", "inbox", "r1", "Withdrawn.", output="w")
    waited = Job("1a0000000000000a2", "inbox", "r2", "Still waited for.", output="k")
    redis.xadd(BULK, wire.job_fields(job, "front", None))  # type: ignore[arg-type]
    redis.set("cosyvoiced:job:front:1a0000000000000a2", "shared")
    redis.xadd(BULK, wire.job_fields(waited, "front", None))  # type: ignore[arg-type]
    link = cluster.ClusterLink(ClusterConfig(redis=redis_server.url, name="back"), "back",
                               lambda: None)
    assert link.connect()
    link.start()
    try:
        link.want(2)
        taken = wait_until(lambda: not link.inbound.empty() and link.inbound.get_nowait(),
                           30, "a job taken")
        assert isinstance(taken, wire.SharedJob)
        assert taken.job.id == waited.id
        wait_until(lambda: redis.xlen(BULK) == 1, 30, "the withdrawn one dropped")
        assert link.inbound.empty()
    finally:
        link.stop()


def _status_says(daemon: Daemon, words: str) -> bool:
    assert daemon.notify is not None
    return any(words in line for line in daemon.notify.statuses())


def test_two_live_hosts_of_one_name_are_told_to_the_operator(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """Two daemons configured with the same cluster.name read one event stream and one
    consumer's pending jobs as their own (a restart of either takes the jobs the other
    serves), and nothing said so. Each sees the other's roster entries: an error in the log,
    in STATUS= and in stats, while both live."""
    first = make_daemon("first", engine={"name": "tests.engines.faulty:load"},
                        cluster={"redis": redis_server.url, "name": "same"})
    first.start()
    second = make_daemon("second", engine={"name": "tests.engines.faulty:load"},
                         cluster={"redis": redis_server.url, "name": "same"})
    second.start()
    for daemon in (first, second):
        taken = wait_until(functools.partial(daemon.log_events, "cluster_name_taken"), 30,
                           f"{daemon.root.name} to see the other")
        assert "give each host its own cluster.name" in taken[0]["message"]
        wait_until(functools.partial(_status_says, daemon, "another live host uses "
                                     "cluster.name 'same'"), 10, "STATUS=")
        with Client(daemon.endpoint, timeout_s=10) as client:
            assert "give each host" in client.stats()["cluster"]["name_taken"]
    assert len(first.log_events("cluster_name_taken")) == 1  # not once a round
