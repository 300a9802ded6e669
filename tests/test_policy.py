"""The supervisor's decisions, without processes: figures and clocks are passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cosyvoiced.config import WorkerConfig
from cosyvoiced.memory import Memory
from cosyvoiced.policy import hung, job_timeout_s, recycle_reason, respawn_delay_s, silent

MiB = 1 << 20
LIMITS = WorkerConfig(rss_limit=500 * MiB, gpu_memory_limit=1000 * MiB, max_jobs=10)


@pytest.mark.parametrize(("memory", "jobs", "reason"), [
    (Memory(100 * MiB), 3, None),
    (Memory(501 * MiB), 3, "rss"),
    (Memory(100 * MiB, gpu_bytes=1001 * MiB), 3, "gpu_memory"),
    (Memory(100 * MiB, torch_reserved_bytes=1001 * MiB), 3, "gpu_memory"),
    (Memory(100 * MiB, gpu_bytes=900 * MiB, torch_reserved_bytes=800 * MiB), 3, None),
    (Memory(900 * MiB, gpu_bytes=2000 * MiB), 10, "max_jobs"),
])
def test_recycle_reason(memory: Memory, jobs: int, reason: str | None) -> None:
    assert recycle_reason(memory, jobs, LIMITS) == reason


def test_a_fresh_worker_is_not_recycled_for_memory() -> None:
    """Over a limit before any job: recycling would only reload the model, forever."""
    assert recycle_reason(Memory(900 * MiB, gpu_bytes=2000 * MiB), 0, LIMITS) is None
    assert recycle_reason(Memory(900 * MiB), 1, LIMITS) == "rss"


def test_zero_turns_every_limit_off() -> None:
    assert recycle_reason(Memory(1 << 40, 1 << 40, 1 << 40), 10**6, WorkerConfig()) is None


def test_job_timeout_scales_with_text_up_to_a_ceiling() -> None:
    auto = WorkerConfig()
    assert job_timeout_s(0, auto) == 30.0
    assert job_timeout_s(100, auto) == 50.0
    assert job_timeout_s(100_000, auto) == auto.job_timeout_max_s
    assert job_timeout_s(100_000, replace(auto, job_timeout_s=7.0)) == 7.0


def test_hung_and_silent_compare_against_the_clock_given() -> None:
    settings = WorkerConfig(job_timeout_s=5.0, heartbeat_timeout_s=10.0)
    assert not hung(last_progress=100.0, now=104.9, chars=10, settings=settings)
    assert hung(last_progress=100.0, now=105.1, chars=10, settings=settings)
    assert not silent(last_heard=100.0, now=109.0, settings=settings)
    assert silent(last_heard=100.0, now=110.5, settings=settings)


def test_respawn_backs_off() -> None:
    assert [respawn_delay_s(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
