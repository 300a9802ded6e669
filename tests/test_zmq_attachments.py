"""Prompt audio sent over ZeroMQ (`submit`, `synthesize`): refused up front by an engine that
cannot clone, with nothing written; and, where a `submit` that took it fails or is
cancelled, not kept in failed/ (up to zmq.max_attachment_bytes for each request of an
anonymous client). Real daemons, the real client."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from cosyvoiced.client import Client, DaemonError
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

TONE = {"name": "tests.engines.faulty:load"}
CLONING = {"name": "tests.engines.faulty:cloning"}
ATTACHMENT_BYTES = 1 << 20  # the probe's: a 1 MiB attachment


def _wav(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.2 * np.ones(int(16000 * seconds), dtype=np.float32), 16000,
                    format="WAV")
    return buffer.getvalue()


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.mark.parametrize("op", ["submit", "synthesize"])
def test_prompt_audio_for_an_engine_that_cannot_clone_is_refused_and_nothing_is_written(
        make_daemon: DaemonFactory, op: str) -> None:
    """A `submit` with a 1 MiB attachment was accepted by an engine that cannot clone: the
    attachment was written to prompts/, the job failed `not_supported`, and the 1,048,576
    bytes stayed in failed/. Now it is refused up front, as HTTP refuses it."""
    daemon = make_daemon(engine=TONE)
    daemon.start()
    with Client(daemon.endpoint, timeout_s=10, retries=0) as client:
        ask = client.submit if op == "submit" else client.synthesize
        with pytest.raises(DaemonError) as refused:
            ask("Clone this.", os.urandom(ATTACHMENT_BYTES))
        assert (refused.value.code, refused.value.field) == ("unsupported", "prompt_audio")
        assert refused.value.header["reason"] == "not_supported"
        assert refused.value.message == \
            "prompt_audio: the faulty engine cannot clone voices"
        # The same request without the attachment is served: only the audio was refused.
        assert client.synthesize("Without it.", format="pcm_s16le").audio
    spool = daemon.spool
    assert (_files(spool / "prompts"), _files(spool / "failed"), _files(spool / "work")) == \
        ([], [], [])


def test_a_failed_submits_prompt_audio_is_not_kept_in_failed(
        make_daemon: DaemonFactory) -> None:
    """A cloning engine takes the attachment; the job fails (its 1 MiB is not audio): its
    file and error record go to failed/, the audio it sent does not (it stayed there
    before, as a dropped file's does)."""
    daemon = make_daemon(engine=CLONING)
    daemon.start()
    with Client(daemon.endpoint, timeout_s=10, retries=0) as client:
        job = client.submit("Clone this.", os.urandom(ATTACHMENT_BYTES))
    record = daemon.wait_failed(f"{job}.json")
    assert (record["code"], record["job"]) == ("prompt_audio_unreadable", job)
    _assert_only_the_job_failed(daemon, job)


def test_a_cancelled_submits_prompt_audio_is_not_kept_in_failed(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine=CLONING)
    daemon.start()
    with Client(daemon.endpoint, timeout_s=10, retries=0) as client:
        ahead = client.submit("SLOW@3.")  # holds the one worker: the next one waits
        wait_until(lambda: client.status(ahead)["state"] == "running", 10, "a job to run")
        job = client.submit("Clone this.", _wav())
        assert client.status(job)["state"] == "queued"
        assert client.cancel(job)["event"] == "cancelled"
    record = daemon.wait_failed(f"{job}.json")
    assert record["code"] == "cancelled"
    _assert_only_the_job_failed(daemon, job)


def _assert_only_the_job_failed(daemon: Daemon, job: str) -> None:
    assert _files(daemon.failed) == [f"{job}.json", f"{job}.json.error.json"]
    assert _files(daemon.spool / "prompts") == []


def test_a_recovered_submits_prompt_audio_is_not_kept_but_a_dropped_files_is(
        make_daemon: DaemonFactory) -> None:
    """A crash left a `submit` in work/ with the audio it sent (named after its job id), and
    a dropped job with its submitter's audio; the engine cannot clone, so both fail at the
    next start. The audio the client sent goes; the submitter's file goes to failed/."""
    daemon = make_daemon(engine=TONE)
    prompts = daemon.spool / "prompts"
    for directory in (prompts, daemon.work):
        directory.mkdir(parents=True)
    sent, dropped = "1a00000000000000a", "1a00000000000000b"
    (prompts / f"{sent}~{sent}.prompt.wav").write_bytes(_wav())
    (daemon.work / f"{sent}~{sent}.json").write_text(
        f'{{"text": "Hi.", "prompt_audio": "{sent}.prompt.wav"}}')
    (prompts / f"{dropped}~speaker.wav").write_bytes(_wav())
    (daemon.work / f"{dropped}~clone.json").write_text(
        '{"text": "Hi.", "prompt_audio": "speaker.wav"}')
    daemon.start()
    for name in (f"{sent}.json", "clone.json"):
        assert daemon.wait_failed(name)["code"] == "not_supported"
    wait_until((daemon.failed / "speaker.wav").exists, 10, "the dropped prompt beside its job")
    assert _files(daemon.failed) == sorted([
        f"{sent}.json", f"{sent}.json.error.json",
        "clone.json", "clone.json.error.json", "speaker.wav"])
    assert _files(prompts) == []
