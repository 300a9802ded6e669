"""One worker, several segments at once: the supervisor's side of a batched engine.

The batched tone engine (tests/engines/faulty.py `load_batched`) makes up to 4 segments at
once, one sentence of every open stream per step, as CosyVoice2/3's batched decoder makes
one token of each. These tests run the real daemon with it and check what users see: jobs
served together by one worker, shown as streams in `stats`, STATUS= and the metrics; a
cancel, a failing stream and a dead worker that touch only what they should."""

from __future__ import annotations

import os
import signal
import urllib.request
from dataclasses import replace
from typing import Any, cast

import soundfile

from cosyvoiced.client import Client
from cosyvoiced.config import Config
from cosyvoiced.memory import Memory
from cosyvoiced.metrics import Metrics
from cosyvoiced.placement import Placement
from cosyvoiced.pool import Slot, WorkerPool
from cosyvoiced.workerhandle import WorkerHandle, WorkerState
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until
from tests.test_pool import QUICK, UNPACKED, tone_samples

BATCHED = "tests.engines.faulty:load_batched"


def _batched_daemon(make_daemon: DaemonFactory) -> tuple[Daemon, int]:
    port = free_port()
    daemon = make_daemon(engine={"name": BATCHED}, worker=QUICK, scheduling=UNPACKED,
                         metrics={"listen": f"127.0.0.1:{port}"})
    daemon.start()
    return daemon, port


def _worker(client: Client) -> dict[str, Any]:
    (worker,) = client.stats()["workers"]
    return dict(worker)


def _streams_in_flight(client: Client, count: int) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (w := _worker(client))["streams"] == count and w, 30,
        f"{count} streams in one worker")
    return found


def _drop_when_ready(daemon: Daemon, client: Client, texts: dict[str, str]) -> None:
    """Each text dropped as NAME.txt once the worker is ready."""
    wait_until(lambda: _worker(client)["state"] == "idle", 60, "a ready worker")
    for name, text in texts.items():
        daemon.drop(f"{name}.txt", text)


def _check_audio(daemon: Daemon, name: str, text: str) -> None:
    record = daemon.wait_done(f"{name}.txt")
    samples, _rate = soundfile.read(daemon.outbox / record["file"])
    assert len(samples) == tone_samples(text)


def test_one_worker_serves_several_jobs_at_once_and_says_so(
        make_daemon: DaemonFactory) -> None:
    daemon, port = _batched_daemon(make_daemon)
    texts = {f"job{n}": f"Job {n} takes its time SLOW@1. Then it ends." for n in range(3)}
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        _drop_when_ready(daemon, client, texts)
        assert _worker(client)["max_streams"] == 4
        worker = _streams_in_flight(client, 3)
        assert len(worker["jobs"]) == 3
        assert worker["state"] == "busy"
    notify = daemon.notify
    assert notify is not None
    wait_until(lambda: any("3/4 streams" in s for s in notify.statuses()), 10,
               "STATUS= with the streams in flight")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'cosyvoiced_worker_max_streams{device="cpu",slot="0"} 4.0' in metrics
    for name, text in texts.items():
        _check_audio(daemon, name, text)
    assert len({e["worker_pid"] for e in daemon.log_events("worker_state")}) == 1


def test_a_cancel_drops_one_stream_and_the_others_finish_whole(
        make_daemon: DaemonFactory) -> None:
    daemon, _port = _batched_daemon(make_daemon)
    text = "A long job SLOW@1. With a second part SLOW@1. And a third."
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        wait_until(lambda: _worker(client)["state"] == "idle", 60, "a ready worker")
        doomed = client.submit(text, output="doomed")
        for name in ("kept0", "kept1"):
            daemon.drop(f"{name}.txt", text)
        _streams_in_flight(client, 3)
        assert client.cancel(doomed)["event"] == "cancelled"
        wait_until(lambda: client.status(doomed)["state"] == "cancelled", 30, "the cancel")
    for name in ("kept0", "kept1"):
        _check_audio(daemon, name, text)


def test_a_stream_that_fails_fails_its_job_alone(make_daemon: DaemonFactory) -> None:
    daemon, _port = _batched_daemon(make_daemon)
    kept = "This one goes on SLOW@1 for a while. To its end."
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        wait_until(lambda: _worker(client)["state"] == "idle", 60, "a ready worker")
        daemon.drop("kept.txt", kept)
        daemon.drop("broken.txt", "This one breaks FAIL_STREAM here. Never said.")
        record = daemon.wait_failed("broken.txt")
    assert record["code"] == "engine_error"
    assert "this stream failed" in record["message"]
    _check_audio(daemon, "kept", kept)
    assert not daemon.log_events("worker_lost")


def test_a_dead_batched_worker_has_every_segment_it_held_made_again(
        make_daemon: DaemonFactory) -> None:
    daemon, _port = _batched_daemon(make_daemon)
    texts = {f"job{n}": f"Job {n} is slow SLOW@1. And has a second part." for n in range(3)}
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        _drop_when_ready(daemon, client, texts)
        worker = _streams_in_flight(client, 3)
        os.kill(int(worker["pid"]), signal.SIGKILL)
    for name, text in texts.items():
        _check_audio(daemon, name, text)
    assert [e["reason"] for e in daemon.log_events("worker_lost")] == ["exited"]
    retried = {e["job"] for e in daemon.log_events("job_retry")}
    assert len(retried) == 3


class _BusyWorker:
    """What the pool reads of a batched worker with segments in hand."""

    def __init__(self) -> None:
        self.slot, self.streams, self.jobs = 0, 4, ["a", "b"]
        self.state = WorkerState.BUSY
        self.memory = Memory(100 << 20)
        self.segments_served = 5

    @property
    def free_streams(self) -> int:
        return self.streams - len(self.jobs)


def test_a_batched_worker_due_for_a_recycle_takes_no_more_segments() -> None:
    """It finishes the streams in hand, then is replaced: were it given new ones as old ones
    end, a busy batched worker would never be idle, so never recycled."""
    config = Config()
    pool = WorkerPool(lambda: config, Metrics())
    worker = cast(WorkerHandle, _BusyWorker())
    pool.slots = [Slot(Placement(0, "cpu", 1), worker)]
    assert pool.idle() == {0: worker}
    assert pool.free_places() == 2
    pool.recycle_requests[0] = "asked"
    assert pool.idle() == {}
    config = replace(config, worker=replace(config.worker, rss_limit=50 << 20))
    pool.recycle_requests.clear()
    assert pool.idle() == {}  # over its memory limit: the same
