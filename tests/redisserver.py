"""A real redis-server on loopback for the cluster tests: a free port and a directory of its own.

Debian's redis-server (7.0 on Debian 12; `make test` installs it as root) is started with a
config file written into its directory, never the system's config or port 6379. AOF is on by
default with `appendfsync always`, so a SIGKILL loses no acknowledged write and `restart()`
on the same port and directory finds the data again. Tests that need one use the fixture:

    from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401

    def test_something(redis_server: RedisServer) -> None:
        client = redis_server.client()

It skips the test, with the reason, where redis-server is not installed. Tests that build
their own RedisServer (a password, ACL users, several servers) mark themselves with
`needs_redis`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.daemon import free_port, wait_until

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# Another process may take a free port between the probe and redis-server's bind: the first
# start tries again on a new port (restart() keeps its port: the clients' URLs name it).
PORT_TRIES = 3


def redis_server_path() -> str | None:
    """Where redis-server is on PATH, or None."""
    return shutil.which("redis-server")


NOT_INSTALLED = ("redis-server is not installed (as root, `make test` installs Debian's; "
                 "otherwise apt-get install redis-server)")
needs_redis = pytest.mark.skipif(redis_server_path() is None, reason=NOT_INSTALLED)


@dataclass(frozen=True)
class AclUser:
    """A Redis ACL user: the daemon's own login, limited to its keys (README: cluster ACL).

    `keys` and `channels` are space-separated patterns (`~` and `&` rules); `commands` are
    ACL command rules, e.g. "+@all -@dangerous".
    """

    name: str
    password: str
    keys: str = "*"
    channels: str = "*"
    commands: str = "+@all"

    def rules(self) -> list[str]:
        return (["on", f">{self.password}"]
                + [f"~{pattern}" for pattern in self.keys.split()]
                + [f"&{pattern}" for pattern in self.channels.split()]
                + self.commands.split())


def _quoted(value: str) -> str:
    """A value as redis.conf reads it (double quotes, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, its files in `directory`.

    Every start/stop/kill/restart waits (bounded) for its effect. The process runs in a
    session of its own and its whole group is killed by stop() and kill(), so an AOF rewrite
    child cannot outlive it; use it as a context manager (or the fixture) so that a failing
    test leaves no process behind.
    """

    def __init__(self, directory: Path, *, aof: bool = True, password: str | None = None,
                 users: Sequence[AclUser] = ()) -> None:
        self.directory = directory
        self.aof = aof
        self.password = password
        self.users = tuple(users)
        self.port = free_port()
        self.config_path = directory / "redis.conf"
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0, without credentials (a daemon reads its password file)."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def url_with_password(self) -> str:
        """The URL with the default user's password in it (the same as `url` without one)."""
        if self.password is None:
            return self.url
        return f"redis://:{self.password}@{HOST}:{self.port}/0"

    def url_for(self, user: AclUser, with_password: bool = False) -> str:
        """The URL that logs in as an ACL `user` (its password in it only if asked)."""
        secret = f":{user.password}" if with_password else ""
        return f"redis://{user.name}{secret}@{HOST}:{self.port}/0"

    def client(self, user: AclUser | None = None, **options: Any) -> redis.Redis:
        """A client of this server: the default user (with its password), or an ACL user.

        Replies are str (decode_responses) unless `options` say otherwise.
        """
        settings: dict[str, Any] = {"decode_responses": True, "socket_timeout": 10.0}
        if user is not None:
            settings.update(username=user.name, password=user.password)
        else:
            settings.update(password=self.password)
        settings.update(options)
        return redis.Redis(host=HOST, port=self.port, **settings)

    # -- the process ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, "redis-server was never started"
        return self.process.pid

    def log(self) -> str:
        """What redis-server wrote to its log file so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start it and wait until it answers PING: on its port, or a fresh one if that is taken.

        After stop() or kill() it starts on the same port and directory, finding its AOF.
        """
        assert not self.running, "redis-server is already running"
        for _ in range(PORT_TRIES - 1):
            try:
                self._start()
                return
            except _PortTaken:
                self.port = free_port()
        self._start()

    def restart(self) -> None:
        """Stop it (if running) and start it again: same port, same directory and data."""
        self.stop()
        self._start()

    def stop(self) -> None:
        """SIGTERM (a clean shutdown: AOF flushed, children ended), SIGKILL if it takes long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL its whole process group (as a crash would), and reap it."""
        # Only while the server is not reaped: until then its pid, the group's id, is ours.
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.kill()

    # -- inside -----------------------------------------------------------------------------
    def _config(self) -> str:
        lines = [
            f"port {self.port}",
            f"bind {HOST}",
            "daemonize no",
            f"dir {_quoted(str(self.directory))}",
            f"logfile {_quoted(str(self.log_path))}",
            'save ""',
            f"appendonly {'yes' if self.aof else 'no'}",
            "appendfsync always",
        ]
        if self.password is not None:
            lines.append(f"requirepass {_quoted(self.password)}")
        for user in self.users:
            lines.append(" ".join(["user", user.name, *(_quoted(rule) for rule in user.rules())]))
        return "\n".join(lines) + "\n"

    def _start(self) -> None:
        binary = redis_server_path()
        if binary is None:
            raise AssertionError("redis-server is not on PATH (make test installs it as root)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with (self.directory / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [binary, str(self.config_path)], cwd=self.directory, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        # No retries inside redis-py (its default backs off for seconds): wait_until polls.
        probe = self.client(socket_timeout=1.0, socket_connect_timeout=1.0,
                            retry=Retry(NoBackoff(), 0))
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                log = self.log()[log_start:]
                if "Address already in use" in log:
                    raise _PortTaken(f"127.0.0.1:{self.port} is taken by another process")
                raise AssertionError(f"redis-server exited with {process.returncode} before "
                                     f"it answered:\n{log}{self._stderr()}")
            try:
                return bool(probe.ping())
            # Not listening yet, loading its AOF, or (until it gives up) another process on
            # the port.
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                return False

        try:
            wait_until(answers, START_TIMEOUT_S, f"redis-server to answer on port {self.port}")
        except BaseException:
            self.kill()
            raise
        finally:
            probe.close()

    def _stderr(self) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")


class _PortTaken(Exception):
    """Another process bound the port between free_port() and redis-server."""


# Registered as `redis_server` under another name, so that a test module can import it and
# still take `redis_server` as an argument (no F811 redefinition).
@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A started RedisServer (AOF on, no password) in tmp_path/redis; killed at teardown.

    Skips the test where redis-server is not installed.
    """
    if redis_server_path() is None:
        pytest.skip(NOT_INSTALLED)
    with RedisServer(tmp_path / "redis") as server:
        yield server
