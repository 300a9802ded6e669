from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

DaemonFactory = Callable[..., Daemon]

# The files that take longest (the Debian package's build and chroot, daemon restarts, 120
# jobs through chaos), longest first, as measured in one run. `make test` hands whole files
# to its processes in the order collected (with --no-loadscope-reorder: xdist's default hands
# out the files with most tests first, and so started these last): these start first, so
# the run ends on short ones.
LONGEST_FILES = ("test_packaging.py", "test_lifecycle.py", "test_cluster.py", "test_chaos.py",
                 "test_supervision.py", "test_encoding.py", "test_cpu_default.py",
                 "test_elevenlabs_ws.py", "test_console.py", "test_cluster_chaos.py",
                 "test_memory_per_job.py", "test_http.py", "test_install.py",
                 "test_hostile_wyoming.py", "test_pool.py", "test_operations.py")


def _cuda_available() -> bool:
    try:
        import torch  # noqa: PLC0415 - optional: only GPU hosts install it
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first; `gpu` tests run only where torch sees a CUDA device (never
    in CI)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with torch (CUDA)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


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
