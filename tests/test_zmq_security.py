"""CurveZMQ, refusal of insecure network binds, and per-client/queue limits."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from cosyvoiced.client import Client, DaemonError, NoReply, load_keypair
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until, write_config

LONG_TEXT = " ".join(f"Sentence {n} keeps the worker busy for a while." for n in range(30))


def _keys(directory: Path, name: str) -> tuple[bytes, bytes]:
    _public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    public, secret = load_keypair(secret_file)
    assert secret is not None
    return public, secret


def _curve_daemon(make_daemon: DaemonFactory, root: Path, authorize: tuple[Path, ...] = (),
                  **sections: dict[str, Any]) -> tuple[Daemon, bytes, Path]:
    """A started daemon with CURVE on, admitting the public key files in `authorize`, and
    `sections` of config besides: (daemon, server public key, authorized keys dir)."""
    server_dir, authorized = root / "server", root / "authorized"
    for directory in (server_dir, authorized):
        directory.mkdir()
    for key in authorize:
        shutil.copy(key, authorized)
    server_public, _ = _keys(server_dir, "server")
    daemon = make_daemon(zmq={"curve": True,
                              "server_secret_key": str(server_dir / "server.key_secret"),
                              "authorized_keys_dir": str(authorized)} | sections.pop("zmq", {}),
                         **sections)
    daemon.start()
    return daemon, server_public, authorized


def _client_keys(root: Path, name: str) -> tuple[bytes, bytes]:
    (root / name).mkdir()
    return _keys(root / name, name)


def test_curve_admits_only_authorized_keys(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    known = _client_keys(tmp_path, "known")  # its public half, known.key, authorizes it
    daemon, server_public, _ = _curve_daemon(make_daemon, tmp_path,
                                             authorize=(tmp_path / "known" / "known.key",))
    stranger = _client_keys(tmp_path, "stranger")
    with Client(daemon.endpoint, server_key=server_public, client_keypair=known,
                timeout_s=30) as client:
        assert client.ping()["ready"] is True
        assert client.synthesize("Only for friends.", format="pcm_s16le").audio
    with Client(daemon.endpoint, server_key=server_public, client_keypair=stranger,
                timeout_s=2, retries=0) as client, pytest.raises(NoReply):
        client.ping()
    with Client(daemon.endpoint, timeout_s=2, retries=0) as client, pytest.raises(NoReply):
        client.ping()


def test_a_curve_key_is_one_client_on_every_connection_for_its_limit(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    # Requests in flight are counted per client, as an HTTP API key's are: a key that opens
    # more connections gets no more places in zmq.max_pending_per_client.
    public, secret = _client_keys(tmp_path, "app")
    daemon, server_public, _ = _curve_daemon(
        make_daemon, tmp_path, authorize=(tmp_path / "app" / "app.key",),
        engine={"name": "tests.engines.faulty:load"}, zmq={"max_pending_per_client": 1})
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as first, context.socket(zmq.DEALER) as second:
        for raw in (first, second):
            raw.curve_serverkey, raw.curve_publickey, raw.curve_secretkey = \
                server_public, public, secret
            raw.connect(daemon.endpoint)
        first.send_json({"v": 1, "op": "synthesize", "id": "held", "text": "SLOW@10 Held."})
        wait_until(lambda: daemon.log_events("job_queued"), 30, "the first request to queue")
        second.send_json({"v": 1, "op": "synthesize", "id": "more", "text": "Hello."})
        assert second.poll(30_000)
        reply = json.loads(second.recv_multipart()[0])
    assert (reply["id"], reply["event"], reply.get("code")) == ("more", "error", "busy")
    assert "1 requests of this client are in flight (zmq.max_pending_per_client = 1)" in \
        reply["message"]


def test_sighup_rereads_the_authorized_keys(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon, server_public, authorized = _curve_daemon(make_daemon, tmp_path)
    laptop = _client_keys(tmp_path, "laptop")
    laptop_dir = tmp_path / "laptop"
    with Client(daemon.endpoint, server_key=server_public, client_keypair=laptop,
                timeout_s=2, retries=0) as client, pytest.raises(NoReply):
        client.ping()
    (authorized / "laptop.key").write_bytes((laptop_dir / "laptop.key").read_bytes())
    daemon.signal(signal.SIGHUP)
    assert daemon.notify is not None
    notify = daemon.notify
    wait_until(lambda: notify.count("READY=1") == 2, 30, "the reload")
    with Client(daemon.endpoint, server_key=server_public, client_keypair=laptop,
                timeout_s=30) as client:
        assert client.ping()["ready"] is True


@pytest.mark.parametrize(("zmq_settings", "message"), [
    ({"bind": ["tcp://0.0.0.0:5599"]}, "zmq.bind: 'tcp://0.0.0.0:5599' is reachable from the "
                                       "network but zmq.curve is off"),
    ({"bind": ["tcp://*:5599"]}, "zmq.bind: 'tcp://*:5599' is reachable"),
    ({"bind": ["udp://127.0.0.1:5"]}, "zmq.bind: 'udp://127.0.0.1:5' is not a tcp:// or ipc://"),
    ({"bind": ["tcp://0.0.0.0:5599"], "curve": True}, "zmq.server_secret_key: zmq.curve needs"),
])
def test_insecure_or_incomplete_network_binds_stop_start_up(
        tmp_path: Path, zmq_settings: dict[str, object], message: str) -> None:
    path = tmp_path / "c.toml"
    write_config(path, {"spool": {"dir": str(tmp_path / "spool")}, "zmq": zmq_settings})
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_allow_insecure_permits_a_network_bind(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    write_config(path, {"zmq": {"bind": ["tcp://0.0.0.0:5599"], "allow_insecure": True}})
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--check-config", "--config",
                          str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr


def test_busy_when_a_client_or_the_queue_is_over_its_limit(make_daemon: DaemonFactory) -> None:
    # Anonymous clients (no CURVE) may fill half of max_pending together: 2 places here.
    daemon = make_daemon(zmq={"max_pending": 4, "max_pending_per_client": 1})
    daemon.start()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as raw:
        raw.connect(daemon.endpoint)
        for n in range(2):
            raw.send_json({"v": 1, "op": "synthesize", "id": f"s{n}", "text": LONG_TEXT})
        replies = {}
        while "s1" not in replies:
            assert raw.poll(60_000)
            reply = json.loads(raw.recv_multipart()[0])
            replies[reply["id"]] = reply
        assert replies["s1"]["code"] == "busy"
        assert "max_pending_per_client" in replies["s1"]["message"]
    with Client(daemon.endpoint, timeout_s=30) as client:
        accepted: list[str] = []
        refusal: DaemonError | None = None
        while refusal is None and len(accepted) < 5:  # one job runs, two may wait: then busy
            try:
                accepted.append(client.submit(LONG_TEXT))
            except DaemonError as error:
                refusal = error
        assert refusal is not None
        assert refusal.code == "busy"
        assert "zmq.max_pending" in refusal.message
        assert len(accepted) in (2, 3)  # 2 if the first, abandoned job was still running
        for job in accepted:
            client.cancel(job)


def _curve_dealer(endpoint: str, server_public: bytes, keys: tuple[bytes, bytes],
                  routing_id: bytes) -> zmq.Socket[bytes]:
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, routing_id)
    dealer.curve_serverkey = server_public
    dealer.curve_publickey, dealer.curve_secretkey = keys
    dealer.connect(endpoint)
    return dealer


def _stream_events(dealer: zmq.Socket[bytes]) -> list[str]:
    """The events of one stream, up to its last."""
    events: list[str] = []
    while not events or events[-1] in ("start", "chunk"):
        assert dealer.poll(30_000), f"the stream stopped after {events}"
        events.append(json.loads(dealer.recv_multipart()[0])["event"])
    return events


def test_another_curve_key_cannot_take_over_a_clients_routing_id(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Routes are keyed by routing id, which a client may choose (many set a fixed one):
    with CURVE, a second key that connects with it gets nothing of the first's, and its
    leaving does not cancel the first's job."""
    alice, bob = _client_keys(tmp_path, "alice"), _client_keys(tmp_path, "bob")
    daemon, server_public, _ = _curve_daemon(
        make_daemon, tmp_path, engine={"name": "tests.engines.faulty:load"},
        authorize=(tmp_path / "alice" / "alice.key", tmp_path / "bob" / "bob.key"))
    first = _curve_dealer(daemon.endpoint, server_public, alice, b"app-1")
    try:
        first.send_json({"v": 1, "op": "synthesize", "id": "alice", "stream": True,
                         "text": "One SLOW@1. Two SLOW@1. Three SLOW@1. Four."})
        assert first.poll(30_000)
        assert json.loads(first.recv_multipart()[0])["event"] == "start"
        second = _curve_dealer(daemon.endpoint, server_public, bob, b"app-1")
        second.send_json({"v": 1, "op": "ping", "id": "bob"})
        assert not second.poll(2_000), "the second key was answered on the first's route"
        second.close(linger=0)
        assert _stream_events(first)[-1] == "end"
    finally:
        first.close(linger=0)


def _handshake(dealer: zmq.Socket[bytes], timeout_s: float = 10) -> int | None:
    """The first handshake event of `dealer`'s connection: succeeded or failed (None: none
    came in time)."""
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    try:
        if not monitor.poll(int(timeout_s * 1000)):
            return None
        return int(recv_monitor_message(monitor)["event"])
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)


def test_a_peer_without_an_authorized_key_makes_no_room_at_max_connections(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """At zmq.max_connections a host holding more connections gives one up for another
    host's newcomer; the room was made before the newcomer's CURVE key was checked, so a peer
    with no authorized key closed other hosts' connections, and was refused all the same.
    Room is made for an authorized peer only."""
    known = _client_keys(tmp_path, "known")
    stranger = _client_keys(tmp_path, "stranger")
    port = free_port()
    daemon, server_public, _ = _curve_daemon(
        make_daemon, tmp_path, authorize=(tmp_path / "known" / "known.key",),
        zmq={"bind": [f"tcp://127.0.0.1:{port}"], "max_connections": 3})
    dealers: list[zmq.Socket[bytes]] = []

    def connect(source: str, keys: tuple[bytes, bytes]) -> zmq.Socket[bytes]:
        dealer = _curve_dealer(f"tcp://{source}:0;127.0.0.1:{port}", server_public, keys,
                               f"peer-{len(dealers)}".encode())
        dealer.setsockopt(zmq.RECONNECT_IVL, -1)
        dealers.append(dealer)
        return dealer

    try:
        for _ in range(3):  # another host's, silent: they may be given up
            assert _handshake(connect("127.0.0.2", known)) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert _handshake(connect("127.0.0.1", stranger)) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert not daemon.log_events("zmq_connections_given_up"), "room made for a stranger"
        newcomer = connect("127.0.0.1", known)
        newcomer.send_json({"v": 1, "op": "ping", "id": "in"})
        assert newcomer.poll(10_000), "no room was made for an authorized peer"
        assert json.loads(newcomer.recv())["event"] == "pong"
        assert daemon.log_events("zmq_connections_given_up")
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
