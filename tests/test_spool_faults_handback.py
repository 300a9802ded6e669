"""A stop hands unstarted drop-folder jobs back to the inbox, their prompt audio first: a
job whose prompt cannot go back (a new file of that name waits there) stays claimed."""

from __future__ import annotations

import io
import signal

import numpy as np
import soundfile

from tests.conftest import DaemonFactory
from tests.daemon import wait_until

CLONING = {"name": "tests.engines.faulty:cloning"}
NEVER_READY = {"name": "tests.engines.faulty:never_ready"}
TONE_RATE = 22050  # the tone engine's


def _wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    samples = 0.3 * np.sin(np.arange(int(16000 * seconds)) / 5.0)
    soundfile.write(buffer, samples.astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def test_a_job_whose_prompt_cannot_go_back_to_the_inbox_stays_claimed_with_it(
        make_daemon: DaemonFactory) -> None:
    """The stop put the job file back and left its prompt in prompts/ (the inbox had a new
    file of its name): the next start deleted the prompt (orphan_prompts_removed), and the
    job cloned the other file."""
    daemon = make_daemon(engine=NEVER_READY, worker={"start_timeout_s": 3600.0})
    daemon.start(wait_ready=False)
    prompts = daemon.spool / "prompts"
    wait_until(prompts.is_dir, 30, "the spool")
    mine, theirs = _wav(1.0), _wav(2.0)
    daemon.drop("v.wav", mine)
    daemon.drop_job("first", text="Hi.", prompt_audio="v.wav", prompt_text="Hello.")
    wait_until(lambda: list(prompts.glob("*~v.wav")), 30, "the prompt to be claimed")
    daemon.drop("v.wav", theirs)  # for a job still to come
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    assert [path.read_bytes() for path in prompts.glob("*~v.wav")] == [mine]
    assert [path.name.split("~", 1)[1] for path in daemon.work.iterdir()] == ["first.json"]
    assert (daemon.inbox / "v.wav").read_bytes() == theirs
    assert not (daemon.inbox / "first.json").exists()
    daemon.stop()
    daemon.configure(engine=CLONING)
    daemon.start()
    record = daemon.wait_done("first.json")
    samples, rate = soundfile.read(daemon.outbox / record["file"])
    assert rate == TONE_RATE
    # "Hi." in tone (3 x 50 ms), then its own prompt's length in tone: 1 s, not 2
    assert abs(len(samples) / rate - 1.15) < 0.05, len(samples) / rate
    assert (daemon.inbox / "v.wav").read_bytes() == theirs
    assert not daemon.log_events("orphan_prompts_removed")
