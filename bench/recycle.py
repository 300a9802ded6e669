"""The service gap while the worker is recycled, with and without `worker.spare`, in one run.

    .venv/bin/python bench/recycle.py [--sentences 16] [--max-jobs 4]

One client streams sentences back to back from a daemon whose worker is recycled every
`--max-jobs` jobs. The gap before a request is the time from the last chunk of the one
before to its own first chunk; requests served right after a recycle show the service gap
(last chunk from the old worker -> first chunk from the new one). Reported next to the
engine's load + warm-up time from the daemon's own log. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Daemon, sentences  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402


def one_mode(spare: bool, texts: list[str], max_jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        daemon = Daemon(Path(root), log={"level": "info"},
                        worker={"max_jobs": max_jobs, "spare": spare})
        daemon.start()
        try:
            served: list[tuple[str, float, float]] = []  # (job, first chunk, last chunk)
            with Client(daemon.endpoint, timeout_s=120) as client:
                for text in texts:
                    first_at = last_at = 0.0
                    with client.stream(text) as stream:
                        for _pcm in stream:
                            last_at = time.perf_counter()
                            first_at = first_at or last_at
                    served.append((str(stream.start["job"]), first_at, last_at))
            events = daemon.log_events()
        finally:
            daemon.stop()
    generation = {e["job"]: e["generation"] for e in events
                  if e["event"] == "worker_state" and e["state"] == "busy"}
    switched: list[float] = []
    steady: list[float] = []
    for (job_before, _, last_before), (job, first, _) in itertools.pairwise(served):
        gap = first - last_before
        (switched if generation[job] != generation[job_before] else steady).append(gap)
    ready = [e for e in events if e["event"] == "worker_state" and e["state"] == "idle"
             and "load_s" in e]
    loads = [e["load_s"] + e["warmup_s"] for e in ready]
    return {
        "spare": spare,
        "recycles": sum(1 for e in events if e["event"] == "worker_recycle"),
        "recycle_gap_ms": [round(g * 1000, 1) for g in switched],
        "recycle_gap_max_ms": round(max(switched, default=0) * 1000, 1),
        "steady_gap_median_ms": round(statistics.median(steady) * 1000, 1) if steady else None,
        "engine_load_and_warmup_ms": round(statistics.median(loads) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--max-jobs", type=int, default=4)
    args = parser.parse_args()
    texts = sentences(args.sentences)
    modes = [one_mode(spare, texts, args.max_jobs) for spare in (False, True)]
    print(json.dumps({"benchmark": "recycle", "cpus": os.cpu_count(), "sentences": len(texts),
                      "max_jobs": args.max_jobs, "modes": modes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
