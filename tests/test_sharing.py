"""The cluster's side of the supervisor without Redis: sharing.py with a fake link (what
the writer thread would send) and a host built on a real job book with fake sinks."""

from __future__ import annotations

import queue
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from cosyvoiced import clusterwire as wire
from cosyvoiced.cluster import ClusterLink
from cosyvoiced.clusterwire import SharedLost
from cosyvoiced.config import ClusterConfig, Config
from cosyvoiced.encoding import Encoder
from cosyvoiced.job import SINK_REPLY, Job, Sink
from cosyvoiced.jobs import JobBook
from cosyvoiced.jobspec import Limits
from cosyvoiced.ledger import Running
from cosyvoiced.metrics import Metrics
from cosyvoiced.sharing import POLL_S, RemoteSink, Sharing
from cosyvoiced.spool import Spool
from tests.test_jobbook import FakeEncoder, FakeSink


class FakeLink:
    """What sharing asks of Redis, recorded; `up` and `inbound` as the threads set them."""

    def __init__(self) -> None:
        self.host, self.url, self.error = "a", "redis://fake", ""
        self.up = True
        self.inbound: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **_kwargs: Any) -> None:
            self.calls.append((name, args))
        return record

    def named(self, name: str) -> list[Any]:
        return [args for called, args in self.calls if called == name]


class Host:
    """The service's part that sharing sees (sharing.Host), with a real job book."""

    def __init__(self, tmp_path: Path) -> None:
        config = Config()
        self.ready, self.stopping = True, False
        self.limits = Limits(config.spool.max_text_chars, config.spool.default_format)
        self.metrics = Metrics()
        self.spool = Spool(tmp_path)
        self.spool.ensure()
        self.book = JobBook(self.spool, cast(Encoder, FakeEncoder()), lambda job: job,
                            lambda: config)
        self.sinks: dict[str, Sink] = {}
        self.wakes = 0
        self.sharing: Sharing | None = None
        self.recovering: set[str] = set()  # jobs left in work/, not admitted yet

    def settle(self) -> None:
        """What the tick does with the jobs the book closed (service.settle)."""
        closed, self.book.closed = self.book.closed, []
        assert self.sharing is not None
        for job in closed:
            self.sharing.ended(job.job_id)

    def wake(self) -> None:
        self.wakes += 1

    def idle_workers(self) -> int:
        return 0

    def enqueue_here(self, job: Job) -> None:
        self.book.admit(job, self.sink_of(job), ["x"], persisted=False)

    def cancel(self, job_id: str) -> bool:
        return self.book.cancel(job_id)

    def sink_of(self, job: Job) -> Sink:
        """As service.sink_of: another host's job's outcome goes back to it."""
        remote = self.sharing.sinks.get(job.id) if self.sharing is not None else None
        return remote if remote is not None else self.sinks.setdefault(job.id, FakeSink())


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


@pytest.fixture
def sharing(host: Host, link: FakeLink) -> Sharing:
    shared = Sharing(ClusterConfig(redis="redis://fake", name="a"), host, book=host.book,
                     prompts=host.spool, metrics=host.metrics)
    shared.link = cast(ClusterLink, link)
    host.sharing = shared
    return shared


def _job(job_id: str, stream: bool = False) -> Job:
    return Job(id=job_id, source="zmq", origin=job_id, text="x", sink=SINK_REPLY,
               stream=stream)


def _shared_own(host: Host, sharing: Sharing, job_id: str, stream: bool = False) -> Running:
    """A job received here and put on the shared stream."""
    job = _job(job_id, stream)
    running = host.book.admit(job, host.sink_of(job), ["x"], persisted=False)
    assert sharing.share(running)
    return running


def test_a_job_no_host_could_read_from_the_stream_is_served_here(
        host: Host, sharing: Sharing, link: FakeLink) -> None:
    """A voice name over the wire's bound (or a drop-folder prompt over 64 MiB) was shared
    anyway; every host, this one too, dropped the entry unread, and the job waited for an
    outcome that never came. It is served here now, under this host's own limits."""
    job = replace(_job("long"), voice="v" * (wire.MAX_FIELD_CHARS + 1))
    running = host.book.admit(job, host.sink_of(job), ["x"], persisted=False)
    assert not sharing.share(running)
    assert not link.named("share")
    assert not running.remote
    assert _shared_own(host, sharing, "plain").remote  # a job within the bounds is shared


def test_a_job_delivered_too_often_ends_as_poison_on_its_receiving_host(
        host: Host, sharing: Sharing, link: FakeLink) -> None:
    taken = wire.SharedJob(_job("j1"), "b", b"prompt", "s", "1-0", deliveries=3)
    link.inbound.put(taken)
    sharing.poll(0.0)
    (event, _sent_to), = [(args[1], args[0]) for args in link.named("complete")]
    assert event.kind == wire.FAILED
    assert event.detail["error"]["code"] == "worker_crashed"
    assert host.book.get("b-j1") is None  # never queued here
    assert not list(host.spool.prompts.iterdir())  # nor its prompt kept


def test_an_own_job_delivered_too_often_ends_as_poison_here(host: Host, sharing: Sharing,
                                                           link: FakeLink) -> None:
    """This host received it; the hosts that took it from the stream died with it."""
    running = _shared_own(host, sharing, "mine")
    taken = wire.SharedJob(running.job, "a", None, "s", "1-0", deliveries=3, taken_over=True)
    link.inbound.put(taken)
    sharing.poll(0.0)
    assert cast(FakeSink, host.sinks["mine"]).events == [("failed", "worker_crashed")]
    assert host.book.get("mine") is None
    assert sharing.taken_over == 1
    host.settle()
    assert link.named("settle") == [(taken,)]  # its entry leaves the stream
    assert link.named("withdraw") == []


def test_an_own_job_redelivered_within_the_limit_is_served_here(
        host: Host, sharing: Sharing, link: FakeLink) -> None:
    running = _shared_own(host, sharing, "again")
    link.inbound.put(wire.SharedJob(running.job, "a", None, "s", "1-0", deliveries=2))
    sharing.poll(0.0)
    assert not running.remote
    assert host.book.get("again") is running
    assert cast(FakeSink, host.sinks["again"]).events == []


def test_an_own_stream_taken_over_from_a_dead_host_ends_here(
        host: Host, sharing: Sharing, link: FakeLink) -> None:
    running = _shared_own(host, sharing, "cut", stream=True)
    link.inbound.put(wire.Event(wire.STARTED, "cut", "b", {"sample_rate": 100}, entry="1-0"))
    link.inbound.put(wire.Event(wire.CHUNK, "cut", "b", {"seq": 0},
                                wire.audio_bytes([0.0] * 4), entry="1-1"))  # type: ignore[arg-type]
    link.inbound.put(wire.SharedJob(running.job, "a", None, "s", "1-2", deliveries=2))
    sharing.poll(0.0)
    assert cast(FakeSink, host.sinks["cut"]).events == [
        ("started", 100), ("chunk", (0, 4)), ("failed", "worker_crashed")]
    assert host.book.get("cut") is None


def test_redis_down_takes_back_the_jobs_no_host_started(host: Host, sharing: Sharing,
                                                        link: FakeLink) -> None:
    running = _shared_own(host, sharing, "own")
    assert running.remote
    link.up = False
    sharing.poll(10.0)
    assert host.book.get("own") is running
    assert not running.remote
    assert host.wakes  # the tick dispatches it


def test_a_stream_another_host_was_serving_cannot_be_continued_here(
        host: Host, sharing: Sharing, link: FakeLink) -> None:
    running = _shared_own(host, sharing, "streamed", stream=True)
    link.inbound.put(wire.Event(wire.STARTED, "streamed", "b", {"sample_rate": 100},
                                entry="1-0"))
    link.inbound.put(wire.Event(wire.CHUNK, "streamed", "b", {"seq": 0},
                                wire.audio_bytes([0.0] * 4), entry="1-1"))  # type: ignore[arg-type]
    sharing.poll(0.0)
    assert running.chunks_sent == 1
    link.up = False
    sharing.poll(1.0)
    sharing.poll(1.0 + sharing.claim_idle_s)  # b has been silent that long
    sink = cast(FakeSink, host.sinks["streamed"])
    assert sink.events == [("started", 100), ("chunk", (0, 4)), ("failed", "worker_crashed")]
    assert host.book.get("streamed") is None  # ended, not served here


def test_an_outcome_for_a_job_that_ended_already_is_dropped(host: Host, sharing: Sharing,
                                                            link: FakeLink) -> None:
    running = _shared_own(host, sharing, "twice")
    host.book.cancel("twice")  # it ended here first
    host.settle()
    assert host.book.get("twice") is None
    assert link.named("withdraw") == [("twice",)]
    link.inbound.put(wire.Event(wire.FAILED, "twice", "b", {"error": {
        "code": "engine_error", "message": "late"}}, entry="2-0"))
    sharing.poll(0.0)
    sink = cast(FakeSink, host.sinks["twice"])
    assert sink.events == [("cancelled", None)]  # one outcome, not two
    assert link.named("forget") == [(["2-0"], [])]  # read, forgotten, not finished here
    assert running.job.id not in sharing.own


def test_a_job_redis_lost_is_served_here(host: Host, sharing: Sharing,
                                         link: FakeLink) -> None:
    _shared_own(host, sharing, "lost")
    running = host.book.get("lost")
    link.inbound.put(SharedLost("lost"))
    sharing.poll(0.0)
    assert running is not None
    assert not running.remote


def test_a_remote_sink_sends_its_outcome_to_the_receiving_host(link: FakeLink) -> None:
    shared = wire.SharedJob(_job("j"), "b", None, "s", "1-0")
    RemoteSink(cast(ClusterLink, link), shared).cancelled(shared.job)
    (args,) = link.named("complete")
    assert args[0] == "b"
    assert args[1].kind == wire.CANCELLED


def test_a_host_alone_never_imports_redis() -> None:
    """redis (0.17 s of CPU) comes with the cluster link, for a host that has one: a fresh
    interpreter, as the daemon starts, imports the whole supervisor without it (the cluster
    tests start hosts that have one)."""
    probe = ("import sys, cosyvoiced.daemon; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert run.stdout.strip() == "[]", run.stdout


def test_a_tick_spends_a_bounded_time_on_what_came_from_redis(
        host: Host, sharing: Sharing, link: FakeLink) -> None:
    """The event reader keeps adding while the tick works: a tick that took events until
    none were left could be held for good. It stops after POLL_S and asks for the next."""
    now = [0.0]

    def clock() -> float:
        now[0] += POLL_S / 10  # each look at the clock: an event's worth of work
        return now[0]

    sharing.clock = clock
    for n in range(100):
        link.inbound.put(wire.Event(wire.CHUNK, f"{n:x}", "b", {"seq": 0}, b""))
    wakes = host.wakes
    sharing.poll(0.0)
    assert 5 <= 100 - link.inbound.qsize() <= 10
    assert host.wakes > wakes  # the next tick comes at once
    while not link.inbound.empty():
        sharing.poll(0.0)
