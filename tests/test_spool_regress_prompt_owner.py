"""A non-root user's queued cloning job survives a stop: its prompt, the daemon's own copy
since its claim, goes back to the inbox as the submitter's (or the job stays claimed)."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile

from cosyvoiced.spool import Claimed, Spool
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until

CLONING = {"name": "tests.engines.faulty:cloning"}
NEVER_READY = {"name": "tests.engines.faulty:never_ready"}
SUBMITTER = 61003


def _wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    samples = 0.3 * np.sin(np.arange(int(16000 * seconds)) / 5.0)
    soundfile.write(buffer, samples.astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def _drop_as(daemon: Daemon, name: str, data: bytes, uid: int) -> None:
    temp = daemon.root / f".{name}.tmp"
    temp.write_bytes(data)
    os.chown(temp, uid, uid)
    os.rename(temp, daemon.inbox / name)


@pytest.mark.skipif(os.geteuid() != 0, reason="a submitter other than the daemon: needs root")
def test_a_users_queued_cloning_job_is_served_after_a_restart(
        make_daemon: DaemonFactory) -> None:
    """The claim replaced the prompt with the daemon's copy (root's); the stop handed it
    back so, and the restart failed the job: not_owner, 'v.wav' was dropped by another
    user."""
    daemon = make_daemon(engine=NEVER_READY, worker={"start_timeout_s": 3600.0})
    daemon.start(wait_ready=False)
    prompts = daemon.spool / "prompts"
    wait_until(prompts.is_dir, 30, "the spool")
    _drop_as(daemon, "v.wav", _wav(1.0), SUBMITTER)
    job = {"text": "Hi.", "prompt_audio": "v.wav", "prompt_text": "Hello."}
    _drop_as(daemon, "mine.json", json.dumps(job).encode(), SUBMITTER)
    wait_until(lambda: list(prompts.glob("*~v.wav")), 30, "the prompt to be claimed")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    handed_back = (daemon.inbox / "v.wav").stat().st_uid
    daemon.stop()
    daemon.configure(engine=CLONING)
    daemon.start()
    kind, record = daemon.wait_outcome("mine.json")
    assert kind == "done", record
    assert handed_back == SUBMITTER


@pytest.mark.skipif(os.geteuid() != 0, reason="a submitter other than the daemon: needs root")
def test_a_job_whose_prompt_cannot_be_given_back_stays_claimed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that runs as its own user may not chown its copy back to the submitter:
    handed back, the job would fail not_owner at the next start. It stays in work/."""
    spool = Spool(tmp_path)
    spool.ensure()
    claimed = Claimed.named("j1", "mine.json")
    job = spool.work / claimed.work_name
    job.write_text('{"text": "Hi.", "prompt_audio": "v.wav", "prompt_text": "Hello."}')
    os.chown(job, SUBMITTER, SUBMITTER)
    prompt = spool.prompts / Claimed.named("j1", "v.wav").work_name
    prompt.write_bytes(_wav(0.1))  # the daemon's copy

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)  # as the daemon's own user
    assert not spool.hand_back(claimed)
    assert job.exists()
    assert prompt.exists()
    assert not list(spool.inbox.iterdir())
