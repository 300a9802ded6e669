"""Shared pieces of the benchmarks: the test sentences, a daemon to run, CPU and percentiles."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from cosyvoiced.client import Client
from tests.daemon import Daemon, free_port

SUBJECTS = ["The morning train", "A quiet library", "Our new neighbour", "The old lighthouse",
            "Every spring garden", "The river ferry", "A patient teacher", "The city council"]
PREDICATES = ["arrived a little later than the timetable promised",
              "keeps a careful record of everything that happens",
              "was painted bright yellow after the storm last winter",
              "opens early on weekdays and closes at noon on Sundays",
              "reminded everyone to bring a warm coat and a lantern"]


def sentences(count: int = 40) -> list[str]:
    """`count` distinct, natural sentences of varied length."""
    made = []
    for n in range(count):
        subject = SUBJECTS[n % len(SUBJECTS)]
        predicate = PREDICATES[(n // len(SUBJECTS) + n) % len(PREDICATES)]
        made.append(f"{subject} {predicate}." + (f" It was number {n}." if n % 3 else ""))
    return made


def streamed_timing(client: Client, text: str) -> tuple[float, float]:
    """(first audio, end) seconds after a streamed ZeroMQ request was sent."""
    started = time.perf_counter()
    first = 0.0
    with client.stream(text) as stream:
        for _pcm in stream:
            first = first or time.perf_counter() - started
    return first, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 0.5) * 1000, 2),
            "p95_ms": round(percentile(values, 0.95) * 1000, 2),
            "mean_ms": round(statistics.fmean(values) * 1000, 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def idle_cpu_percent(pids: list[int], seconds: float) -> float:
    before = sum(cpu_seconds(pid) for pid in pids)
    time.sleep(seconds)
    after = sum(cpu_seconds(pid) for pid in pids)
    return round(100 * (after - before) / seconds, 3)


__all__ = ["Daemon", "children", "cpu_seconds", "free_port", "idle_cpu_percent", "percentile",
           "sentences", "streamed_timing", "summary_ms"]
