"""Redis that answers but refuses (out of memory, a command taken out of the ACL), and
entries or events that no daemon of this version wrote: two real daemons on a real Redis,
the fault made from the test (CONFIG SET, ACL SETUSER, XADD with redis-py).

Host "a" never finishes loading its engine, so the jobs it receives are served by "b".
"""

from __future__ import annotations

import time

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_cluster import assert_exact_audio, host, start

BULK = "cosyvoiced:jobs:bulk"
CLAIM_IDLE_S = 2.0  # the least the config takes: a job left this long is taken over


def pair(make_daemon: DaemonFactory, server: RedisServer) -> tuple[Daemon, Daemon]:
    """(a, b): a receives only; b serves."""
    receiver = start(host(make_daemon, server, "a", serves=False, claim_idle_s=CLAIM_IDLE_S),
                     serves=False)
    server_b = start(host(make_daemon, server, "b", claim_idle_s=CLAIM_IDLE_S))
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

