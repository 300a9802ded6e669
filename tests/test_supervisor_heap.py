"""The supervisor's heap after a burst: its free pages go back to the system (heap.py)."""

from __future__ import annotations

import itertools
import json
import mmap
import platform
import time
from pathlib import Path

import pytest
import zmq

from cosyvoiced import heap, memory
from cosyvoiced.memory import rss_bytes
from tests.conftest import DaemonFactory
from tests.daemon import peak_rss_bytes, wait_until

TONE = {"name": "tests.engines.faulty:load"}
CLIENTS, BATCH = 3000, 200
TEXT = "A client that sends this and hangs up at once. " * 40
# Measured on the 2-core machine: 70 MiB at the start, 127-165 MiB during the burst, and
# 100-102 MiB for good after it without the trim (187 MiB after 5,000 clients); 80 with it.
GROWN_BYTES, SETTLED_BYTES = 40 << 20, 20 << 20
MAPPED_BYTES = 64 << 20


def test_a_trim_is_due_only_when_the_heap_grew_over_its_floor() -> None:
    assert not heap.trim_due(100 << 20, 100 << 20)
    assert not heap.trim_due((100 << 20) + heap.GREW_BYTES - 1, 100 << 20)
    assert heap.trim_due((100 << 20) + heap.GREW_BYTES, 100 << 20)


class _Process:
    """The RSS a fake process has, and what a trim gives back of it."""

    def __init__(self, rss: int, live: int) -> None:
        self.rss, self.live, self.trims = rss, live, 0

    def trim(self) -> bool:
        self.trims += 1
        released = self.rss > self.live
        self.rss = self.live
        return released


def test_a_trim_during_a_burst_is_followed_by_one_after_it() -> None:
    """The floor was the RSS after the last trim: one in the middle of a burst (147 ->
    138 MiB, its objects still live) set it so high that the free pages the burst left
    once it ended (102 MiB) were never handed back. Only a trim that gave nothing back
    raises the floor now."""
    process = _Process(rss=70 << 20, live=70 << 20)
    trims = heap.HeapTrim(0.0, lambda: process.rss, process.trim)
    now = heap.LOOK_INTERVAL_S
    process.rss, process.live = 147 << 20, 138 << 20  # a burst, still live
    trims.trim_if_due(now)
    assert (process.trims, process.rss) == (1, 138 << 20)
    process.rss, process.live = 102 << 20, 80 << 20  # it ended: free pages left between
    trims.trim_if_due(now + heap.LOOK_INTERVAL_S)
    assert process.trims == 1, "still over its floor after the trim: the next look waits"
    trims.trim_if_due(now + 2 * heap.LOOK_INTERVAL_S)
    assert (process.trims, process.rss) == (2, 80 << 20)


def test_memory_that_stays_live_is_not_trimmed_again_and_again() -> None:
    process = _Process(rss=70 << 20, live=120 << 20)
    trims = heap.HeapTrim(0.0, lambda: process.rss, process.trim)
    process.rss = 120 << 20  # grown, and all of it live: a trim gives nothing
    for look in range(1, 5):
        trims.trim_if_due(look * heap.LOOK_INTERVAL_S)
    assert process.trims == 1
    process.rss, process.live = 150 << 20, 130 << 20  # grown again: worth a look
    trims.trim_if_due(5 * heap.LOOK_INTERVAL_S)
    assert (process.trims, process.rss) == (2, 130 << 20)


def test_memory_that_stays_live_beside_a_little_freed_is_trimmed_less_and_less_often(
        ) -> None:
    """Review: a daemon that holds more live memory than at its start, and frees a MiB or
    two beside it every 30 s, was trimmed (and logged) every 30 s for good."""
    process = _Process(rss=70 << 20, live=100 << 20)
    trims = heap.HeapTrim(0.0, lambda: process.rss, process.trim)
    now, trimmed_at = 0.0, []
    while now < 3600:
        now += 1.0
        process.rss = process.live + (2 << 20)  # 2 MiB freed since the last look
        before = process.trims
        trims.trim_if_due(now)
        if process.trims > before:
            trimmed_at.append(now)
    gaps = [b - a for a, b in itertools.pairwise(trimmed_at)]
    assert gaps[-1] == heap.LONGEST_LOOK_S
    assert len(trimmed_at) <= 12, f"{len(trimmed_at)} trims in an hour"


def test_looks_come_at_most_every_interval() -> None:
    process = _Process(rss=70 << 20, live=70 << 20)
    trims = heap.HeapTrim(0.0, lambda: process.rss, process.trim)
    process.rss = 200 << 20
    trims.trim_if_due(heap.LOOK_INTERVAL_S - 0.01)
    assert process.trims == 0
    trims.trim_if_due(heap.LOOK_INTERVAL_S)
    assert process.trims == 1


def _hang_up_burst(endpoint: str) -> None:
    """CLIENTS clients that each send a long request and hang up before the reply, a batch
    at a time: closing a batch's context waits (up to the linger) until its requests are
    out, so that they never hold more descriptors than a batch's."""
    for batch in range(0, CLIENTS, BATCH):
        with zmq.Context() as context:
            context.setsockopt(zmq.LINGER, 2000)  # the request still goes out after the close
            for n in range(batch, batch + BATCH):
                with context.socket(zmq.DEALER) as dealer:
                    dealer.connect(endpoint)
                    dealer.send(json.dumps({"v": 1, "op": "synthesize", "id": f"r{n}",
                                            "text": f"{n}. {TEXT}",
                                            "format": "pcm_s16le"}).encode())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_a_burst_of_clients_that_hang_up_leaves_no_resident_heap_behind(
        make_daemon: DaemonFactory) -> None:
    """The free pages that a burst left between the objects still live stayed resident
    for as long as nothing reused them: 30 MiB over the supervisor's start for good after
    3,000 clients. A trim on the tick hands them back within heap.LOOK_INTERVAL_S or two."""
    daemon = make_daemon(engine=TONE)
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid
    started_with = rss_bytes(pid)
    _hang_up_burst(daemon.endpoint)
    grew = peak_rss_bytes(pid)
    assert grew > started_with + GROWN_BYTES, "the burst did not grow the supervisor"
    wait_until(lambda: rss_bytes(pid) < started_with + SETTLED_BYTES,
               5 * heap.LOOK_INTERVAL_S, f"the supervisor (grown to {grew >> 20} MiB from "
               f"{started_with >> 20}) to hand its free heap back")
    trims = daemon.log_events("heap_trimmed")  # the operator sees what was handed back
    assert trims, "no heap_trimmed line"
    assert trims[0]["rss_after"] < trims[0]["rss_before"]


def test_a_file_the_supervisor_maps_and_reads_is_not_heap_to_trim(tmp_path: Path) -> None:
    """A long result's audio is read from the spool's disk through a map (replyaudio.py):
    its pages count in the RSS while it is encoded, but no trim gives them back. Counted,
    they made a trim due that gave nothing, and raised the floor for good to where the
    growth of the heap itself went unseen."""
    trims: list[float] = []

    def trim() -> bool:
        trims.append(time.monotonic())
        return True

    looks = heap.HeapTrim(0.0, trim=trim)
    path = tmp_path / "audio.f32"
    path.write_bytes(b"\x01" * MAPPED_BYTES)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        before = memory.rss_bytes()
        assert sum(mapped[at] for at in range(0, MAPPED_BYTES, 4096)) == MAPPED_BYTES // 4096
        assert memory.rss_bytes() - before > MAPPED_BYTES // 2, "the pages were not read in"
        looks.trim_if_due(heap.LOOK_INTERVAL_S)
    assert trims == []
