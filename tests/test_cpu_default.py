"""The default on a CPU host serves several clients at once (worker.per_device "auto": one
Piper worker per core), and a Piper worker's memory stays flat over long texts (onnxruntime's
memory arena off by default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyvoiced import config, memory
from cosyvoiced.client import Client
from cosyvoiced.config import WorkerConfig, resolve_per_device
from cosyvoiced.memory import auto_rss_limit
from cosyvoiced.placement import (
    MAX_AUTO_CPU_WORKERS,
    PER_DEVICE_AUTO,
    auto_per_device,
    plan,
    usable_cores,
)
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.test_segments_markup import unpunctuated

GiB = 1 << 30
MiB = 1 << 20
DEFAULT = None  # a key given as None is left out of the config: the daemon's own default


@pytest.mark.parametrize(("devices", "engine", "cores", "machine", "workers"), [
    (["cpu"], "piper", 2, 24 * GiB, 2),  # one Piper worker per core
    (["cpu"], "piper", 6, 64 * GiB, 6),
    (["cpu"], "piper", 64, 512 * GiB, MAX_AUTO_CPU_WORKERS),  # then threads per worker
    (["cpu"], "piper", 16, 8 * GiB, 2),  # as many as half the memory holds at 2 GiB each
    (["cpu"], "piper", 4, 2 * GiB, 1),  # a small host: one
    (["cpu"], "piper", 1, 64 * GiB, 1),
    (["cpu"], "piper", 8, 0, 1),  # memory unknown: one, as before
    (["cuda:0"], "piper", 16, 64 * GiB, 1),  # a GPU host: one per GPU
    (["cpu", "cuda:0"], "piper", 16, 64 * GiB, 1),
    (["cpu"], "cosyvoice", 16, 256 * GiB, 1),  # torch uses every core in one worker
    (["cpu"], "tests.engines.faulty:load", 16, 64 * GiB, 1),  # an engine we know nothing of
])
def test_auto_per_device_is_one_piper_worker_per_core_within_memory(
        devices: list[str], engine: str, cores: int, machine: int, workers: int) -> None:
    assert auto_per_device(devices, engine, cores, machine) == workers


def test_auto_workers_share_the_cores() -> None:
    assert [p.cpu_threads for p in plan(["cpu"], auto_per_device(["cpu"], "piper", 2, 24 * GiB),
                                        cores=2)] == [1, 1]
    eight = auto_per_device(["cpu"], "piper", 32, 128 * GiB)
    assert {p.cpu_threads for p in plan(["cpu"], eight, cores=32)} == {4}


def test_per_device_auto_is_resolved_with_the_machine_and_explicit_counts_are_kept(
        tmp_path: Path) -> None:
    auto = resolve_per_device(WorkerConfig(), "piper", lambda: 4, lambda: 32 * GiB)
    assert auto.per_device == 4
    kept = WorkerConfig(per_device=3)
    assert resolve_per_device(kept, "piper", lambda: 16, lambda: 64 * GiB) is kept
    assert WorkerConfig().per_device == PER_DEVICE_AUTO  # unresolved until a Config is made

    expected = auto_per_device(["cpu"], "piper", usable_cores(), memory.machine_bytes())
    path = tmp_path / "c.toml"
    for text in ("", '[worker]\nper_device = "auto"\n'):
        path.write_text(text)
        loaded = config.load(path).worker
        assert loaded.per_device == expected
        # The auto memory limit is the machine's share split among those workers.
        assert loaded.rss_limit == auto_rss_limit(memory.machine_bytes(), expected, "piper")
    assert config.from_table({"engine": {"name": "tests.engines.faulty:load"}},
                             tmp_path).worker.per_device == 1
    path.write_text("[worker]\nper_device = 0\n")
    with pytest.raises(config.ConfigError, match=r"worker\.per_device: must be at least 1"):
        config.load(path)


def _idle_workers(daemon: Daemon, client: Client, count: int) -> list[dict[str, object]]:
    workers: list[dict[str, object]] = wait_until(
        lambda: (found := client.stats()["workers"]) and len(found) == count and
        all(worker["state"] == "idle" for worker in found) and found,
        60, f"{count} idle workers")
    return workers


def test_the_default_config_starts_one_worker_per_core_and_reports_them(
        make_daemon: DaemonFactory) -> None:
    chosen = auto_per_device(["cpu"], "piper", usable_cores(),
                             memory.machine_bytes())
    daemon = make_daemon(worker={"per_device": DEFAULT})
    daemon.start()
    (starting,) = daemon.log_events("starting")
    assert starting["per_device"] == chosen
    with Client(daemon.endpoint) as client:
        workers = _idle_workers(daemon, client, chosen)
    assert [worker["slot"] for worker in workers] == list(range(chosen))
    assert {worker["device"] for worker in workers} == {"cpu"}
    assert len({worker["pid"] for worker in workers}) == chosen
    assert daemon.notify is not None
    notify = daemon.notify
    status = wait_until(lambda: [line for line in notify.statuses()
                                 if all(f"worker {slot} cpu" in line for slot in range(chosen))],
                        30, "every worker in STATUS=")
    assert status[-1].startswith("idle")


def _workers_rss(client: Client) -> tuple[int, list[object]]:
    """(the workers' resident bytes together, read from /proc now; their generations)."""
    workers = client.stats()["workers"]
    return (sum(memory.rss_bytes(int(str(worker["pid"]))) for worker in workers),
            [worker["generation"] for worker in workers])


def test_piper_workers_stay_flat_over_long_texts_by_default(make_daemon: DaemonFactory) -> None:
    """An onnxruntime arena that keeps its peak (before: no shrinkage, no trim) left the two
    workers here 350 MiB larger after one long unpunctuated text, 550 MiB after four."""
    daemon = make_daemon(worker={"per_device": DEFAULT}, spool={"max_text_chars": 5000})
    daemon.start()
    with Client(daemon.endpoint, timeout_s=60) as client:
        count = len(_idle_workers(daemon, client, len(client.stats()["workers"])))
        for n in range(count):  # every worker has served a short job
            daemon.drop(f"short-{n}.txt", "A short sentence to settle the worker.")
        for n in range(count):
            daemon.wait_done(f"short-{n}.txt")
        settled, generations = _workers_rss(client)
        after = []
        for n in range(4):
            daemon.drop(f"long-{n}.txt", unpunctuated(1500, seed=n))
            daemon.wait_done(f"long-{n}.txt", timeout_s=120)
            rss, now = _workers_rss(client)
            assert now == generations, "a worker was replaced: its memory is not comparable"
            after.append(rss)
    grown = [(rss - settled) // MiB for rss in after]
    assert max(grown) < 150 * count, f"the workers grew by {grown} MiB over {count} workers"
    assert after[-1] - after[0] < 60 * MiB, f"still growing: {grown} MiB"
