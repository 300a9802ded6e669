"""cosyvoicectl as a shell script sees it: output, files and exit codes."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import soundfile
import zmq
from zmq.auth import load_certificate

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, free_port, wait_until

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


def test_keygen_keeps_the_secret_to_its_owner(tmp_path: Path) -> None:
    """pyzmq writes both files with the umask's modes: under 022 the server's secret was
    0644 in a 0755 directory, for any local user to read and pass for the server."""
    run = subprocess.run(["sh", "-c", f"umask 022 && exec {sys.executable} -m cosyvoiced.ctl "
                          f"keygen {tmp_path / 'k'} --name server"],
                         capture_output=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE((tmp_path / "k" / "server.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "k" / "server.key").stat().st_mode) == 0o644


def _sent_to(endpoint: str, config_path: Path) -> dict[str, object]:
    """The request cosyvoicectl sends to a bare ROUTER at `endpoint` (no daemon)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    try:
        router.bind(endpoint)
        asking = subprocess.Popen([sys.executable, "-m", "cosyvoiced.ctl", "--config",
                                   str(config_path), "--endpoint", endpoint, "--timeout",
                                   "5", "stats"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            assert router.poll(30_000), "no request came"
            frames = router.recv_multipart()
        finally:
            asking.kill()
            asking.wait()
    finally:
        router.close(linger=0)
    return cast(dict[str, object], json.loads(frames[1]))  # after the peer's identity


def test_the_admin_token_goes_to_this_host_s_daemon_only(daemon: Daemon) -> None:
    """The admin token was read from the local spool whatever --endpoint named, and sent to
    it (in clear without CURVE): querying another host gave it admin rights over this one."""
    elsewhere = _sent_to(f"tcp://{_lan_address()}:{free_port()}", daemon.config_path)
    assert "admin" not in elsewhere
    assert elsewhere["op"] == "stats"
    here = _sent_to(f"tcp://127.0.0.1:{free_port()}", daemon.config_path)
    assert here["admin"] == daemon.admin_token()


def _lan_address() -> str:
    """An address of this host that is not loopback (an other host's, as ctl sees it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("this host has no address but loopback")
    return address


def test_a_config_without_zeromq_or_with_curve_is_said_at_once(tmp_path: Path) -> None:
    """Each was 30 s of retries to an address nothing answered on, then exit 3."""
    for settings, said in (("bind = []", "ZeroMQ is off"),
                           ("curve = true", "requires CurveZMQ")):
        path = tmp_path / "c.toml"
        path.write_text(f"[zmq]\n{settings}\n")
        run = subprocess.run([sys.executable, "-m", "cosyvoiced.ctl", "--config", str(path),
                              "ping"], capture_output=True, timeout=20, check=False)
        assert (run.returncode, said in run.stderr.decode()) == (2, True), run.stderr


def test_a_submitter_drops_without_reading_the_daemon_s_secrets(tmp_path: Path) -> None:
    """config.load read http.api_keys_file and cluster.password_file: with them 0600 (the
    daemon's alone), `cosyvoicectl drop` run by a submitter failed, exit 2."""
    spool = tmp_path / "spool"
    (spool / "inbox").mkdir(parents=True)
    path = tmp_path / "c.toml"
    missing = tmp_path / "readable-by-the-daemon-only"
    path.write_text(f'[spool]\ndir = "{spool}"\n[http]\nlisten = "127.0.0.1:{free_port()}"\n'
                    f'api_keys_file = "{missing}"\n[cluster]\npassword_file = "{missing}"\n')
    run = subprocess.run([sys.executable, "-m", "cosyvoiced.ctl", "--config", str(path),
                          "drop", "Hello.", "--name", "hello"],
                         capture_output=True, timeout=20, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads((spool / "inbox" / "hello.json").read_text())["text"] == "Hello."
