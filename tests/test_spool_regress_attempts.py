"""A job's start is counted in attempts/ once per life of the daemon, and a stop on a full
disk that cannot take the count back does not take the daemon down."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any, cast

from cosyvoiced.config import Config
from cosyvoiced.encoding import Encoder
from cosyvoiced.jobs import JobBook
from cosyvoiced.spool import Spool
from cosyvoiced.workerhandle import WorkerHandle
from tests.conftest import DaemonFactory
from tests.daemon import wait_until
from tests.test_jobbook import FakeEncoder, FakeSink, FakeWorker, _job


class _RefusingWorker(FakeWorker):
    """A worker that still looks idle but whose first sends are refused (a full send queue,
    a failed pipe: WorkerPipe.send returns False)."""

    def __init__(self, slot: int, refusals: int) -> None:
        super().__init__(slot)
        self.refusals = refusals

    def send(self, message: Any) -> bool:
        if self.refusals:
            self.refusals -= 1
            return False
        return super().send(message)


def test_a_start_whose_send_was_refused_is_counted_once(tmp_path: Path) -> None:
    """The count was guarded by `not dispatched`: a send refused after the count left the
    job undispatched, and the next tick counted its start again (2 for one start: poison
    after one real crash)."""
    spool = Spool(tmp_path)
    spool.ensure()
    config = Config()
    book = JobBook(spool, cast(Encoder, FakeEncoder()), lambda job: job, lambda: config)
    book.admit(_job("j"), FakeSink(), ["one."], persisted=True)
    worker = _RefusingWorker(0, refusals=2)
    idle = {0: cast(WorkerHandle, worker)}
    for tick in range(3):
        book.dispatch(idle, float(tick), stopping=False)
    assert len(worker.sent) == 1
    assert spool.attempts_of("j") == 1


def test_a_stop_that_cannot_take_back_a_started_jobs_count_exits_cleanly(
        make_daemon: DaemonFactory) -> None:
    """Taking back this life's count of a started job at the stop (uncount_attempt) raised
    inside the tick on a full disk: exit 5. It is logged now, and the job stays in work/."""
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         worker={"drain_timeout_s": 0.0})
    daemon.start()
    attempts = daemon.spool / "attempts"
    daemon.drop_job("long", text="This SLOW@30 sentence takes its time.")
    wait_until(lambda: list(attempts.iterdir()), 30, "the job's start to be counted")
    shutil.rmtree(attempts)
    attempts.write_text("not a directory: every write in it fails, as on a full disk")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0, daemon.output()
    [event] = daemon.log_events("attempt_uncount_unwritable")
    assert "one start too many" in str(event["message"])
    assert [path.name.split("~", 1)[1] for path in daemon.work.iterdir()] == ["long.json"]
