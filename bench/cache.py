"""The result cache: first audio of a hit against a miss, and the hit rate of a repeated
workload, in one run.

    .venv/bin/python bench/cache.py [--sentences 30] [--phrases 40] [--requests 200]

1. For each sentence, in turn, streamed over ZeroMQ: the first request (a miss: the worker
   synthesizes it) then the same text again (a hit: served from the cache). Times are
   request sent -> first PCM frame, and -> `end`; pairing them sentence by sentence lets
   both see the same machine. Also a whole-file (`synthesize`) hit in WAV and in Ogg, which
   is resampled and encoded on the way out.
2. A realistic repeated workload on a cold cache: `--requests` streamed requests whose texts
   are drawn from `--phrases` phrases with Zipf-like popularity (the k-th most common is
   asked 1/k as often: greetings and notifications repeat, most phrases are rare). The hit
   rate comes from the daemon's own `stats`.

Piper on the CPU, the daemon as `make run` would start it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Daemon, percentile, sentences, summary_ms  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402

ZIPF_S = 1.0
SEED = 15


def streamed(client: Client, text: str, **options: Any) -> tuple[float, float, bool]:
    """(first PCM frame, end) seconds and whether it was cached, for one streamed request."""
    started = time.perf_counter()
    first = 0.0
    with client.stream(text, **options) as stream:
        for _pcm in stream:
            if not first:
                first = time.perf_counter() - started
    assert stream.end is not None
    return first, time.perf_counter() - started, bool(stream.end["cached"])


def whole(client: Client, text: str, **options: Any) -> tuple[float, bool]:
    started = time.perf_counter()
    result = client.synthesize(text, **options)
    return time.perf_counter() - started, bool(result.header["cached"])


def workload(phrases: int, requests: int) -> list[str]:
    """`requests` texts drawn from `phrases` distinct ones, the k-th with weight 1/k^s."""
    pool = [f"{text} Reference {n}." for n, text in enumerate(sentences(phrases))]
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(phrases)]
    return random.Random(SEED).choices(pool, weights, k=requests)


def run(count: int, phrases: int, requests: int) -> dict[str, Any]:
    texts = sentences(count)
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        daemon = Daemon(Path(root), log={"level": "info"},
                        cache={"max_bytes": "512MiB"})
        daemon.start()
        try:
            with Client(daemon.endpoint, timeout_s=120) as client:
                streamed(client, "Warming up the connection.", cache=False)
                pairs = []
                for text in texts:
                    miss, hit = streamed(client, text), streamed(client, text)
                    assert (miss[2], hit[2]) == (False, True), "expected a miss, then a hit"
                    pairs.append((miss, hit))
                wav = [whole(client, text, format="wav") for text in texts]
                ogg = [whole(client, text, format="ogg", sample_rate=16000) for text in texts]
                assert all(cached for _, cached in wav + ogg)
                before = client.stats()["cache"]
                asked = workload(phrases, requests)
                runs = [streamed(client, text) for text in asked]
                after = client.stats()["cache"]
        finally:
            daemon.stop()
    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    miss_first = [miss[0] for miss, _ in pairs]
    hit_first = [hit[0] for _, hit in pairs]
    return {
        "benchmark": "cache",
        "sentences": count,
        "cpus": os.cpu_count(),
        "stream_miss": {"first_chunk": summary_ms(miss_first),
                        "total": summary_ms([miss[1] for miss, _ in pairs])},
        "stream_hit": {"first_chunk": summary_ms(hit_first),
                       "total": summary_ms([hit[1] for _, hit in pairs])},
        "whole_wav_hit": summary_ms([t for t, _ in wav]),
        "whole_ogg_16k_hit": summary_ms([t for t, _ in ogg]),
        "first_chunk_speedup_p50": round(percentile(miss_first, 0.5)
                                         / percentile(hit_first, 0.5), 1),
        "workload": {
            "requests": requests, "phrases": phrases, "distinct_asked": len(set(asked)),
            "zipf_s": ZIPF_S, "hits": hits, "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4),
            "best_possible_hit_rate": round(1 - len(set(asked)) / requests, 4),
            "first_chunk_hits": summary_ms([r[0] for r in runs if r[2]]),
            "first_chunk_misses": summary_ms([r[0] for r in runs if not r[2]]),
            "cache_bytes": after["bytes"], "cache_entries": after["entries"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=30)
    parser.add_argument("--phrases", type=int, default=40)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(args.sentences, args.phrases, args.requests), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
