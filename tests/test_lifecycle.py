"""Start-up recovery, crashes, SIGTERM, worker death and systemd's watchdog."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import zmq

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, short_dir, wait_until

LONG_TEXT = " ".join(
    f"Sentence number {n} of a long job keeps the engine busy for a little while."
    for n in range(1, 13))
# A job some seconds long, for tests that only need one in hand while others wait: each
# LONG_TEXT job costs some 10 s of the suite on 2 shared cores.
MEDIUM_TEXT = " ".join(
    f"Sentence number {n} of a shorter job keeps the engine busy for a little while."
    for n in range(1, 5))


def _worker_pids(daemon: Daemon) -> list[int]:
    return [e["worker_pid"] for e in daemon.log_events()
            if e["event"] == "worker_state" and e["state"] == "starting"]


def _busy(daemon: Daemon) -> bool:
    return any(e["event"] == "worker_state" and e["state"] == "busy"
               for e in daemon.log_events())


def _outcomes(daemon: Daemon, name: str) -> list[str]:
    """Every record in the outbox or failed/ that belongs to input `name`."""
    found = []
    for path in daemon.outbox.glob("*.json"):
        if json.loads(path.read_text()).get("input") == name:
            found.append(f"outbox/{path.name}")
    for path in daemon.failed.glob("*.error.json"):
        if json.loads(path.read_text()).get("input") == name:
            found.append(f"failed/{path.name}")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_files_present_at_start_and_work_left_by_a_crash(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    prompts = daemon.spool / "prompts"
    for directory in (daemon.inbox, daemon.work, daemon.outbox, daemon.failed, prompts):
        directory.mkdir(parents=True)
    (daemon.inbox / "early.txt").write_text("I was here before the daemon started.")
    os.utime(daemon.inbox / "early.txt", (1, 1))  # old enough to be past the quiet period
    (daemon.work / "1a0000000000aaaaaa~left.txt").write_text("I was claimed, then it crashed.")
    # Crashed after publishing, before releasing the work file: must not run again.
    (daemon.work / "1a0000000000bbbbbb~published.txt").write_text("Already done.")
    (daemon.outbox / "published.wav").write_bytes(b"RIFF")
    (daemon.outbox / "published.json").write_text(json.dumps(
        {"job": "1a0000000000bbbbbb", "input": "published.txt", "file": "published.wav"}))
    (prompts / "1a0000000000bbbbbb~used.wav").write_bytes(b"RIFF")
    # Crashed after writing the error record, before moving the input: finish the move.
    (daemon.work / "1a0000000000cccccc~half-failed.json").write_text("{not json")
    (daemon.failed / "half-failed.json.error.json").write_text(json.dumps(
        {"job": "1a0000000000cccccc", "input": "half-failed.json", "code": "bad_json",
         "message": "not valid JSON"}))
    (prompts / "1a0000000000cccccc~voice.wav").write_bytes(b"RIFF")
    daemon.start()
    assert_speech(daemon.outbox / daemon.wait_done("early.txt")["file"], 22050,
                  "I was here before the daemon started.")
    assert daemon.wait_done("left.txt")["job"] == "1a0000000000aaaaaa"
    wait_until(lambda: not list(daemon.work.iterdir()), 30, "work/ to empty")
    assert (daemon.outbox / "published.wav").read_bytes() == b"RIFF"  # not redone
    assert _outcomes(daemon, "published.txt") == ["outbox/published.json"]
    assert (daemon.failed / "half-failed.json").exists()
    assert _outcomes(daemon, "half-failed.json") == ["failed/half-failed.json.error.json"]
    assert (daemon.failed / "voice.wav").read_bytes() == b"RIFF", "the prompt follows its job"
    assert not list(prompts.iterdir()), "a finished job's prompt is not kept"


def test_temp_files_of_writes_cut_short_are_removed_at_start(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine__cosyvoice={"speakers_file": "state/speakers.json"})
    state = daemon.root / "state"
    for directory in (daemon.inbox, daemon.work, daemon.outbox, daemon.failed, state):
        directory.mkdir(parents=True)
    ours = [daemon.outbox / ".job01.wav.c23900e2.tmp", daemon.outbox / ".job01.json.0a1b2c3d.tmp",
            daemon.failed / ".bad.json.error.json.deadbeef.tmp",
            daemon.work / ".1a0000000000dddddd~x.json.00ff00ff.tmp",
            state / ".speakers.json.12345678.tmp"]
    others = [daemon.inbox / ".client.wav.c23900e2.tmp",  # a client's, still being written
              daemon.outbox / ".notes.tmp", daemon.outbox / "kept.wav.c23900e2.tmp",
              state / ".other.json.12345678.tmp"]
    for path in ours + others:
        path.write_bytes(b"partial")
    daemon.start()
    (event,) = daemon.log_events("temp_files_removed")
    assert sorted(event["files"]) == sorted(
        ["outbox/.job01.wav.c23900e2.tmp", "outbox/.job01.json.0a1b2c3d.tmp",
         "failed/.bad.json.error.json.deadbeef.tmp",
         "work/.1a0000000000dddddd~x.json.00ff00ff.tmp", ".speakers.json.12345678.tmp"])
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in others)


def test_sigkill_mid_job_then_restart_ends_every_input_once(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    # Two before the crash, one in hand when it comes, two still queued.
    names = [f"crash-{n}.txt" for n in range(5)]
    for name in names:
        daemon.drop(name, MEDIUM_TEXT)
    daemon.drop("crash-bad.json", "{oops")
    wait_until(lambda: len(list(daemon.outbox.glob("crash-*.wav"))) >= 2, 120,
               "two results before the crash")
    wait_until(lambda: any(daemon.work.iterdir()), 30, "a job in hand")
    worker_pid = _worker_pids(daemon)[-1]
    daemon.kill_hard()
    wait_until(lambda: not _alive(worker_pid), 10, "the orphaned worker to die")
    left = list(daemon.work.iterdir())
    assert left, "the crash should have left claimed jobs in work/"

    daemon.start()
    # The jobs left end in the order the queue takes them, not by name: wait for all at once,
    # a minute for each (they are long, and share 2 cores with the rest of the suite).
    wait_until(lambda: all(daemon.outcome(name) for name in names), 60 * len(names),
               "every input to end after the restart")
    daemon.wait_failed("crash-bad.json")
    wait_until(lambda: not list(daemon.work.iterdir()), 30, "work/ to empty")
    for name in [*names, "crash-bad.json"]:
        assert len(_outcomes(daemon, name)) == 1, (name, _outcomes(daemon, name))
    assert not list(daemon.inbox.iterdir())
    for name in names:
        record = daemon.wait_done(name)
        assert_speech(daemon.outbox / record["file"], 22050, MEDIUM_TEXT)


def _tone_wav(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    times = np.arange(int(seconds * rate)) / rate
    soundfile.write(buffer, 0.2 * np.sin(2 * np.pi * 220 * times), rate, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_a_submitted_job_with_prompt_audio_survives_a_restart(make_daemon: DaemonFactory,
                                                               stop: str) -> None:
    """A ZeroMQ `submit` keeps its prompt audio in the spool as if dropped in the inbox. It
    was named `ID.prompt`, not named as audio: after a crash its job failed (invalid_field),
    and a stop handed the prompt back to the inbox beside its job, where it was taken as a job
    of its own (unsupported_file_type): two records for one request. Each ends once now."""
    daemon = make_daemon(engine={"name": "tests.engines.faulty:cloning"},
                         worker={"drain_timeout_s": 0.5})
    daemon.start()
    with Client(daemon.endpoint, timeout_s=30) as client:
        blocker = client.submit("SLOW@3 holds the worker.", output="blocker")
        cloned = client.submit("Say it in my voice.", prompt_audio=_tone_wav(1.5),
                               output="cloned")
    wait_until(lambda: _busy(daemon), 30, "the worker to be busy")
    if stop == "sigkill":
        daemon.kill_hard()
    else:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    daemon.start()
    inputs = [f"{blocker}.json", f"{cloned}.json"]
    for name in inputs:
        daemon.wait_done(name)
    wait_until(lambda: not list(daemon.work.iterdir()), 30, "work/ to empty")
    assert daemon.outcome_counts() == dict.fromkeys(inputs, 1)
    assert not list(daemon.inbox.iterdir())


def test_a_reply_still_being_encoded_at_the_drain_deadline_is_told_to_ask_again(
        make_daemon: DaemonFactory) -> None:
    """SIGTERM while a ZeroMQ reply's long Ogg file was in the encoder, past
    worker.drain_timeout_s: the daemon exited and the request was never answered (its
    client waited for its own timeout). It is told to ask again now (`shutting_down`); a
    drop-folder job in the encoder stays in work/ and is made again at the next start."""
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         spool={"max_text_chars": 20_000}, worker={"drain_timeout_s": 0.5})
    daemon.start()
    text = " ".join(["A very long text for a very long file, made of tone."] * 370)  # 975 s
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(daemon.endpoint)
        dealer.send_json({"v": 1, "op": "synthesize", "id": "long", "format": "ogg",
                          "text": text})
        job = wait_until(lambda: daemon.log_events("job_queued"), 30, "the job")[0]["job"]

        def in_the_encoder() -> bool:
            dealer.send_json({"v": 1, "op": "status", "id": "s", "job": job})
            assert dealer.poll(10_000), "no status"
            reply = json.loads(dealer.recv_multipart()[0])
            assert reply["event"] == "status", f"the file was made before the stop: {reply}"
            return bool(reply.get("writing"))

        wait_until(in_the_encoder, 120, "the job's file to be in the encoder")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        assert dealer.poll(5_000), "the request was never answered"
        reply = json.loads(dealer.recv_multipart()[0])
        # ZeroMQ's wire says `busy` for shutting_down (protocol.py): ask again, elsewhere
        assert (reply["event"], reply["code"]) == ("error", "busy"), reply
        assert "stopped before this result was written" in reply["message"]
    finally:
        dealer.close(linger=0)


def test_a_drop_still_being_encoded_at_the_drain_deadline_is_made_at_the_next_start(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         spool={"max_text_chars": 20_000}, worker={"drain_timeout_s": 0.5})
    daemon.start()
    text = " ".join(["A very long text for a very long file, made of tone."] * 370)  # 975 s
    daemon.drop_job("long-drop", text=text, format="ogg")
    job = wait_until(lambda: daemon.log_events("job_queued"), 30, "the job")[0]["job"]
    with Client(daemon.endpoint, timeout_s=30, admin_token=daemon.admin_token()) as client:
        wait_until(lambda: client.status(job).get("writing"), 120,
                   "the job's file to be in the encoder")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert daemon.outcome("long-drop.json") is None
    assert list(daemon.work.iterdir()), "the job is left in work/"
    daemon.start()
    daemon.wait_done("long-drop.json", timeout_s=180)
    assert daemon.outcome_counts() == {"long-drop.json": 1}


def test_sigterm_while_busy_finishes_or_hands_back(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    names = [f"term-{n}.txt" for n in range(3)]  # one in hand, two queued
    for name in names:
        daemon.drop(name, MEDIUM_TEXT)
    wait_until(lambda: _busy(daemon), 30, "the worker to be busy")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert daemon.notify is not None
    assert daemon.notify.seen("STOPPING=1")
    assert not list(daemon.work.iterdir()), "nothing may be left claimed"
    for name in names:
        finished = daemon.outcome(name) is not None
        handed_back = (daemon.inbox / name).exists()
        assert finished != handed_back, (name, finished, handed_back)
    assert any(daemon.outcome(name) is not None for name in names)  # the one in hand finished
    # A restart serves the handed-back jobs.
    daemon.start()
    for name in names:
        daemon.wait_done(name)


def test_worker_killed_mid_job_is_replaced_and_the_job_retried(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    daemon.drop("victim.txt", MEDIUM_TEXT)
    wait_until(lambda: _busy(daemon), 30, "the worker to be busy")
    os.kill(_worker_pids(daemon)[-1], signal.SIGKILL)
    record = daemon.wait_done("victim.txt")
    assert_speech(daemon.outbox / record["file"], 22050, MEDIUM_TEXT)
    events = daemon.log_events()
    assert [e for e in events if e["event"] == "job_retry" and e["job"] == record["job"]]
    assert len(_worker_pids(daemon)) == 2
    assert daemon.notify is not None
    assert daemon.notify.count("READY=1") == 1  # a worker restart is not a daemon restart


def test_engine_that_cannot_load_exits_with_distinct_code(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"voice": "no-such-voice"}, worker={"max_start_failures": 2})
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(timeout_s=90) == 3
    assert daemon.notify is not None
    assert not daemon.notify.seen("READY=1")
    fatal = daemon.log_events("worker_start_failed")
    assert len(fatal) == 1
    assert "no-such-voice" in fatal[0]["reason"]


@pytest.mark.serial
def test_watchdog_pings_at_half_the_interval(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start(extra_env={"WATCHDOG_USEC": "1000000"})
    assert daemon.notify is not None
    notify = daemon.notify
    wait_until(lambda: notify.count("WATCHDOG=1") >= 5, 10, "five watchdog pings")
    pings = notify.times("WATCHDOG=1")
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert max(gaps[1:]) < 0.9, gaps  # WatchdogSec=1 s: pinged about every 0.5 s


def test_status_line_tracks_the_queue(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    for n in range(3):
        daemon.drop(f"status-{n}.txt", MEDIUM_TEXT)
    for n in range(3):
        daemon.wait_done(f"status-{n}.txt")
    assert daemon.notify is not None
    statuses: list[Any] = daemon.notify.statuses()
    assert any(s.startswith("busy ") for s in statuses), statuses
    wait_until(lambda: daemon.notify is not None and daemon.notify.statuses()[-1].startswith(
        "idle; queue 0; done 3; failed 0"), 10, "the idle status")


def test_log_file_rotates_and_stays_json(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(log={"max_bytes": 8192, "backups": 2})
    daemon.start()
    for n in range(3):
        daemon.drop(f"rotate-{n}.txt", LONG_TEXT)
        daemon.wait_done(f"rotate-{n}.txt")
    rotated = sorted(daemon.log_file.parent.glob("cosyvoiced.log*"))
    assert [p.name for p in rotated] == ["cosyvoiced.log", "cosyvoiced.log.1", "cosyvoiced.log.2"]
    for path in rotated:
        assert path.stat().st_size <= 8192 + 4096
        for line in path.read_text().splitlines():
            assert json.loads(line)["timestamp"]


def test_a_notify_socket_nobody_reads_never_stalls_the_daemon(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A busy or stuck manager: its datagram queue fills (10 messages), sends must not block."""
    directory = Path(short_dir())
    undrained = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        undrained.bind(str(directory / "notify"))
        daemon = make_daemon()
        daemon.start(extra_env={"NOTIFY_SOCKET": str(directory / "notify")}, wait_ready=False)
        wait_until(lambda: daemon.log_events("ready"), 90, "the engine to be ready")
        names = [f"unread-{n}.txt" for n in range(12)]
        for name in names:
            daemon.drop(name, "Every job changes STATUS= twice.")
        for name in names:
            daemon.wait_done(name)
    finally:
        undrained.close()
        shutil.rmtree(directory, ignore_errors=True)


def _wav(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16000 * seconds), dtype=np.float32), 16000,
                    format="WAV")
    return buffer.getvalue()


def test_sigterm_hands_queued_prompts_back_with_their_jobs(make_daemon: DaemonFactory) -> None:
    """A queued job goes back to the inbox on stop, and the prompt it claimed goes with it,
    so that the next start finds both (here Piper then refuses to clone: not_supported)."""
    daemon = make_daemon()
    daemon.start()
    for n in range(3):
        daemon.drop(f"ahead-{n}.txt", LONG_TEXT)
    wait_until(lambda: _busy(daemon), 30, "the worker to be busy")
    daemon.drop("speaker.wav", _wav())
    daemon.drop_job("clone", text="Hi.", prompt_audio="speaker.wav", prompt_text="Hello.")
    prompts = daemon.spool / "prompts"
    wait_until(lambda: list(prompts.glob("*~speaker.wav")), 30, "the prompt to be claimed")
    assert daemon.outcome("clone.json") is None, "ran before the stop: the test proves nothing"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert (daemon.inbox / "clone.json").exists()
    assert (daemon.inbox / "speaker.wav").read_bytes() == _wav()
    assert not list(prompts.iterdir())
    daemon.start()
    record = daemon.wait_failed("clone.json")
    assert (record["code"], record["field"]) == ("not_supported", "prompt_audio")
    wait_until((daemon.failed / "speaker.wav").exists, 10, "the prompt beside it")


def test_start_removes_orphan_prompts_and_keeps_claimed_ones(make_daemon: DaemonFactory) -> None:
    """A crash can leave a prompt whose job is gone (removed at start) or a claimed job with
    its prompt (recovered together)."""
    daemon = make_daemon()
    prompts = daemon.spool / "prompts"
    for directory in (prompts, daemon.work):
        directory.mkdir(parents=True)
    (prompts / "1a0000000000000aa~lost.wav").write_bytes(_wav())
    (prompts / "1a0000000000000bb~kept.wav").write_bytes(_wav())
    (daemon.work / "1a0000000000000bb~kept.json").write_text(json.dumps(
        {"text": "Hi.", "prompt_audio": "kept.wav", "prompt_text": "Hello."}))
    daemon.start()
    removed = wait_until(lambda: daemon.log_events("orphan_prompts_removed"), 10,
                         "the orphan report")
    assert removed[0]["prompts"] == ["1a0000000000000aa~lost.wav"]
    record = daemon.wait_failed("kept.json")
    assert (record["code"], record["field"]) == ("not_supported", "prompt_audio")
    # The error record commits the failure; the input and its prompt follow it.
    wait_until((daemon.failed / "kept.wav").exists, 10,
               "the recovered job's prompt beside it")
    assert not list(prompts.iterdir())
