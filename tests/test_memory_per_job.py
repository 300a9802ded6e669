"""What one job may cost in worker memory: a text is always cut into segments (one engine call
each), and worker.rss_limit has a default derived from the machine and the engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyvoiced import config, memory
from cosyvoiced.client import Client
from cosyvoiced.config import RSS_LIMIT_AUTO, WorkerConfig, resolve_rss_limit
from cosyvoiced.memory import auto_rss_limit, parse_cgroup_limit, parse_meminfo_total
from cosyvoiced.policy import recycle_reason
from tests.conftest import DaemonFactory
from tests.daemon import wait_until
from tests.test_segments_markup import unpunctuated

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize(("machine", "workers", "engine", "limit"), [
    (64 * GiB, 1, "piper", 32 * GiB),  # half the machine for one worker
    (64 * GiB, 4, "piper", 8 * GiB),  # shared among four
    (64 * GiB, 4, "cosyvoice", 8 * GiB),
    (64 * GiB, 8, "cosyvoice", 8 * GiB),  # 4 GiB each would recycle after every job
    (4 * GiB, 4, "piper", 2 * GiB),  # a small host: still above what Piper needs
    (0, 1, "piper", 2 * GiB),  # memory unknown: the engine's floor
    (0, 1, "cosyvoice", 8 * GiB),
    (16 * GiB, 16, "tests.engines.faulty:load", 2 * GiB),  # any other engine
])
def test_the_auto_rss_limit_is_the_machines_share_never_under_the_engines_need(
        machine: int, workers: int, engine: str, limit: int) -> None:
    assert auto_rss_limit(machine, workers, engine) == limit


def test_the_worker_count_is_devices_times_per_device_plus_the_spare() -> None:
    settings = WorkerConfig(devices=["cuda:0", "cuda:1"], per_device=2, spare=True)
    assert settings.worker_count == 5
    resolved = resolve_rss_limit(settings, "cosyvoice", lambda: 100 * GiB)
    assert resolved.rss_limit == 10 * GiB
    # An explicit size, and 0 (off), are kept as they are.
    for explicit in (0, 3 * GiB):
        kept = WorkerConfig(rss_limit=explicit)
        assert resolve_rss_limit(kept, "piper", lambda: 100 * GiB) is kept


def test_machine_memory_is_read_from_meminfo_and_the_cgroup_limit() -> None:
    assert parse_meminfo_total("MemTotal:       24683652 kB\nMemFree: 1 kB\n") == \
        24683652 * 1024
    assert parse_meminfo_total("") == 0
    assert memory.parse_meminfo("MemTotal: 2 kB\nMemAvailable:  3 kB\n", "MemAvailable") == 3072
    assert parse_cgroup_limit("4294967296\n") == 4 * GiB
    assert parse_cgroup_limit("max\n") == 0  # cgroup v2: no limit
    assert parse_cgroup_limit("9223372036854771712\n") == 0  # cgroup v1: no limit
    assert memory.machine_bytes() > 0


def _load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_config_resolves_auto_and_keeps_0_and_sizes(tmp_path: Path) -> None:
    expected = auto_rss_limit(memory.machine_bytes(), 3, "piper")
    assert _load(tmp_path, '[worker]\nper_device = 3\n').worker.rss_limit == expected
    assert _load(tmp_path, '[worker]\nper_device = 3\nrss_limit = "auto"\n'
                 ).worker.rss_limit == expected
    assert _load(tmp_path, "[worker]\nrss_limit = 0\n").worker.rss_limit == 0
    assert _load(tmp_path, '[worker]\nrss_limit = "3GiB"\n').worker.rss_limit == 3 * GiB
    default = config.Config().worker  # per_device "auto" too: split among those workers
    assert default.rss_limit == auto_rss_limit(memory.machine_bytes(), default.worker_count,
                                               "piper")
    with pytest.raises(config.ConfigError, match=r'worker\.rss_limit: expected a size.* or "auto"'):
        _load(tmp_path, '[worker]\nrss_limit = "lots"\n')


def test_an_unresolved_auto_limit_recycles_nothing() -> None:
    unresolved = WorkerConfig()
    assert unresolved.rss_limit == RSS_LIMIT_AUTO
    assert recycle_reason(memory.Memory(100 * GiB), 10, unresolved) is None


def _worker(client: Client) -> dict[str, object]:
    workers = client.stats()["workers"]
    assert len(workers) == 1
    return dict(workers[0])


def test_a_tagged_unpunctuated_text_is_cut_and_the_worker_stays_small(
        make_daemon: DaemonFactory) -> None:
    """Before: "[x] " made the whole 2,000 characters one Piper call; the worker went from
    0.6 to 3 GiB resident and stayed there (20,000 characters: past 20 GB)."""
    daemon = make_daemon()
    daemon.start()
    (starting,) = daemon.log_events("starting")
    assert starting["rss_limit"] == auto_rss_limit(memory.machine_bytes(), 1, "piper")
    body = unpunctuated(2000)
    with Client(daemon.endpoint, timeout_s=30) as client:
        # The same words without the tag first: onnxruntime's arena grows to what segments
        # of this size need (some 600 MiB), and stays.
        daemon.drop("plain.txt", body)
        daemon.wait_done("plain.txt", timeout_s=90)
        warm = _worker(client)
        daemon.drop("tagged.txt", "[x] " + body)
        tagged = daemon.wait_done("tagged.txt", timeout_s=90)
        after = _worker(client)
    # The record is the commit point; the job's summary line follows it.
    (job,) = wait_until(lambda: [event for event in daemon.log_events("job")
                                 if event["job"] == tagged["job"]], 10, "the summary line")
    assert job["segments"] >= 6, job
    assert after["generation"] == warm["generation"]  # the same worker, not a fresh one
    grown = int(str(after["rss_bytes"])) - int(str(warm["rss_bytes"]))
    assert grown < 300 * MiB, f"the worker grew by {grown >> 20} MiB"
