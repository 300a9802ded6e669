"""The redis-server the cluster tests run on: durable through SIGKILL, ACLs, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redisserver import AclUser, RedisServer, needs_redis, redis_server_fixture  # noqa: F401


def test_a_stream_survives_sigkill_and_restart(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.set("greeting", "hello")
    assert client.get("greeting") == "hello"
    client.xgroup_create("jobs", "workers", id="0", mkstream=True)
    for n in range(3):
        client.xadd("jobs", {"n": str(n)})
    client.close()
    port = redis_server.port

    redis_server.kill()  # no clean shutdown: appendfsync always has the writes on disk
    assert not redis_server.running
    redis_server.restart()

    assert redis_server.port == port
    client = redis_server.client()
    assert client.xlen("jobs") == 3
    assert client.get("greeting") == "hello"
    assert [group["name"] for group in client.xinfo_groups("jobs")] == ["workers"]
    client.close()


@needs_redis
def test_password_and_an_acl_user_limited_to_its_keys(tmp_path: Path) -> None:
    daemon = AclUser("cosyvoiced", "daemon-secret", keys="cosyvoiced:*",
                     channels="cosyvoiced:*", commands="+@all -@dangerous")
    with RedisServer(tmp_path / "redis", aof=False, password="admin-secret",
                     users=[daemon]) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.url_for(daemon) == f"redis://cosyvoiced@127.0.0.1:{server.port}/0"
        anonymous = redis.Redis.from_url(server.url)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        admin = redis.Redis.from_url(server.url_with_password, decode_responses=True)
        assert admin.ping()
        admin.close()

        client = server.client(daemon)
        assert client.set("cosyvoiced:ok", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("elsewhere", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
        client.close()
        assert not (tmp_path / "redis" / "appendonlydir").exists()


@needs_redis
def test_leaving_the_context_leaves_no_process_and_frees_the_port(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        pid = server.pid
        client = server.client()
        assert client.ping()
        client.close()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    probe = server.client(socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        probe.ping()
    probe.close()
    server.stop()  # once more, as a teardown after a test's own stop() would: harmless
