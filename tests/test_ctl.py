"""cosyvoicectl as a shell script sees it: output, files and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile
from zmq.auth import load_certificate

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, wait_until

TEXT = "The command line client streams this sentence to a file."


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("ctl"))
    running.start()
    yield running
    running.stop()


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cosyvoiced.ctl", "--config",
                           str(daemon.config_path), *args],
                          capture_output=True, timeout=120, check=False)


def test_ping_voices_stats(daemon: Daemon) -> None:
    ping = ctl(daemon, "ping")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["ready"] is True
    voices = ctl(daemon, "voices")
    assert voices.stdout.decode().split("\t")[:3] == ["en_US-joe-medium", "en-us", "22050"]
    stats = json.loads(ctl(daemon, "stats").stdout)
    assert stats["workers"][0]["state"] in ("idle", "busy")


def test_say_to_a_file_and_to_stdout(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "say.wav"
    run = ctl(daemon, "say", TEXT, "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert b"first audio after" in run.stderr
    assert_speech(out, 22050, TEXT)
    piped = ctl(daemon, "say", TEXT, "--play-to-stdout", "--sample-rate", "16000")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout[:4] == b"RIFF"
    raw = ctl(daemon, "say", TEXT, "--play-to-stdout", "--raw")
    samples = len(raw.stdout) // 2
    assert 0.03 < samples / 22050 / len(TEXT) < 0.15
    (tmp_path / "piped.wav").write_bytes(piped.stdout)
    info = soundfile.info(str(tmp_path / "piped.wav"))
    assert info.samplerate == 16000


def test_submit_status_cancel_and_errors(daemon: Daemon) -> None:
    submitted = ctl(daemon, "submit", TEXT, "--format", "flac", "--output", "from-ctl")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.decode().strip()
    wait_until(lambda: json.loads(ctl(daemon, "status", job).stdout)["state"] == "done", 60,
               "the submitted job")
    assert_speech(daemon.outbox / "from-ctl.flac", 22050, TEXT)
    missing = ctl(daemon, "status", "no-such-job")
    assert missing.returncode == 1
    assert missing.stderr.decode().startswith("cosyvoicectl: not_found: job:")
    assert ctl(daemon, "cancel", job).returncode == 1  # already done
    bad = ctl(daemon, "say", "x", "--voice", "nobody", "-o", "/dev/null")
    assert bad.returncode == 1
    assert b"unknown_voice: voice:" in bad.stderr


def test_no_daemon_means_exit_3(daemon: Daemon, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "cosyvoiced.ctl", "--endpoint",
                          f"ipc://{tmp_path}/nobody", "--timeout", "0.3", "ping"],
                         capture_output=True, timeout=60, check=False)
    assert run.returncode == 3
    assert b"no reply from" in run.stderr


def test_keygen_writes_zmq_auth_certificates(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "cosyvoiced.ctl", "keygen", str(tmp_path / "k"),
                          "--name", "laptop"], capture_output=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    public, secret = load_certificate(str(tmp_path / "k" / "laptop.key_secret"))
    assert len(public) == 40
    assert secret is not None
    assert load_certificate(str(tmp_path / "k" / "laptop.key"))[1] is None


def test_client_retries_until_the_daemon_answers(make_daemon: DaemonFactory) -> None:
    """Lazy Pirate: requests sent before the daemon is up get their answer from a retry."""
    daemon = make_daemon()
    answers: list[dict[str, object]] = []

    def ask() -> None:
        with Client(daemon.endpoint, timeout_s=2, retries=30) as client:
            answers.append(client.ping())

    asker = threading.Thread(target=ask)
    asker.start()
    daemon.start()
    asker.join(timeout=90)
    assert answers
    assert answers[0]["event"] == "pong"
