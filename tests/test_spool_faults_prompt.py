"""A dropped prompt_audio file the daemon must not read whole on its tick, and one whose
writer still holds it open."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from cosyvoiced.job import new_job_id
from cosyvoiced.spool import Claimed
from tests.conftest import DaemonFactory
from tests.daemon import wait_until

HUGE_BYTES = 64 << 30  # sparse: no disk used, but no process could hold it in memory
LIMIT_BYTES = 16 << 20  # http.max_upload_bytes' default


def _wav(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16000 * seconds), dtype=np.float32), 16000,
                    format="WAV")
    return buffer.getvalue()


def test_a_huge_prompt_fails_its_job_and_the_daemon_serves_on(
        make_daemon: DaemonFactory) -> None:
    """A 64 GiB sparse prompt was read whole for the cache's key at enqueue: MemoryError,
    the daemon exited 5, and again at every start (the job stayed in work/)."""
    daemon = make_daemon(cache={"max_bytes": 64 << 20})
    daemon.start()
    staging = daemon.inbox / ".big.wav.tmp"
    with staging.open("wb") as stream:
        stream.truncate(HUGE_BYTES)
    os.rename(staging, daemon.inbox / "big.wav")
    daemon.drop_job("huge", text="Hi.", prompt_audio="big.wav", prompt_text="Hello.")
    record = daemon.wait_failed("huge.json")
    assert (record["code"], record["field"]) == ("file_too_large", "prompt_audio"), record
    assert str(HUGE_BYTES) in record["message"], record
    assert str(LIMIT_BYTES) in record["message"], record
    assert (daemon.failed / "big.wav").stat().st_size == HUGE_BYTES  # beside its job
    daemon.drop_job("after", text="Still serving.")
    daemon.wait_done("after.json")
    assert daemon.process is not None
    assert daemon.process.poll() is None


def test_a_prompt_over_the_upload_limit_that_was_claimed_before_a_restart_fails_its_job(
        make_daemon: DaemonFactory) -> None:
    """A job left in work/ with its claimed prompt (a crash, or the old daemon's loop)."""
    daemon = make_daemon(cache={"max_bytes": 64 << 20}, http={"max_upload_bytes": 4096})
    daemon.start()
    daemon.stop()
    job_id = new_job_id()
    (daemon.work / Claimed.named(job_id, "left.json").work_name).write_text(
        '{"text": "Hi.", "prompt_audio": "big.wav", "prompt_text": "Hello."}')
    prompt = Claimed.named(job_id, "big.wav").work_name
    with (daemon.spool / "prompts" / prompt).open("wb") as stream:
        stream.truncate(HUGE_BYTES)
    daemon.start()
    record = daemon.wait_failed("left.json")
    assert (record["code"], record["field"]) == ("file_too_large", "prompt_audio"), record
    assert "4096" in record["message"], record


@pytest.mark.skipif(os.geteuid() != 0, reason="a submitter other than the daemon: needs root")
def test_a_claimed_prompt_is_the_daemons_own_copy(make_daemon: DaemonFactory,
                                                  tmp_path: Path) -> None:
    """A submitter who kept its prompt open could change it after the cache keyed the job
    by its content and before the worker read it: another client's cached result in its
    voice. The claim keeps the daemon's own copy; the open file is no longer it."""
    daemon = make_daemon()
    daemon.start()
    staging = daemon.inbox / ".mine.wav.tmp"
    staging.write_bytes(_wav())
    os.chown(staging, 61003, 61003)
    with staging.open("r+b") as held:
        os.rename(staging, daemon.inbox / "mine.wav")
        daemon.drop_job("held", text="Hi.", prompt_audio="mine.wav", prompt_text="Hello.")
        record = daemon.wait_failed("held.json")  # Piper cannot clone: not_supported
        assert record["code"] == "not_supported", record
        kept = wait_until(lambda: (daemon.failed / "mine.wav").exists()
                          and daemon.failed / "mine.wav", 10, "the prompt beside its job")
        assert os.fstat(held.fileno()).st_ino != kept.stat().st_ino
        held.write(b"changed by its writer")
        held.flush()
    assert kept.read_bytes() == _wav()
