"""An intake thread that dies is never silent: the daemon says so everywhere an operator or
a load balancer looks, lets the jobs in progress finish, and exits with its own code (4)
so that systemd restarts it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import zmq

from cosyvoiced import config
from tests.conftest import DaemonFactory
from tests.daemon import free_port, thread_fault, wait_until

EXIT_INTAKE_DIED = 4


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_dead_zmq_thread_stops_the_daemon_with_exit_code_4(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         http={"listen": f"127.0.0.1:{free_port()}"},
                         metrics={"listen": f"127.0.0.1:{free_port()}"},
                         worker={"drain_timeout_s": 30.0})
    fault = thread_fault("zmq")
    daemon.start(extra_env=fault)
    settings = config.load(daemon.config_path)
    assert _get(f"http://{settings.http.listen}/readyz")[0] == 200
    daemon.drop("in-progress.txt", "SLOW@2 A job in progress when the thread dies.")
    wait_until(lambda: daemon.log_events("worker_state") and any(
        e.get("state") == "busy" for e in daemon.log_events("worker_state")), 30, "it to start")

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as killer:
        killer.connect(daemon.endpoint)
        killer.send(json.dumps({"v": 1, "op": "ping", "id": "KILL_THIS_THREAD"}).encode())
        died = wait_until(lambda: daemon.log_events("intake_died"), 30, "intake_died")
    assert "zmq socket thread died" in died[0]["reason"]
    assert died[0]["exit_code"] == EXIT_INTAKE_DIED
    notify = daemon.notify
    assert notify is not None
    wait_until(lambda: any("zmq socket thread died" in s for s in notify.statuses()),
               10, "STATUS= to say so")
    status, body = _get(f"http://{settings.http.listen}/readyz")
    assert status == 503
    assert json.loads(body)["status"] == "stopping"
    metrics = _get(f"http://{settings.metrics.listen}/metrics")[1]
    assert "cosyvoiced_ready 0.0" in metrics
    assert daemon.wait_exit(60) == EXIT_INTAKE_DIED
    daemon.wait_done("in-progress.txt", timeout_s=5)  # it finished before the exit
