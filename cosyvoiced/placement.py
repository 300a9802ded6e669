"""Where the workers run: `worker.per_device` processes on each of `worker.devices`.

Declared, not discovered (Triton's instance_group does the same): a worker is started with
only its own device visible, and CPU workers share the cores between them so that N of them
do not each start a thread per core.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cosyvoiced import memory

DEVICE = re.compile(r"^(cpu|cuda:\d+)$")
# worker.per_device = "auto", until the Config resolves it (`auto_per_device`).
PER_DEVICE_AUTO = 0
# Engines whose worker is small (Piper: ~0.2 GiB) and gains less from a second thread
# than a second request gains from a worker of its own: measured on 2 cores, one worker
# per core halves the wait of a request sent while another runs (bench/pool.py), at
# ~1.5x a lone request's first audio. A torch engine's worker already uses every core and
# holds GiBs: one per device.
SCALES_WITH_CORES = frozenset({"piper"})
# Past this many CPU workers the cores go to threads within each worker instead: the
# scheduler keeps at most scheduling.max_active_jobs (8) jobs of a class going.
MAX_AUTO_CPU_WORKERS = 8


@dataclass(frozen=True)
class Placement:
    slot: int
    device: str  # "cpu" or "cuda:N"
    cpu_threads: int  # the CPU engine's thread budget (onnxruntime, OpenMP); 0: its default

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) or 1


def auto_per_device(devices: list[str], engine: str, cores: int, machine_bytes: int) -> int:
    """worker.per_device = "auto": on a CPU-only host, one worker per core for an engine that
    scales so, as many as the workers' half of memory holds at the engine's RSS floor (the
    least worker.rss_limit "auto" gives each), at most MAX_AUTO_CPU_WORKERS; else one."""
    if engine not in SCALES_WITH_CORES or any(device != "cpu" for device in devices):
        return 1
    floor = memory.ENGINE_RSS_FLOOR.get(engine, memory.OTHER_ENGINE_RSS_FLOOR)
    by_memory = int(machine_bytes * memory.AUTO_RSS_SHARE) // floor
    return max(1, min(cores, by_memory, MAX_AUTO_CPU_WORKERS))


def plan(devices: list[str], per_device: int, cores: int, threads: int = 0) -> list[Placement]:
    """One placement per worker, devices interleaved (cuda:0, cuda:1, cuda:0, ...) so that a
    light load spreads over every device. `threads` 0 shares `cores` among the CPU workers;
    a lone CPU worker keeps its engine's own default (every core, as tuned by the library)."""
    order = [device for _ in range(per_device) for device in devices]
    cpu_workers = order.count("cpu")
    budget = threads or (max(1, cores // cpu_workers) if cpu_workers > 1 else 0)
    return [Placement(slot, device, budget) for slot, device in enumerate(order)]
