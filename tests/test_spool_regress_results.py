"""A result the spool's disk refuses is made again once the disk has room, never turned
into a failure; outcomes that wait for the disk are bounded, logged once, and shown.

As in test_spool_faults_disk.py, a directory the daemon writes in is made a file, so that
each write there fails as on a full disk, and made a directory again to give it room.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

FAULTY = {"name": "tests.engines.faulty:load"}


def _fill(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("not a directory: every write in it fails, as on a full disk")


def _room(directory: Path) -> None:
    directory.unlink()
    directory.mkdir()


def _event(daemon: Daemon, event: str) -> dict[str, object]:
    process = daemon.process
    assert process is not None
    wait_until(lambda: daemon.log_events(event) or process.poll() is not None, 30,
               f"{event}, or the daemon's exit")
    assert process.poll() is None, f"the daemon exited:\n{daemon.output()}"
    return daemon.log_events(event)[0]


def test_a_result_the_disk_refuses_is_made_again_once_it_has_room(
        make_daemon: DaemonFactory) -> None:
    """The job became `failed internal: could not write the result: [Errno 20]` (its
    record written once the disk had room) and its audio was thrown away."""
    daemon = make_daemon(engine=FAULTY)
    daemon.start()
    _fill(daemon.outbox)
    _fill(daemon.failed)
    daemon.drop_job("made", text="Made on a full disk.")
    job = str(_event(daemon, "outcome_unwritable")["job"])
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        assert client.status(job)["state"] in ("running", "queued")
        _room(daemon.outbox)
        _room(daemon.failed)
        kind, record = daemon.wait_outcome("made.json", timeout_s=40)
        assert (kind, record["job"]) == ("done", job), record
        assert wait_until(lambda: client.status(job)["state"] == "done", 10,
                          "the job's status to say done")
    assert daemon.outcome_counts()["made.json"] == 1
    assert not list((daemon.spool / "attempts").iterdir())
    assert not list(daemon.work.iterdir())


DROPS = 600  # past MAX_QUEUED_DROPS (256) held and MAX_CLAIMS_WAITING (256) claimed


def test_rejected_drops_waiting_for_the_disk_are_bounded_logged_once_and_shown(
        make_daemon: DaemonFactory) -> None:
    """With failed/ unwritable every invalid drop was claimed and held (20,000: 70 -> 92
    MiB, 20,000 critical lines, one tick of 0.59 s); their status said not_found, and
    STATUS= said nothing of them. They count against the drop folder's queued bound now."""
    daemon = make_daemon()
    daemon.start()
    _fill(daemon.failed)
    for index in range(DROPS):
        daemon.drop(f"bad{index:03}.json", "{not json")
    notify = daemon.notify
    assert notify is not None
    waiting = "256 outcomes waiting for the disk"
    wait_until(lambda: any(waiting in line for line in notify.statuses()), 30,
               f"STATUS= to say {waiting!r}")
    assert list(daemon.inbox.iterdir())  # not all claimed: the rest wait their turn
    assert not any("257 outcomes" in line for line in notify.statuses())
    assert len(daemon.log_events("outcome_unwritable")) == 1
    job = str(daemon.log_events("outcome_unwritable")[0]["job"])
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        status = client.status(job)
        assert (status["state"], status.get("writing")) == ("running", True), status
        assert client.stats()["waiting_for_disk"]["outcomes"] == 256
    _room(daemon.failed)
    wait_until(lambda: len(daemon.outcome_counts()) == DROPS, 60, "every drop's record")
    assert set(daemon.outcome_counts().values()) == {1}
    assert len(daemon.log_events("outcome_unwritable")) == 1
    assert daemon.log_events("outcome_written")
