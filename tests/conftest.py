from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Build (not start) daemons on fresh spools; every one is killed at teardown."""
    made: list[Daemon] = []

    def make(name: str = "d", **sections: dict[str, Any]) -> Daemon:
        daemon = Daemon(tmp_path / name, **sections)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One running daemon for a module of independent jobs (small limits, to test them)."""
    root = tmp_path_factory.mktemp("shared")
    daemon = Daemon(root, spool={"max_text_chars": 400, "max_file_bytes": 8192})
    daemon.start()
    yield daemon
    daemon.stop()
