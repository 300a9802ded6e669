"""The file descriptor limit: raised to the hard limit at start, and one warning when the
intakes' connection caps do not fit under it (fdlimit.py)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from cosyvoiced import config, fdlimit
from tests.conftest import DaemonFactory
from tests.daemon import free_port


# -- the decision ----------------------------------------------------------------------------
def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    assert fdlimit.plan(1024, 65536, {"http": 512}).soft == 65536


def test_a_soft_limit_already_at_the_hard_one_stays() -> None:
    assert fdlimit.plan(4096, 4096, {}).soft == 4096


def test_no_hard_limit_asks_for_what_the_caps_need_only() -> None:
    decided = fdlimit.plan(1024, resource.RLIM_INFINITY, {"zmq": 1024, "http": 512})
    assert decided.soft == 1024 + 512 + fdlimit.OWN_DESCRIPTORS
    assert decided.enough


def test_caps_over_the_limit_are_not_enough() -> None:
    decided = fdlimit.plan(256, 512, {"zmq": 1024})
    assert decided.soft == 512
    assert decided.needed == 1024 + fdlimit.OWN_DESCRIPTORS
    assert not decided.enough


def test_only_the_intakes_that_are_on_count(tmp_path: Path) -> None:
    path = tmp_path / "cosyvoiced.toml"
    path.write_text('[http]\nlisten = "127.0.0.1:8000"\nmax_connections = 100\n'
                    '[zmq]\nbind = []\n')
    assert fdlimit.connection_caps(config.load(path)) == {"http": 100}


# -- the daemon ------------------------------------------------------------------------------
def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def test_the_daemon_raises_its_soft_limit_to_the_hard_one(make_daemon: DaemonFactory) -> None:
    # Without privileges a hard limit can only be lowered: at most this process's own.
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    if hard < 1024:
        pytest.skip(f"this process's hard file limit is {hard}")
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         http={"listen": f"127.0.0.1:{free_port()}", "max_connections": 256},
                         zmq={"max_connections": 512})  # with 64 of its own: 832
    daemon.start(nofile=(256, hard))
    assert daemon.process is not None
    assert _open_files_limit(daemon.process.pid) == (hard, hard)
    assert daemon.log_events("descriptor_limit_raised")[0]["was"] == 256
    assert daemon.log_events("descriptor_limit_low") == []


def test_caps_over_the_hard_limit_get_one_warning(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         http={"listen": f"127.0.0.1:{free_port()}"})
    daemon.start(nofile=(256, 512))
    assert daemon.process is not None
    assert _open_files_limit(daemon.process.pid) == (512, 512)
    (warning,) = daemon.log_events("descriptor_limit_low")
    assert warning["level"] == "warning"
    assert warning["caps"] == {"http": 512, "zmq": 1024}
    assert warning["needed"] == 512 + 1024 + fdlimit.OWN_DESCRIPTORS
    assert "LimitNOFILE=" in warning["message"]
