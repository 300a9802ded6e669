"""A worker that freezes partway through sending a message bigger than the pipe's buffer.

The tick read the worker's pipe itself and waited in `recv()` for the rest of the message
for good: no watchdog ping in 10 s, no worker_lost, SIGTERM not acted on (workerpipe.py).
The engine here (this module is also the worker's engine, `tests.test_worker_pipe_stall:load`)
stops its own process with SIGSTOP after the first 64 KiB of a 2 MiB chunk. The other way
round, `send()` waited for a stopped worker to read: four segments for a batched worker, each
`RunSegment` carrying its job's 60 KB of text, are more than the socket holds.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from cosyvoiced.config import EngineConfig
from cosyvoiced.engines import AudioChunk, SynthesisRequest
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, process_alive, wait_until
from tests.engines.faulty import SAMPLE_RATE, BatchedToneEngine, ToneEngine

STALLING = "tests.test_worker_pipe_stall:load"
BATCHED_SHORT = "tests.test_worker_pipe_stall:load_batched_short"
BIG_CHUNK_SAMPLES = 1 << 19  # 2 MiB of float32: ten times the socket's buffer
SENT_BEFORE_STOP = 64 << 10
QUICK = {"job_timeout_s": 2.0, "kill_grace_s": 1.0, "heartbeat_interval_s": 0.5,
         "heartbeat_timeout_s": 3.0}
WATCHDOG = {"WATCHDOG_USEC": "1000000"}  # a ping due every 0.5 s


# -- the engine, in the worker process ---------------------------------------------------------
class StallingEngine(ToneEngine):
    """The tone engine; a sentence `STALL@<path>` (once: <path> is created) makes one big
    chunk, and the worker stops itself partway through sending it; `GARBLE@<path>` sends
    that chunk's message whole but unreadable (not a pickle)."""

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        fault, marker = next(((word.split("@")[0], Path(word.split("@")[1].rstrip(".")))
                              for word in request.text.split()
                              if word.startswith(("STALL@", "GARBLE@"))), ("", None))
        if marker is None or marker.exists():
            yield from super().synthesize(request)
            return
        marker.touch()
        _spoil_the_next_big_message(garble=fault == "GARBLE")
        yield np.full(BIG_CHUNK_SAMPLES, 0.1, dtype=np.float32)


def _spoil_the_next_big_message(garble: bool) -> None:
    original: Callable[[Connection, Any], None] = Connection._send_bytes  # type: ignore[attr-defined]

    def send_bytes(connection: Any, buf: Any) -> None:
        if len(buf) <= SENT_BEFORE_STOP:
            original(connection, buf)
            return
        Connection._send_bytes = original  # type: ignore[attr-defined]
        data = memoryview(buf)
        if garble:
            original(connection, b"\x80\x05garbled" + bytes(data[10:]))
            return
        connection._send(struct.pack("!i", len(data)))  # the header: the reader expects all
        connection._send(data[:SENT_BEFORE_STOP])
        os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops, the heartbeat's too
        connection._send(data[SENT_BEFORE_STOP:])

    Connection._send_bytes = send_bytes  # type: ignore[attr-defined]


def load(config: EngineConfig) -> StallingEngine:
    return StallingEngine()


class BatchedShortEngine(BatchedToneEngine):
    """The batched tone engine, 50 ms of tone for a segment however long its text: a job
    of 20,000 characters is quick."""

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        yield np.full(SAMPLE_RATE // 20, 0.1, dtype=np.float32)


def load_batched_short(config: EngineConfig) -> BatchedShortEngine:
    return BatchedShortEngine()


# -- the tests ---------------------------------------------------------------------------------
def stopped_worker(daemon: Daemon) -> int | None:
    """The pid of a worker stopped (SIGSTOP), if one is."""
    for pid in {event["worker_pid"] for event in daemon.log_events("worker_state")}:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "T":
            return int(pid)
    return None


def start_and_stall(daemon: Daemon, marker: Path) -> tuple[int, float]:
    """Start `daemon`, drop the job that stalls its worker; (the worker's pid, when)."""
    daemon.start(extra_env=WATCHDOG)
    daemon.drop("stall.txt", f"Stop partway. STALL@{marker}.")
    pid: int = wait_until(lambda: stopped_worker(daemon), 15, "the worker stopped partway")
    return pid, time.monotonic()


def test_a_worker_stopped_partway_through_a_message_is_killed_and_replaced(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = make_daemon(engine={"name": STALLING}, worker=QUICK)
    worker_pid, stopped_at = start_and_stall(daemon, tmp_path / "stalled")
    assert daemon.notify is not None
    lost = wait_until(lambda: daemon.log_events("worker_lost"), 10, "the stalled worker lost")
    assert lost[0]["worker_pid"] == worker_pid
    assert lost[0]["reason"] in ("job_timeout", "heartbeat_timeout")
    wait_until(lambda: not process_alive(worker_pid), 10, "the stalled worker killed")
    daemon.wait_done("stall.txt", timeout_s=15)  # retried by the replacement
    daemon.drop("after.txt", "Served by the replacement.")
    daemon.wait_done("after.txt", timeout_s=15)
    assert daemon.outcome_counts() == Counter({"stall.txt": 1, "after.txt": 1})
    assert len(daemon.log_events("job_retry")) == 1
    pings = [at for at in daemon.notify.times("WATCHDOG=1") if at > stopped_at]
    assert len(pings) >= 3, f"{len(pings)} watchdog pings since the worker stopped"


def test_sigterm_is_acted_on_while_a_worker_is_stopped_partway(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Timeouts long enough that the stalled worker is not given up on before the stop."""
    daemon = make_daemon(engine={"name": STALLING}, worker={
        "job_timeout_s": 60.0, "heartbeat_timeout_s": 60.0, "heartbeat_interval_s": 0.5,
        "kill_grace_s": 0.5, "drain_timeout_s": 1.0})
    worker_pid, stopped_at = start_and_stall(daemon, tmp_path / "stalled")
    notify = daemon.notify
    assert notify is not None
    wait_until(lambda: len([at for at in notify.times("WATCHDOG=1") if at > stopped_at]) >= 3,
               5, "watchdog pings while the worker is stopped")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout_s=10) == 0
    assert notify.seen("STOPPING=1")
    assert not process_alive(worker_pid)
    # Abandoned at the drain timeout: no outcome, kept for the next start.
    assert daemon.outcome("stall.txt") is None
    assert any((folder / "stall.txt").exists() for folder in (daemon.inbox, daemon.work))


def test_segments_for_a_stopped_worker_that_do_not_fit_its_pipe_hold_no_tick(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": BATCHED_SHORT}, worker=QUICK)
    daemon.start(extra_env=WATCHDOG)
    assert daemon.notify is not None
    worker_pid = daemon.log_events("worker_state")[-1]["worker_pid"]
    os.kill(worker_pid, signal.SIGSTOP)  # idle, ready: it is sent segments and reads none
    stopped_at = time.monotonic()
    text = ("語" * 99 + " ") * 200  # 20,000 characters, 60 KB in each RunSegment
    names = [f"wide-{n}.txt" for n in range(4)]
    for name in names:
        daemon.drop(name, text)
    lost = wait_until(lambda: daemon.log_events("worker_lost"), 10, "the stopped worker lost")
    assert lost[0]["worker_pid"] == worker_pid
    for name in names:
        daemon.wait_done(name, timeout_s=30)  # retried by the replacement
    assert daemon.outcome_counts() == Counter(dict.fromkeys(names, 1))
    pings = [at for at in daemon.notify.times("WATCHDOG=1") if at > stopped_at]
    assert len(pings) >= 3, f"{len(pings)} watchdog pings since the worker stopped"


def test_a_worker_message_that_cannot_be_read_kills_that_worker_only(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """The tick unpickled it and raised: the whole daemon ended (supervisor_crashed)."""
    daemon = make_daemon(engine={"name": STALLING}, worker=QUICK)
    daemon.start()
    daemon.drop("garbled.txt", f"Unreadable. GARBLE@{tmp_path / 'garbled'}.")
    daemon.wait_done("garbled.txt", timeout_s=15)  # retried by the replacement
    failed = daemon.log_events("worker_pipe_failed")
    assert len(failed) == 1
    assert "could not be read" in failed[0]["reason"]
    assert [e["reason"] for e in daemon.log_events("worker_lost")] == ["exited"]
    assert daemon.outcome_counts() == Counter({"garbled.txt": 1})
