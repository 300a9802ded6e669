"""The Redis ACLs that README.md ("Several hosts") tells operators to use, exactly as printed.

The `user cosyvoiced ...` and `user keda ...` lines are read out of the README, so the
README and these tests cannot drift apart: the daemons log in with the first and do
everything cluster mode does (share, take, stream back, cancel, take over from a host
killed mid-job) without one command refused, and neither user can touch other keys or run
other commands. Redis keeps every refusal in its ACL LOG, which is what is checked.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import wait_until
from tests.redisserver import AclUser, RedisServer, needs_redis
from tests.test_cluster import CLAIM_IDLE_S, assert_exact_audio, expected_samples, host, start

README = Path(__file__).resolve().parent.parent / "README.md"
# redis-py sends CLIENT SETINFO on connect and ignores a refusal; Redis 7.0 does not know
# the command (so nothing is logged), 7.2 and later refuse it under this ACL and log that.
HARMLESS = {"client|setinfo"}


def readme_acl(name: str, password: str) -> AclUser:
    """The README's `user NAME ...` redis.conf line, its `>PLACEHOLDER` password replaced."""
    lines = [line.strip() for line in README.read_text().splitlines()
             if line.strip().startswith(f"user {name} ")]
    assert len(lines) == 1, f"README.md should show one `user {name} ...` line: {lines}"
    rules = lines[0].split()[2:]
    assert rules[0] == "on"
    assert sum(rule.startswith(">") for rule in rules) == 1, "one password placeholder"
    keys = [rule[1:] for rule in rules if rule.startswith("~")]
    channels = [rule[1:] for rule in rules if rule.startswith("&")]
    commands = [rule for rule in rules[1:] if not rule.startswith((">", "~", "&"))]
    return AclUser(name, password, keys=" ".join(keys), channels=" ".join(channels),
                   commands=" ".join(commands))


def refusals(server: RedisServer, user: str) -> list[dict[str, Any]]:
    return [entry for entry in server.client().acl_log()
            if entry["username"] == user and entry["object"] not in HARMLESS]


@needs_redis
def test_daemons_logged_in_with_the_readme_acl_share_jobs_and_take_them_over(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    user = readme_acl("cosyvoiced", "acl-test-password")
    password_file = tmp_path / "redis.password"
    password_file.write_text(user.password + "\n")
    with RedisServer(tmp_path / "redis", users=[user]) as server:
        login: dict[str, Any] = {"redis": server.url_for(user), "password_file": str(password_file)}
        assert login["redis"] == f"redis://cosyvoiced@127.0.0.1:{server.port}/0"
        front = start(host(make_daemon, server, "front", serves=False, **login), serves=False)
        servers = {name: start(host(make_daemon, server, name, **login)) for name in "bc"}
        streamed_text = "First sentence SLOW@0.2 now. Second sentence here."
        long_text = " ".join(f"Sentence {n} SLOW@0.5 now." for n in range(10))
        with Client(front.endpoint, timeout_s=30) as client:
            with client.stream(streamed_text) as stream:
                chunks = list(stream)
            # Longer than claim_idle_s: the receiving host checks that Redis still holds it.
            job = client.submit(long_text, output="long")
            first = wait_until(lambda: client.status(job).get("served_by"), 30,
                               "a host to start the long job")
            servers[first].signal(signal.SIGKILL)
            servers[first].wait_exit()
            status = wait_until(lambda: (s := client.status(job))["state"] == "done" and s,
                                CLAIM_IDLE_S + 30, "the other host to take it over")
            doomed = client.submit("Cancelled while it runs SLOW@5 here.", output="doomed")
            wait_until(lambda: client.status(doomed).get("served_by"), 30,
                       "a host to start the job to cancel")
            client.cancel(doomed)
            wait_until(lambda: client.status(doomed)["state"] == "cancelled", 30,
                       "the job to be cancelled")
        (survivor,) = set(servers) - {first}
        names = {entry["name"]: entry["user"] for entry in server.client().client_list()
                 if entry["name"].startswith("cosyvoiced:")}
        assert stream.end is not None
        assert stream.end["served_by"] in servers
        assert sum(len(chunk) for chunk in chunks) // 2 == expected_samples(streamed_text)
        assert status["served_by"] == survivor
        assert_exact_audio(front.outbox / "long.wav", long_text)
        assert servers[survivor].log_events("job_taken_over")
        assert set(names.values()) == {"cosyvoiced"}
        assert {"cosyvoiced:front", f"cosyvoiced:{survivor}"} <= set(names)
        assert not refusals(server, "cosyvoiced")
        for daemon in (front, servers[survivor]):
            assert not daemon.log_events("cluster_down")
            assert not daemon.log_events("cluster_thread_failed")


@needs_redis
def test_the_readme_acl_keeps_the_daemon_to_its_own_keys(tmp_path: Path) -> None:
    user = readme_acl("cosyvoiced", "acl-test-password")
    with RedisServer(tmp_path / "redis", users=[user]) as server:
        daemon = server.client(user)
        assert daemon.set("cosyvoiced:probe", "1", nx=True, ex=60)
        assert daemon.xadd("cosyvoiced:jobs:bulk", {"job": "x"})
        refused: list[Callable[[], object]] = [
            partial(daemon.set, "other:key", "1"),
            partial(daemon.delete, "other:key2"),
            partial(daemon.xadd, "other:stream", {"a": "1"}),
            partial(daemon.xrevrange, "cosyvoiced:jobs:bulk"),  # not a command it needs
            partial(daemon.get, "cosyvoiced:probe"),
            partial(daemon.keys, "*"),
            daemon.flushall,
            partial(daemon.config_get, "*"),
            partial(daemon.publish, "cosyvoiced:news", "1"),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                command()
        assert len(refusals(server, "cosyvoiced")) == len(refused)
        assert server.client().get("other:key") is None


@needs_redis
def test_the_readme_keda_acl_reads_the_job_streams_and_nothing_else(tmp_path: Path) -> None:
    user = readme_acl("keda", "keda-test-password")
    with RedisServer(tmp_path / "redis", users=[user]) as server:
        server.client().xgroup_create("cosyvoiced:jobs:bulk", "hosts", id="0", mkstream=True)
        server.client().xadd("cosyvoiced:jobs:bulk", {"job": "x"})
        keda = server.client(user)
        assert keda.ping()
        assert keda.xlen("cosyvoiced:jobs:bulk") == 1
        assert keda.xpending("cosyvoiced:jobs:bulk", "hosts")["pending"] == 0
        (group,) = keda.xinfo_groups("cosyvoiced:jobs:bulk")
        assert (group["name"], group["lag"]) == ("hosts", 1)
        refused: list[Callable[[], object]] = [
            partial(keda.xadd, "cosyvoiced:jobs:bulk", {"job": "y"}),
            partial(keda.xreadgroup, "hosts", "keda", {"cosyvoiced:jobs:bulk": ">"}),
            partial(keda.xlen, "cosyvoiced:events:front"),
            partial(keda.xlen, "other:stream"),
            partial(keda.set, "cosyvoiced:jobs:x", "1"),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                command()
        assert len(refusals(server, "keda")) == len(refused)
