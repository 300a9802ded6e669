"""The supervisor's end of a worker's pipe (workerpipe.py) on its own: a real socket pair, the
worker's end driven by the test. What it holds is bounded, and neither side blocks the tick."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait

import numpy as np
import pytest

from cosyvoiced.job import Job
from cosyvoiced.memory import Memory
from cosyvoiced.messages import AudioChunkReady, FromWorker, Heartbeat, RunSegment
from cosyvoiced.workerpipe import MAX_HELD_BYTES, MAX_HELD_MESSAGES, MAX_QUEUED_SENDS, WorkerPipe
from tests.daemon import wait_until


@pytest.fixture
def pipe() -> Iterator[tuple[WorkerPipe, Connection]]:
    """(the supervisor's end, the worker's end)."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe(duplex=True)
    worker_pipe = WorkerPipe(ours, "test-worker")
    yield worker_pipe, theirs
    theirs.close()
    worker_pipe.close()


def send_in_thread(end: Connection, messages: Sequence[FromWorker]) -> threading.Thread:
    def send_all() -> None:
        for message in messages:
            end.send(message)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    return sender


def take_all(worker_pipe: WorkerPipe, count: int) -> list[FromWorker]:
    taken: list[FromWorker] = []
    deadline = time.monotonic() + 10
    while len(taken) < count and time.monotonic() < deadline:
        wait([worker_pipe.fileno()], 0.5)  # readable: messages wait
        taken += worker_pipe.take()
    return taken


def test_many_small_messages_are_held_at_most_max_held_messages_at_once(
        pipe: tuple[WorkerPipe, Connection]) -> None:
    worker_pipe, theirs = pipe
    beats = [Heartbeat(Memory(n)) for n in range(3 * MAX_HELD_MESSAGES)]
    sender = send_in_thread(theirs, beats)
    time.sleep(0.3)  # untaken: the reader fills its buffer, then waits (so does the sender)
    assert sender.is_alive()
    first = worker_pipe.take()
    assert 0 < len(first) <= MAX_HELD_MESSAGES
    rest = take_all(worker_pipe, len(beats) - len(first))
    assert [beat.memory.rss_bytes for beat in [*first, *rest]  # type: ignore[union-attr]
            ] == list(range(len(beats)))


def test_big_messages_are_held_up_to_max_held_bytes_and_one_more(
        pipe: tuple[WorkerPipe, Connection]) -> None:
    worker_pipe, theirs = pipe
    chunk = np.zeros((1 << 20) // 4, dtype=np.float32)  # 1 MiB
    chunks = [AudioChunkReady("job", seq, chunk) for seq in range(40)]
    sender = send_in_thread(theirs, chunks)
    time.sleep(0.3)  # untaken: the reader fills its buffer, then waits (so does the sender)
    assert sender.is_alive()
    first = worker_pipe.take()
    assert 0 < len(first) * chunk.nbytes <= MAX_HELD_BYTES + chunk.nbytes
    assert len(first) < len(chunks)
    rest = take_all(worker_pipe, len(chunks) - len(first))
    assert [c.seq for c in [*first, *rest]] == list(range(40))  # type: ignore[union-attr]


def test_sends_to_a_worker_that_reads_nothing_return_at_once_and_are_bounded(
        pipe: tuple[WorkerPipe, Connection]) -> None:
    worker_pipe, _theirs = pipe
    job = Job(id="wide", source="test", origin="wide", text="語" * 20_000)
    began = time.monotonic()
    sent = [worker_pipe.send(RunSegment(job, 0, 1, job.text))
            for _ in range(MAX_QUEUED_SENDS + 8)]
    assert time.monotonic() - began < 2.0  # 60 KB each: the socket holds three
    # A few are written into the socket's buffer; the rest wait, MAX_QUEUED_SENDS at most.
    assert sent[:MAX_QUEUED_SENDS] == [True] * MAX_QUEUED_SENDS
    assert sent[-1] is False
    assert sum(sent) < MAX_QUEUED_SENDS + 8


def test_a_message_that_cannot_be_read_is_a_failure_the_tick_is_woken_for(
        pipe: tuple[WorkerPipe, Connection]) -> None:
    worker_pipe, theirs = pipe
    theirs.send(Heartbeat(Memory(1)))
    theirs.send_bytes(b"\x80\x05not a pickle")
    assert wait([worker_pipe.fileno()], 5)  # the tick is woken
    failure = wait_until(worker_pipe.failure, 5, "the failure")
    assert "could not be read" in failure
    assert worker_pipe.take() == [Heartbeat(Memory(1))]
    job = Job(id="j", source="test", origin="j", text="a")
    assert not worker_pipe.send(RunSegment(job, 0, 1, "a"))


def test_close_ends_both_threads_while_the_worker_holds_its_end_open(
        pipe: tuple[WorkerPipe, Connection]) -> None:
    worker_pipe, _theirs = pipe
    names = {"test-worker-read", "test-worker-write"}
    assert names <= {thread.name for thread in threading.enumerate()}
    began = time.monotonic()
    worker_pipe.close()
    assert time.monotonic() - began < 1.0
    assert worker_pipe.closed
    assert not names & {thread.name for thread in threading.enumerate()}
