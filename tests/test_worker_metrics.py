"""The workers' gauges say what runs now: a reload to fewer slots leaves no series behind."""

from __future__ import annotations

import re
import signal
import urllib.request

from tests.conftest import DaemonFactory
from tests.daemon import free_port, wait_until

TONE = {"name": "tests.engines.faulty:load"}


def _rss_series(port: int) -> dict[str, float]:
    """slot -> cosyvoiced_worker_rss_bytes, as scraped."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {slot: float(value) for slot, value in re.findall(
        r'^cosyvoiced_worker_rss_bytes\{device="cpu",slot="(\d+)"\} (\S+)$', text,
        re.MULTILINE)}


def test_a_reload_to_fewer_workers_leaves_no_gauges_of_the_gone(
        make_daemon: DaemonFactory) -> None:
    """After a reload from 3 workers to 1, cosyvoiced_worker_rss_bytes still showed about
    50 MB for slots 1 and 2, processes long gone: sum() over it tripled the figure."""
    port = free_port()
    daemon = make_daemon(engine=TONE, worker={"per_device": 3},
                         metrics={"listen": f"127.0.0.1:{port}"})
    daemon.start()
    wait_until(lambda: set(_rss_series(port)) == {"0", "1", "2"} and
               all(_rss_series(port).values()), 30, "three workers' memory")
    daemon.configure(worker={"per_device": 1})
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: set(_rss_series(port)) == {"0"}, 30, "one worker's series only")
    assert _rss_series(port)["0"] > 10e6
