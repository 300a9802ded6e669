"""ZeroMQ streaming latency against the engine's own first-chunk time, in one run.

    .venv/bin/python bench/zmq.py [--sentences 40]

For each sentence, in turn: the Piper engine called directly in this process (time to its
first chunk and to its last), then the same sentence streamed from the daemon over ZeroMQ
(request sent -> first PCM frame received, and -> `end`). Pairing them sentence by sentence
lets both see the same machine. Then 4 clients stream at once. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Daemon, percentile, sentences, summary_ms  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402
from cosyvoiced.config import EngineConfig  # noqa: E402
from cosyvoiced.engines import Engine, SynthesisRequest, load_engine  # noqa: E402


def direct(engine: Engine, text: str) -> tuple[float, float]:
    """(first chunk, total) seconds for the engine called in this process."""
    started = time.perf_counter()
    first = 0.0
    for chunk in engine.synthesize(SynthesisRequest(text, engine.default_voice())):
        if not first and len(chunk):
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def streamed(client: Client, text: str) -> tuple[float, float]:
    """(first PCM frame, end event) seconds for one streamed request over ZeroMQ."""
    started = time.perf_counter()
    first = 0.0
    with client.stream(text) as stream:
        for _pcm in stream:
            if not first:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


def concurrent(endpoint: str, texts: list[str], clients: int) -> dict[str, Any]:
    firsts: list[float] = []
    totals: list[float] = []
    lock = threading.Lock()

    def one(share: list[str]) -> None:
        with Client(endpoint, timeout_s=120) as client:
            for text in share:
                first, total = streamed(client, text)
                with lock:
                    firsts.append(first)
                    totals.append(total)

    threads = [threading.Thread(target=one, args=(texts[n::clients],)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "first_chunk": summary_ms(firsts), "total": summary_ms(totals),
            "sentences_per_s": round(len(texts) / elapsed, 3)}


def run(count: int) -> dict[str, Any]:
    texts = sentences(count)
    engine = load_engine(EngineConfig())
    direct(engine, texts[0])  # warm-up, as the worker does
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        daemon = Daemon(Path(root), log={"level": "info"})
        daemon.start()
        try:
            with Client(daemon.endpoint, timeout_s=60) as client:
                streamed(client, texts[0])  # connect and settle
                pairs = [(direct(engine, text), streamed(client, text)) for text in texts]
                started = time.perf_counter()
                for text in texts:
                    streamed(client, text)
                sequential_rate = len(texts) / (time.perf_counter() - started)
            parallel = concurrent(daemon.endpoint, texts, 4)
        finally:
            daemon.stop()
    engine_first = [d[0] for d, _ in pairs]
    zmq_first = [z[0] for _, z in pairs]
    return {
        "benchmark": "zmq",
        "sentences": count,
        "cpus": os.cpu_count(),
        "engine_direct": {"first_chunk": summary_ms(engine_first),
                          "total": summary_ms([d[1] for d, _ in pairs])},
        "zmq_sequential": {"first_chunk": summary_ms(zmq_first),
                           "total": summary_ms([z[1] for _, z in pairs]),
                           "sentences_per_s": round(sequential_rate, 3)},
        "zmq_4_clients": parallel,
        "first_chunk_overhead_ms": {
            "p50": round((percentile(zmq_first, 0.5) - percentile(engine_first, 0.5)) * 1000, 2),
            "p50_of_paired_differences": round(percentile(
                [z - e for z, e in zip(zmq_first, engine_first, strict=True)], 0.5) * 1000, 2),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(run(args.sentences), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
