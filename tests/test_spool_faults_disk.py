"""A spool whose disk takes no more writes (a full disk): the daemon serves on.

The tests cannot mount a small file system; as tests/test_cluster.py does, a directory the
daemon writes in is made a file (or a file a directory), so that each write there fails
as it would on a full disk, and is made what it was to give the disk room again.
"""

from __future__ import annotations

import shutil

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until


def _events_or_exit(daemon: Daemon, event: str) -> list[dict[str, object]]:
    process = daemon.process
    assert process is not None
    wait_until(lambda: daemon.log_events(event) or process.poll() is not None, 30,
               f"{event}, or the daemon's exit")
    assert process.poll() is None, f"the daemon exited:\n{daemon.output()}"
    return daemon.log_events(event)


def test_a_job_whose_start_cannot_be_counted_waits_and_the_daemon_serves_on(
        make_daemon: DaemonFactory) -> None:
    """Counting a job's start in attempts/ failed (ENOSPC) inside dispatch: exit 5, HTTP
    and ZeroMQ with it. The job stays queued now, and starts once the disk has room."""
    daemon = make_daemon()
    daemon.start()
    attempts = daemon.spool / "attempts"
    shutil.rmtree(attempts)
    attempts.write_text("not a directory: every write in it fails, as on a full disk")
    daemon.drop_job("held", text="It waits for room on the disk.")
    [event] = _events_or_exit(daemon, "attempt_unwritable")
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        assert client.status(str(event["job"]))["state"] == "queued"
        assert client.synthesize("A reply is written nowhere.").audio  # served meanwhile
    assert daemon.outcome("held.json") is None
    attempts.unlink()
    attempts.mkdir()
    daemon.wait_done("held.json", timeout_s=40)
    assert len(daemon.log_events("attempt_unwritable")) == 1  # not at every try
    assert daemon.log_events("attempt_written")
    assert not list(attempts.iterdir())  # cleared when the job ended


def test_a_spool_that_cannot_take_the_admin_token_still_starts_and_serves(
        make_daemon: DaemonFactory) -> None:
    """Writing admin.token at the start failed (ENOSPC): exit 5 before anything was served,
    at every start until the unit's start limit."""
    daemon = make_daemon()
    daemon.spool.mkdir(parents=True)
    token = daemon.spool / "admin.token"
    token.mkdir()
    (token / "in-the-way").write_text("the token's rename fails, as on a full disk")
    daemon.start()
    [event] = daemon.log_events("admin_token_unwritable")
    assert "cosyvoicectl" in str(event["message"])
    daemon.drop_job("served", text="Served without an admin token.")
    daemon.wait_done("served.json")


def test_an_outcome_the_disk_refuses_waits_and_is_written_once_it_has_room(
        make_daemon: DaemonFactory) -> None:
    """A failure record that could not be written (outcome_unwritable) left the job in work/
    and the book: `status` said not_found, nothing tried it again after the disk had room,
    and its start stayed counted in attempts/."""
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"})
    daemon.start()
    failed = daemon.failed
    shutil.rmtree(failed)
    failed.write_text("not a directory: every write in it fails, as on a full disk")
    daemon.drop_job("doomed", text="This sentence FAIL_STREAM fails.")
    [event] = _events_or_exit(daemon, "outcome_unwritable")
    job = str(event["job"])
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        status = client.status(job)
        assert (status["state"], status.get("writing")) == ("running", True), status
        failed.unlink()
        failed.mkdir()
        kind, record = daemon.wait_outcome("doomed.json", timeout_s=40)
        assert (kind, record["job"]) == ("failed", job), record
        assert wait_until(lambda: client.status(job)["state"] == "failed", 10,
                          "the job's status to say failed")
    assert daemon.outcome_counts()["doomed.json"] == 1
    assert len(daemon.log_events("outcome_unwritable")) == 1  # not at every try
    assert daemon.log_events("outcome_written")
    assert not list((daemon.spool / "attempts").iterdir())
    assert not list(daemon.work.iterdir())
