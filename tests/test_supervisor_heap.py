"""The supervisor's heap after a burst: its free pages go back to the system (heap.py)."""

from __future__ import annotations

import json

import zmq

from cosyvoiced import heap
from cosyvoiced.memory import rss_bytes
from tests.conftest import DaemonFactory
from tests.daemon import wait_until

TONE = {"name": "tests.engines.faulty:load"}
CLIENTS, BATCH = 3000, 200
TEXT = "A client that sends this and hangs up at once. " * 40
# Measured on the 2-core machine: 70 MiB at the start, 127-165 MiB during the burst, and
# 100-102 MiB for good after it without the trim (187 MiB after 5,000 clients); 80 with it.
GROWN_BYTES, SETTLED_BYTES = 40 << 20, 20 << 20


def test_a_trim_is_due_only_after_the_heap_grew() -> None:
    assert not heap.trim_due(100 << 20, 100 << 20)
    assert not heap.trim_due((100 << 20) + heap.GREW_BYTES - 1, 100 << 20)
    assert heap.trim_due((100 << 20) + heap.GREW_BYTES, 100 << 20)


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


def test_a_burst_of_clients_that_hang_up_leaves_no_resident_heap_behind(
        make_daemon: DaemonFactory) -> None:
    """The free pages that a burst left between the objects still live stayed resident
    for as long as nothing reused them: 30 MiB over the supervisor's start for good after
    3,000 clients. A trim on the tick hands them back within heap.TRIM_INTERVAL_S."""
    daemon = make_daemon(engine=TONE)
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid
    started_with = rss_bytes(pid)
    _hang_up_burst(daemon.endpoint)
    grew = wait_until(lambda: (rss := rss_bytes(pid)) > started_with
                      + GROWN_BYTES and rss, 30, "the burst to grow the supervisor")
    wait_until(lambda: rss_bytes(pid) < started_with + SETTLED_BYTES,
               3 * heap.TRIM_INTERVAL_S, f"the supervisor (grown to {grew >> 20} MiB from "
               f"{started_with >> 20}) to hand its free heap back")
    trims = daemon.log_events("heap_trimmed")  # the operator sees what was handed back
    assert trims, "no heap_trimmed line"
    assert trims[0]["rss_after"] < trims[0]["rss_before"]
