"""A job that ended just before a crash (its result and record in outbox/, its file not yet
released from work/) is not judged again at the next start: a restart with a lower
max_text_chars or max_file_bytes parsed it first and failed it too, so one input had a
result and an error record."""

from __future__ import annotations

import json
import os

from cosyvoiced.job import new_job_id
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

TONE = {"name": "tests.engines.faulty:load"}
TEXT = "A text spoken before the crash, now over the limit."


def _done_before_a_crash(daemon: Daemon, input_name: str, output: str, content: str) -> str:
    """The spool as a crash between the record and the release leaves it; the job's id."""
    job_id = new_job_id()
    for folder in (daemon.work, daemon.outbox):
        folder.mkdir(parents=True, exist_ok=True)
    (daemon.work / f"{job_id}~{input_name}").write_text(content)
    (daemon.outbox / f"{output}.wav").write_bytes(b"RIFF")
    (daemon.outbox / f"{output}.json").write_text(json.dumps(
        {"job": job_id, "input": input_name, "file": f"{output}.wav"}))
    return job_id


def test_a_job_done_before_a_crash_is_not_failed_by_limits_lowered_since(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine=TONE, spool={"max_text_chars": 10, "max_file_bytes": 100})
    # over max_text_chars now (a .txt job), and over max_file_bytes with an output of its
    # own (a .json job: its output is read from the file without this life's limits)
    _done_before_a_crash(daemon, "long.txt", "long", TEXT)
    big = json.dumps({"text": TEXT * 3, "output": "renamed"})
    assert len(big) > 100
    _done_before_a_crash(daemon, "big.json", "renamed", big)
    daemon.start()
    wait_until(lambda: not os.listdir(daemon.work), 15, "both files to be released")
    assert daemon.outcome_counts() == {"long.txt": 1, "big.json": 1}, \
        "an input with a result and an error record"
    assert not list(daemon.failed.iterdir())
    assert not daemon.log_events("job_rejected")
    # This life's limits still hold for a new file.
    daemon.drop("new.txt", TEXT)
    assert daemon.wait_failed("new.txt")["code"] == "text_too_long"
