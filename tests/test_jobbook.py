"""The job book without processes: fake workers and sinks, a fake encoder. What a job's
segments, chunks, crashes and cancels come to, and that each job ends exactly once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from cosyvoiced.config import Config
from cosyvoiced.encoding import Encoded, Encoder
from cosyvoiced.job import (
    SINK_REPLY,
    Deferred,
    ErrorCode,
    Job,
    JobError,
    JobResult,
    ResultAudio,
)
from cosyvoiced.jobs import JobBook
from cosyvoiced.ledger import Running
from cosyvoiced.messages import (
    AudioChunkReady,
    CancelJob,
    JobCancelled,
    RunSegment,
    SegmentFinished,
    SegmentStarted,
)
from cosyvoiced.replyaudio import IN_MEMORY_BYTES
from cosyvoiced.spool import Spool
from cosyvoiced.workerhandle import WorkerHandle, WorkerState

RATE = 100


class FakeWorker:
    def __init__(self, slot: int, streams: int = 1) -> None:
        self.slot, self.generation = slot, 1
        self.jobs: list[str] = []
        self.streams = streams
        self.state = WorkerState.IDLE
        self.segments_served = 0
        self.sent: list[Any] = []

    @property
    def free_streams(self) -> int:
        return self.streams - len(self.jobs)

    def send(self, message: Any) -> bool:
        self.sent.append(message)
        return True

    def set_state(self, state: WorkerState, **_detail: object) -> None:
        self.state = state


class FakeSink:
    def __init__(self, fail_write: bool = False, deferred: bool = False) -> None:
        self.events: list[tuple[str, Any]] = []
        self.fail_write, self.deferred = fail_write, deferred

    def started(self, job: Job, sample_rate: int) -> None:
        self.events.append(("started", sample_rate))

    def chunk(self, job: Job, seq: int, samples: Any) -> None:
        self.events.append(("chunk", (seq, len(samples))))

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str | Deferred:
        if self.fail_write:
            raise OSError("disk full")
        if self.deferred:
            return Deferred(made, "ogg", self._publish)
        self.events.append(("deliver", made.frames))
        return "out"

    def _publish(self, data: bytes) -> str:
        self.events.append(("published", data))
        return "published"

    def fail_job(self, job: Job, error: JobError) -> str:
        self.events.append(("failed", str(error.code)))
        return "failed"

    def cancelled(self, job: Job) -> None:
        self.events.append(("cancelled", None))


class FakeEncoder:
    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.done: list[Encoded] = []

    def submit(self, key: str, made: ResultAudio, fmt: str,
               save: Callable[[bytes], None] | None = None) -> None:
        self.submitted.append(key)

    def completed(self) -> list[Encoded]:
        done, self.done = self.done, []
        return done


@pytest.fixture
def encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def book(tmp_path: Path, encoder: FakeEncoder) -> JobBook:
    spool = Spool(tmp_path)
    spool.ensure()
    config = Config()
    return JobBook(spool, cast(Encoder, encoder), lambda job: job, lambda: config)


def _job(job_id: str, stream: bool = False) -> Job:
    return Job(id=job_id, source="zmq", origin=job_id, text="x", sink=SINK_REPLY,
               stream=stream, owner="me", share="me")


def _workers(count: int) -> dict[int, WorkerHandle]:
    return {slot: cast(WorkerHandle, FakeWorker(slot)) for slot in range(count)}


def _run_segment(book: JobBook, worker: WorkerHandle, job_id: str, index: int,
                 chunks: int = 2) -> None:
    book.on_worker_message(worker, SegmentStarted(job_id, index, "v", RATE, 1.0), 0.0)
    for seq in range(chunks):
        book.on_worker_message(worker, AudioChunkReady(job_id, seq,
                                                       np.zeros(10, np.float32)), 0.0)
    book.on_worker_message(worker, SegmentFinished(job_id, index, 10 * chunks, 0.1, 0.05),
                           0.0)


def test_segments_go_in_order_and_a_whole_reply_is_delivered_once(book: JobBook) -> None:
    sink = FakeSink()
    book.admit(_job("a"), sink, ["one. ", "two. ", "three."], persisted=False)
    workers = _workers(1)
    for index in range(3):
        book.dispatch(workers, float(index), stopping=False)
        sent = cast(FakeWorker, workers[0]).sent[-1]
        assert isinstance(sent, RunSegment)
        assert sent.index == index
        _run_segment(book, workers[0], "a", index)
    assert sink.events == [("started", RATE), ("deliver", 60)]
    assert [c.outcome for c in book.closed] == ["done"]
    assert book.get("a") is None


def test_a_done_job_whose_reply_was_not_all_received_is_told_apart(book: JobBook) -> None:
    """Its outcome stays done (the audio was made), its status and the counts say that its
    client did not get it all."""
    book.admit(_job("a"), FakeSink(), ["one."], persisted=False)
    workers = _workers(1)
    book.dispatch(workers, 0.0, stopping=False)
    _run_segment(book, workers[0], "a", 0)
    book.undelivered("a", "http")
    status = book.records.status("a")
    assert status is not None
    assert (status["state"], status["delivered"]) == ("done", False)
    assert (book.records.counts["done"], book.records.counts["undelivered"]) == (1, 1)
    book.undelivered("a", "http")  # told twice (a cut stream, then its hang-up): once
    book.admit(_job("b"), FakeSink(), ["one."], persisted=False)
    book.cancel("b")
    book.undelivered("b", "http")  # not done: nothing was made to deliver
    assert book.records.counts["undelivered"] == 1


def test_a_stream_sends_every_chunk_as_it_comes(book: JobBook) -> None:
    sink = FakeSink()
    book.admit(_job("s", stream=True), sink, ["one. ", "two."], persisted=False)
    workers = _workers(1)
    for index in range(2):
        book.dispatch(workers, 0.0, stopping=False)
        _run_segment(book, workers[0], "s", index)
    seqs = [detail[0] for kind, detail in sink.events if kind == "chunk"]
    assert seqs == [0, 1, 2, 3]  # numbered across segments
    assert sink.events[-1] == ("deliver", 0)


def test_a_crash_retries_the_segment_then_the_poison_limit_ends_the_job(book: JobBook) -> None:
    sink = FakeSink()
    book.admit(_job("p"), sink, ["one."], persisted=False)
    workers = _workers(1)
    book.dispatch(workers, 0.0, stopping=False)
    book.lost(workers[0], "exited", 0.0)
    running = book.get("p")
    assert running is not None
    assert running.retry
    assert book.freed == [workers[0]]
    book.dispatch(workers, 1.0, stopping=False)
    book.lost(workers[0], "job_timeout", 1.0)
    assert sink.events == [("failed", "worker_crashed")]
    assert book.get("p") is None


def test_a_streamed_segment_that_sent_audio_is_not_replayed(book: JobBook) -> None:
    sink = FakeSink()
    book.admit(_job("s", stream=True), sink, ["one."], persisted=False)
    workers = _workers(1)
    book.dispatch(workers, 0.0, stopping=False)
    book.on_worker_message(workers[0], SegmentStarted("s", 0, "v", RATE, 1.0), 0.0)
    book.on_worker_message(workers[0], AudioChunkReady("s", 0, np.zeros(5, np.float32)), 0.0)
    book.lost(workers[0], "exited", 0.0)
    assert sink.events[-1] == ("failed", "worker_crashed")


def test_cancel_while_queued_held_and_after_the_last_chunk(book: JobBook) -> None:
    queued, held, late = FakeSink(), FakeSink(), FakeSink()
    book.admit(_job("q"), queued, ["one."], persisted=False)
    assert book.cancel("q")
    assert queued.events == [("cancelled", None)]

    workers = _workers(1)
    book.admit(_job("h"), held, ["one."], persisted=False)
    book.dispatch(workers, 0.0, stopping=False)
    assert book.cancel("h")
    assert isinstance(cast(FakeWorker, workers[0]).sent[-1], CancelJob)
    book.on_worker_message(workers[0], JobCancelled("h"), 0.0)
    assert held.events == [("cancelled", None)]

    book.admit(_job("l", stream=True), late, ["one."], persisted=False)
    book.dispatch(workers, 0.0, stopping=False)
    book.on_worker_message(workers[0], SegmentStarted("l", 0, "v", RATE, 1.0), 0.0)
    book.on_worker_message(workers[0], AudioChunkReady("l", 0, np.zeros(10, np.float32)), 0.0)
    assert book.cancel("l")  # asked after its last chunk, before it finished
    assert isinstance(cast(FakeWorker, workers[0]).sent[-1], CancelJob)
    book.on_worker_message(workers[0], SegmentFinished("l", 0, 10, 0.1, 0.05), 0.0)
    assert late.events == [("started", RATE), ("chunk", (0, 10)), ("cancelled", None)]
    assert [c.outcome for c in book.closed] == ["cancelled"] * 3


def test_another_clients_job_cannot_be_cancelled(book: JobBook) -> None:
    from cosyvoiced.clients import anonymous  # noqa: PLC0415 - only here

    book.admit(_job("mine"), FakeSink(), ["one."], persisted=False)
    assert not book.cancel("mine", anonymous("someone-else"))
    assert book.get("mine") is not None


def test_a_failed_write_fails_the_job_with_internal(book: JobBook) -> None:
    sink = FakeSink(fail_write=True)
    book.admit(_job("w"), sink, ["one."], persisted=False)
    workers = _workers(1)
    book.dispatch(workers, 0.0, stopping=False)
    _run_segment(book, workers[0], "w", 0)
    assert sink.events[-1] == ("failed", "internal")
    assert [c.outcome for c in book.closed] == ["failed"]


def test_a_deferred_result_ends_when_the_encoder_answers(book: JobBook,
                                                         encoder: FakeEncoder) -> None:
    ok, doomed = FakeSink(deferred=True), FakeSink(deferred=True)
    workers = _workers(1)
    for job_id, sink in (("ok", ok), ("doomed", doomed)):
        book.admit(_job(job_id), sink, ["one."], persisted=False)
        book.dispatch(workers, 0.0, stopping=False)
        _run_segment(book, workers[0], job_id, 0)
    assert encoder.submitted == ["ok", "doomed"]
    assert book.writing == 2
    assert book.records.status("ok") == {"state": "running", "source": "zmq", "writing": True}
    assert not book.closed
    encoder.done = [Encoded("ok", b"OggS", None),
                    Encoded("doomed", None, JobError(ErrorCode.ENCODE_FAILED, "died twice"))]
    book.drain_encoded(5.0)
    assert ok.events[-1] == ("published", b"OggS")
    assert doomed.events[-1] == ("failed", "encode_failed")
    assert [(c.job_id, c.outcome) for c in book.closed] == [("ok", "done"),
                                                             ("doomed", "failed")]
    assert book.writing == 0


def test_a_persisted_job_counts_its_attempt_before_it_is_handed_out(book: JobBook,
                                                                    tmp_path: Path) -> None:
    book.admit(_job("d"), FakeSink(), ["one."], persisted=True)
    book.dispatch(_workers(1), 0.0, stopping=False)
    assert Spool(tmp_path).attempts_of("d") == 1


def test_a_stop_takes_back_only_the_start_it_counted(book: JobBook, tmp_path: Path) -> None:
    """A stop is no crash: the start it abandons is not counted. But a start it never
    counted (another host serves the job) must not take back an earlier life's crash."""
    spool = Spool(tmp_path)
    spool.count_attempt("here")  # each took the daemon down once before
    spool.count_attempt("elsewhere")
    for job_id in ("here", "elsewhere"):
        book.admit(_job(job_id), FakeSink(), ["one."], persisted=True)
    book.dispatch(_workers(1), 0.0, stopping=False)  # "here" starts: counted, 2
    elsewhere = book.get("elsewhere")
    assert elsewhere is not None
    book.remote_started(elsewhere, "other-host", RATE)
    assert [spool.attempts_of(job_id) for job_id in ("here", "elsewhere")] == [2, 1]
    for job_id in ("here", "elsewhere"):
        running = book.get(job_id)
        assert running is not None
        assert not book.release(running)  # each stays in work/ with its crash
    assert [spool.attempts_of(job_id) for job_id in ("here", "elsewhere")] == [1, 1]


def test_while_stopping_only_jobs_in_progress_get_segments(book: JobBook) -> None:
    book.admit(_job("new"), FakeSink(), ["one."], persisted=False)
    workers = _workers(1)
    book.dispatch(workers, 0.0, stopping=True)
    assert cast(FakeWorker, workers[0]).sent == []
    running = book.get("new")
    assert isinstance(running, Running)
    assert not running.started


def test_a_batched_worker_holds_several_segments_and_is_idle_after_the_last(
        book: JobBook) -> None:
    """A worker making two streams at once gets two jobs in one dispatch; their messages
    interleave and go to their own jobs; it is freed (for a recycle) only once empty."""
    sinks = {name: FakeSink() for name in ("a", "b", "c")}
    for name, sink in sinks.items():
        book.admit(_job(name), sink, ["one."], persisted=False)
    worker = cast(WorkerHandle, FakeWorker(0, streams=2))
    book.dispatch({0: worker}, 0.0, stopping=False, streams=2)
    assert worker.jobs == ["a", "b"]
    assert worker.state == WorkerState.BUSY
    book.on_worker_message(worker, SegmentStarted("b", 0, "v", RATE, 1.0), 0.0)
    book.on_worker_message(worker, SegmentStarted("a", 0, "v", RATE, 1.0), 0.0)
    book.on_worker_message(worker, SegmentFinished("b", 0, 0, 0.1, 0.05), 0.0)
    assert worker.jobs == ["a"]
    assert worker.state == WorkerState.BUSY
    assert not book.freed
    book.on_worker_message(worker, SegmentFinished("a", 0, 0, 0.1, 0.05), 0.0)
    assert worker.state is WorkerState.IDLE  # type: ignore[comparison-overlap]
    assert book.freed == [worker]
    assert [c.job_id for c in book.closed] == ["b", "a"]


def test_a_lost_batched_worker_retries_every_segment_it_held(book: JobBook) -> None:
    for name in ("a", "b"):
        book.admit(_job(name), FakeSink(), ["one."], persisted=False)
    worker = cast(WorkerHandle, FakeWorker(0, streams=2))
    book.dispatch({0: worker}, 0.0, stopping=False, streams=2)
    book.lost(worker, "exited", 0.0)
    for name in ("a", "b"):
        running = book.get(name)
        assert running is not None
        assert running.retry
        assert running.holder is None
    assert worker.jobs == []


def test_batched_streams_raise_the_bound_on_jobs_in_progress(book: JobBook) -> None:
    """`scheduling.max_active_jobs` (8) would leave half of a 16-stream worker empty."""
    for n in range(12):
        book.admit(_job(f"j{n}"), FakeSink(), ["one."], persisted=False)
    worker = cast(WorkerHandle, FakeWorker(0, streams=16))
    book.dispatch({0: worker}, 0.0, stopping=False, streams=16)
    assert len(worker.jobs) == 12


class _UnwritableSink(FakeSink):
    def cancelled(self, job: Job) -> None:
        raise OSError("disk full")

    def fail_job(self, job: Job, error: JobError) -> str:
        raise OSError("disk full")


def test_a_repeat_is_queued_until_it_ends_however_it_ends(book: JobBook) -> None:
    """A repeat from the result cache waits outside the queue: it is `queued` (cached) for
    status until it is played, cancelled, or ends with an outcome that could not be
    written (then it is being written, tried again until the disk has room: diskwait.py;
    not queued for good)."""
    for ending in ("played", "cancelled", "unwritable"):
        job = _job(f"r-{ending}")
        book.repeat(job)
        assert book.records.status(job.id) == {"state": "queued", "source": "zmq",
                                               "cached": True}
        running = Running(job, [], 0.0, sink=_UnwritableSink() if ending == "unwritable"
                          else FakeSink())
        if ending == "played":
            result = JobResult(job.id, "tone", RATE, 10, 0.1, 0.1)
            book.delivered(job, running.bound_sink, "out", result, status={"cached": True},
                           summary={})
            assert (book.records.status(job.id) or {}).get("state") == "done"
        else:
            book.end(running, None)
            expected = ({"state": "running", "source": "zmq", "writing": True}
                        if ending == "unwritable" else {"state": "cancelled", "source": "zmq"})
            assert book.records.status(job.id) == expected


def test_a_long_reply_whose_audio_the_disk_refuses_ends_once_with_that_error(
        book: JobBook, tmp_path: Path) -> None:
    """A whole reply past replyaudio.IN_MEMORY_BYTES goes to a file in the spool's
    directory; where that fails (the disk full, the directory gone) the job fails with why,
    its worker is free, and the next segment is not made for nothing."""
    sink = FakeSink()
    book.admit(_job("long"), sink, ["one. ", "two."], persisted=False)
    workers = _workers(1)
    book.dispatch(workers, 0.0, stopping=False)
    tmp_path.rename(tmp_path.with_name(tmp_path.name + "-moved"))  # the spool's directory
    long_chunk = np.zeros(IN_MEMORY_BYTES // 4 + 1, np.float32)
    book.on_worker_message(workers[0], SegmentStarted("long", 0, "v", RATE, 1.0), 0.0)
    book.on_worker_message(workers[0], AudioChunkReady("long", 0, long_chunk), 0.0)
    book.on_worker_message(workers[0], SegmentFinished("long", 0, len(long_chunk), 0.1, 0.05),
                           0.0)
    assert sink.events == [("started", RATE), ("failed", "internal")]
    status = book.records.status("long")
    assert status is not None
    assert "could not keep the audio made so far on the spool's disk" in \
        status["error"]["message"]
    assert workers[0].state == WorkerState.IDLE
    assert book.get("long") is None
