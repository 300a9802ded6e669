"""Where the workers run: `worker.per_device` processes on each of `worker.devices`.

Declared, not discovered (Triton's instance_group does the same): a worker is started with
only its own device visible, and CPU workers share the cores between them so that N of them
do not each start a thread per core.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEVICE = re.compile(r"^(cpu|cuda:\d+)$")


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


def plan(devices: list[str], per_device: int, cores: int, threads: int = 0) -> list[Placement]:
    """One placement per worker, devices interleaved (cuda:0, cuda:1, cuda:0, ...) so that a
    light load spreads over every device. `threads` 0 shares `cores` among the CPU workers;
    a lone CPU worker keeps its engine's own default (every core, as tuned by the library)."""
    order = [device for _ in range(per_device) for device in devices]
    cpu_workers = order.count("cpu")
    budget = threads or (max(1, cores // cpu_workers) if cpu_workers > 1 else 0)
    return [Placement(slot, device, budget) for slot, device in enumerate(order)]
