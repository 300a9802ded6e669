"""Redis that answers but refuses (out of memory, a command taken out of the ACL), and
entries or events that no daemon of this version wrote: two real daemons on a real Redis,
the fault made from the test (CONFIG SET, ACL SETUSER, XADD with redis-py).

Host "a" never finishes loading its engine, so the jobs it receives are served by "b".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cosyvoiced import cluster
from cosyvoiced import clusterwire as wire
from cosyvoiced.client import Client
from cosyvoiced.config import ClusterConfig
from cosyvoiced.job import Job
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, peak_rss_bytes, wait_until
from tests.redisserver import RedisServer, needs_redis, redis_server_fixture  # noqa: F401
from tests.test_cluster import assert_exact_audio, host, start
from tests.test_cluster_acl import readme_acl

BULK = "cosyvoiced:jobs:bulk"
CLAIM_IDLE_S = 2.0  # the least the config takes: a job left this long is taken over


def pair(make_daemon: DaemonFactory, server: RedisServer,
         **login: Any) -> tuple[Daemon, Daemon]:
    """(a, b): a receives only; b serves."""
    receiver = start(host(make_daemon, server, "a", serves=False, claim_idle_s=CLAIM_IDLE_S,
                          **login), serves=False)
    server_b = start(host(make_daemon, server, "b", claim_idle_s=CLAIM_IDLE_S, **login))
    return receiver, server_b


def taken_by(server: RedisServer, consumer: str) -> bool:
    pending = server.client().xpending_range(BULK, "hosts", "-", "+", 10)
    return any(entry["consumer"] == consumer for entry in pending)


def made_at(daemon: Daemon) -> list[str]:
    """The jobs `daemon` made (one `job` summary line each)."""
    return [event["job"] for event in daemon.log_events("job")]


def test_an_outcome_redis_refuses_while_full_is_kept_and_sent_once_it_has_room(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """Redis full (maxmemory, noeviction) for 25 s while b served a's job: b's outcome was
    refused three times and dropped, the job's heartbeat stopped, b took it over from
    itself and made it again (9 takeovers, 10 refusals), and a recorded `worker_crashed`
    though no host or worker died. Now the outcome waits at b, its job heartbeated, and
    goes once Redis has room: made once, done once."""
    receiver, server_b = pair(make_daemon, redis_server)
    text = "Made while Redis is full SLOW@0.5 now."
    admin = redis_server.client()
    receiver.drop("job.txt", text)
    wait_until(lambda: taken_by(redis_server, "b"), 30, "b to take the job")
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        wait_until(lambda: server_b.log_events("cluster_command_refused"), 30,
                   "b's outcome to be refused")
        # Full for longer than a takeover takes: the old code took it over within this.
        full_until = time.monotonic() + 3 * CLAIM_IDLE_S
        wait_until(lambda: server_b.log_events("job_taken_over") or
                   time.monotonic() >= full_until, 30, "Redis full for a while")
    finally:
        admin.config_set("maxmemory", "0")
    record = receiver.wait_done("job.txt", 30)
    assert record["served_by"] == "b"
    assert_exact_audio(receiver.outbox / "job.wav", text)
    assert not server_b.log_events("job_taken_over"), "b's own job was taken over"
    assert len(made_at(server_b)) == 1, "made more than once"
    assert receiver.outcome_counts() == {"job.txt": 1}
    assert server_b.log_events("cluster_command_sent")
    assert admin.xlen(BULK) == 0


@needs_redis
def test_a_command_taken_out_of_the_acl_is_said_and_the_link_stays_up(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """`ACL SETUSER cosyvoiced -xautoclaim` on the README's ACL: the job reader took the
    refusal for Redis down, the writer for Redis up: 40 cluster_down and 39 cluster_up
    lines in 20 s, and 34 of 71 STATUS= lines said "Redis unreachable, serving here" while
    it answered. Now the refusal is said (once a minute, in STATUS= and stats too), the
    link stays up, and jobs are still shared."""
    user = readme_acl("cosyvoiced", "acl-test-password")
    password_file = tmp_path / "redis.password"
    password_file.write_text(user.password + "\n")
    with RedisServer(tmp_path / "redis", users=[user]) as server:
        receiver, server_b = pair(make_daemon, server, redis=server.url_for(user),
                                  password_file=str(password_file))
        server.client().execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "cosyvoiced", "-xautoclaim")
        wait_until(lambda: server_b.log_events("cluster_command_refused") or
                   server_b.log_events("cluster_down"), 30, "b to try a takeover")
        text = "Shared with one command refused."
        receiver.drop("job.txt", text)
        assert receiver.wait_done("job.txt", 30)["served_by"] == "b"
        assert_exact_audio(receiver.outbox / "job.wav", text)
        for daemon in (receiver, server_b):
            assert not daemon.log_events("cluster_down"), "the link went down"
        (refused,) = server_b.log_events("cluster_command_refused")  # once: not every try
        assert "xautoclaim" in refused["error"]
        assert server_b.notify is not None
        assert not any("unreachable" in line for line in server_b.notify.statuses())
        assert "Redis refuses: NoPermissionError" in server_b.notify.statuses()[-1]
        with Client(server_b.endpoint, timeout_s=10) as client:
            cluster = client.stats()["cluster"]
        assert cluster["connected"]
        assert "xautoclaim" in cluster["error"]


def test_a_job_cancelled_while_in_another_host_s_turns_is_not_made_there(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A job b had taken into its turns, not started, was cancelled at a: a only deleted
    its entry (a CANCEL went only to a host that had said it started), and b made the
    whole job (2.35 s of audio) for nobody. Now a tells the host holding the entry."""
    receiver, server_b = pair(make_daemon, redis_server)
    admin = redis_server.client()
    receiver.drop("busy.txt", "Keeps b busy SLOW@3 now.")
    wait_until(lambda: taken_by(redis_server, "b"), 30, "b to take the first job")
    with Client(receiver.endpoint, timeout_s=10) as client:
        job = client.submit("Made for nobody SLOW@1 now. And more SLOW@1 now.")
        wait_until(lambda: admin.xpending(BULK, "hosts")["pending"] == 2, 30,
                   "b to take the second into its turns")
        assert client.cancel(job)["event"] == "cancelled"
    lines = wait_until(lambda: len(server_b.log_events("job")) == 2 and
                       server_b.log_events("job"), 30, "b to end both jobs")
    assert {line["job"]: line["outcome"] for line in lines}[f"a-{job}"] == "cancelled"
    receiver.wait_done("busy.txt", 30)


def test_a_job_entry_no_host_here_can_read_gives_its_job_back_to_its_host(
        redis_server: RedisServer) -> None:
    """A job entry with a field this version does not know (a newer host's, in a rolling
    upgrade) was dropped by the host that took it, and nobody told its receiving host,
    which waited for it with "1 shared" in STATUS= for the marker's 7 days. Now its marker
    goes too: the receiving host's audit finds the job lost and serves it itself."""
    admin = redis_server.client()
    admin.xgroup_create(BULK, wire.GROUP, id="0", mkstream=True)
    job = Job("1a0000000000000b1", "inbox", "r1", "From a newer host.", output="n")
    fields = wire.job_fields(job, "front", None)
    fields["job"] = fields["job"].replace(b"{", b'{"newer_field": 1, ', 1)
    marker = "cosyvoiced:job:front:1a0000000000000b1"
    admin.set(marker, "shared")
    admin.xadd(BULK, fields)  # type: ignore[arg-type]
    link = cluster.ClusterLink(ClusterConfig(redis=redis_server.url, name="back"), "back",
                               lambda: None)
    assert link.connect()
    link.start()
    try:
        link.want(1)
        wait_until(lambda: not admin.exists(marker), 10, "the marker to go with the entry")
        assert admin.xlen(BULK) == 0
        assert not admin.xpending(BULK, wire.GROUP)["pending"]
        assert link.inbound.empty()
    finally:
        link.stop()


HUGE_BYTES = 32 << 20
HUGE_ENTRIES = 6


def test_huge_events_and_roster_entries_are_refused_one_at_a_time(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A peer with the daemons' login added 16 `part` events of 64 MiB to a host's event
    stream (or as many entries to the roster): each read took 16 (the roster's 500) of
    them whole, and the supervisor grew from 77 to 2,190 MiB. Now an entry over its bound
    is refused with a log line, and after a big one the readers take one at a time."""
    daemon = start(host(make_daemon, redis_server, "a"))
    assert daemon.process is not None
    admin = redis_server.client(decode_responses=False)
    before = peak_rss_bytes(daemon.process.pid)
    huge = bytes(HUGE_BYTES)
    for seq in range(HUGE_ENTRIES):
        admin.xadd("cosyvoiced:events:a", {
            "kind": "part", "job": "1a0000000000000e1", "from": "b",
            "detail": json.dumps({"seq": seq}), "audio": huge})
        admin.xadd("cosyvoiced:hosts", {"host": "b", "figures": huge})
    refused = wait_until(lambda: len(daemon.log_events("event_unreadable")) == HUGE_ENTRIES
                         and daemon.log_events("event_unreadable"), 30, "the parts refused")
    assert f"is over {1 << 20}" in refused[0]["error"]
    wait_until(lambda: daemon.log_events("roster_entry_too_big"), 30, "the roster's refused")
    grown_mib = (peak_rss_bytes(daemon.process.pid) - before) >> 20
    # A read of one such entry holds a few copies of it (redis-py's buffers), and the
    # event reader and the roster may read one each at the same time: 128 MiB measured,
    # against 449 MiB and more when the reads took them all.
    assert grown_mib < HUGE_ENTRIES * (HUGE_BYTES >> 20), f"the supervisor grew {grown_mib} MiB"
    daemon.drop("after.txt", "Still serving.")
    assert daemon.wait_done("after.txt", 30)["served_by"] == "a"
