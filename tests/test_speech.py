"""Jobs dropped into the inbox come out of the outbox as real speech."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import soundfile

from tests.daemon import Daemon, assert_speech, wait_until

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank."
PARAGRAPH = " ".join([
    "Speech synthesis turns written text into spoken words.",
    "This paragraph has several sentences, so the engine streams it in pieces.",
    "Each piece is appended to the result in order.",
    "The finished file must hold all of them.",
])


def test_txt_job_renamed_into_inbox(shared_daemon: Daemon) -> None:
    shared_daemon.drop("fox.txt", SENTENCE)
    record = shared_daemon.wait_done("fox.txt")
    assert record["file"] == "fox.wav"
    assert record["sample_rate"] == 22050
    assert record["voice"] == "en_US-joe-medium"
    assert record["chars"] == len(SENTENCE)
    duration = assert_speech(shared_daemon.outbox / "fox.wav", 22050, SENTENCE)
    assert abs(record["audio_s"] - duration) < 0.01
    assert record["synth_s"] > 0
    assert set(record["timings"]) >= {"queue_wait_s", "first_chunk_s", "received_at"}


def test_txt_job_written_in_place(shared_daemon: Daemon) -> None:
    shared_daemon.drop("inplace.txt", SENTENCE, how="inplace")
    shared_daemon.wait_done("inplace.txt")
    assert_speech(shared_daemon.outbox / "inplace.wav", 22050, SENTENCE)


def test_json_job_with_options(shared_daemon: Daemon) -> None:
    shared_daemon.drop_job("opts", text=SENTENCE, format="flac", sample_rate=16000, speed=1.5,
                           output="custom-name")
    record = shared_daemon.wait_done("opts.json")
    assert record["file"] == "custom-name.flac"
    info = soundfile.info(str(shared_daemon.outbox / "custom-name.flac"))
    assert info.format == "FLAC"
    assert_speech(shared_daemon.outbox / "custom-name.flac", 16000, SENTENCE, speed=1.5)


def test_speed_changes_duration(shared_daemon: Daemon) -> None:
    shared_daemon.drop_job("slow", text=SENTENCE, speed=0.5)
    shared_daemon.drop_job("fast", text=SENTENCE, speed=2.0)
    slow = shared_daemon.wait_done("slow.json")["audio_s"]
    fast = shared_daemon.wait_done("fast.json")["audio_s"]
    assert 2.5 < slow / fast < 6, (slow, fast)


def test_ogg_and_paragraph(shared_daemon: Daemon) -> None:
    shared_daemon.drop_job("para", text=PARAGRAPH, format="ogg")
    record = shared_daemon.wait_done("para.json")
    info = soundfile.info(str(shared_daemon.outbox / "para.ogg"))
    assert (info.format, info.subtype) == ("OGG", "VORBIS")
    assert_speech(shared_daemon.outbox / "para.ogg", 22050, PARAGRAPH)
    assert record["timings"]["first_chunk_s"] < record["synth_s"]


def test_same_name_twice_keeps_both_results(shared_daemon: Daemon) -> None:
    shared_daemon.drop("twice.txt", "First version of the text.")
    first = shared_daemon.wait_done("twice.txt")
    shared_daemon.drop("twice.txt", "Second version, which is a little longer than the first.")

    def second() -> dict[str, object] | None:
        for path in shared_daemon.outbox.glob("twice-*.json"):
            return dict(json.loads(path.read_text()))
        return None
    record = wait_until(second, 60, "the second result")
    assert record["job"] != first["job"]
    assert (shared_daemon.outbox / "twice.wav").exists()
    assert (shared_daemon.outbox / record["file"]).exists()


def test_ignores_scratch_names_until_renamed(shared_daemon: Daemon) -> None:
    for scratch in (".hidden.txt", "draft.txt.part", "draft.txt.tmp"):
        (shared_daemon.inbox / scratch).write_text(SENTENCE)
    shared_daemon.drop("after-scratch.txt", "A marker job.")
    shared_daemon.wait_done("after-scratch.txt")
    for scratch in (".hidden.txt", "draft.txt.part", "draft.txt.tmp"):
        assert (shared_daemon.inbox / scratch).exists(), scratch
        (shared_daemon.inbox / scratch).unlink()


def test_notifies_systemd_and_logs_json(shared_daemon: Daemon) -> None:
    shared_daemon.drop("logged.txt", "Log this job.")
    record = shared_daemon.wait_done("logged.txt")
    assert shared_daemon.notify is not None
    assert shared_daemon.notify.count("READY=1") == 1
    statuses = shared_daemon.notify.statuses()
    assert any(status.startswith("idle; queue 0; done") for status in statuses), statuses
    # The record is the commit point; the summary line follows it.
    summary = wait_until(lambda: [e for e in shared_daemon.log_events("job")
                                  if e["job"] == record["job"]], 10, "the job's summary line")
    events = shared_daemon.log_events()
    assert len(summary) == 1
    assert summary[0]["outcome"] == "done"
    assert {"source", "voice", "chars", "audio_s", "synth_s", "queue_wait_s"} <= set(summary[0])
    # The worker's own lines and stdlib records from libraries reach the same file as JSON.
    assert any(e.get("proc") == "worker" for e in events)
    states = [e["state"] for e in events if e["event"] == "worker_state"]
    assert states[:3] == ["starting", "warming", "idle"]


def test_a_debug_log_holds_the_daemons_work_not_a_parsers_internals(
        shared_daemon: Daemon) -> None:
    """markdown-it-py traces every block rule it tries at debug level (about 120 lines a
    sentence), which buried the log and slowed every intake that cleans text."""
    shared_daemon.drop("markdown.txt", "# A heading\n\nSome **bold** words and a [link](x).")
    record = shared_daemon.wait_done("markdown.txt")
    wait_until(lambda: [e for e in shared_daemon.log_events("job")
                        if e["job"] == record["job"]], 10, "the job's summary line")
    debug = [e for e in shared_daemon.log_events() if e["level"] == "debug"]
    assert debug, "the test daemon should log at debug level"
    assert not [e for e in debug if str(e.get("logger", "")).startswith("markdown_it")]


def test_cosyvoicectl_drop_and_wait(shared_daemon: Daemon) -> None:
    ctl = [sys.executable, "-m", "cosyvoiced.ctl", "--spool", str(shared_daemon.spool), "drop"]
    run = subprocess.run([*ctl, SENTENCE, "--format", "flac", "--name", "ctl-ok", "--wait", "60"],
                         capture_output=True, text=True, timeout=90, check=False)
    assert run.returncode == 0, run.stderr
    result = Path(run.stdout.strip())
    assert result == shared_daemon.outbox / "ctl-ok.flac"
    assert_speech(result, 22050, SENTENCE)
    # The same name again: its own result (ctl-ok-JOBID.flac), not the first one's.
    again = subprocess.run([*ctl, SENTENCE, "--format", "flac", "--name", "ctl-ok", "--wait",
                            "60"], capture_output=True, text=True, timeout=90, check=False)
    assert again.returncode == 0, again.stderr
    second = Path(again.stdout.strip())
    assert second != result
    assert second.name.startswith("ctl-ok-")
    assert_speech(second, 22050, SENTENCE)
    run = subprocess.run([*ctl, "x" * 500, "--name", "ctl-long", "--wait", "60"],
                         capture_output=True, text=True, timeout=90, check=False)
    assert run.returncode == 1
    assert "job failed: text_too_long: text: 500 characters" in run.stderr
