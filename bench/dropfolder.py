"""Drop-folder throughput and pickup latency, against the engine called directly, in one run.

    .venv/bin/python bench/dropfolder.py [--sentences 40] [--rounds 2]

Throughput: the same sentences synthesized (a) by the Piper engine called directly in this
process and (b) through the daemon (rename into inbox/ -> result in outbox/), alternating
direct and daemon every `--block` sentences so that both see the same machine (a shared
machine's speed drifts over a run). The supervisor's own CPU time per job is reported too.
Pickup latency: one job at a time, from the rename into inbox/ to the worker starting
synthesis (the `started_at` the worker records). Idle CPU: the daemon's processes over 10 s
with nothing to do. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import (  # noqa: E402
    Daemon,
    children,
    cpu_seconds,
    idle_cpu_percent,
    sentences,
    summary_ms,
)
from cosyvoiced.config import EngineConfig  # noqa: E402
from cosyvoiced.engines import Engine, SynthesisRequest, load_engine  # noqa: E402


def direct_round(engine: Engine, texts: list[str]) -> tuple[float, float]:
    """(seconds, audio seconds) to synthesize every text in this process."""
    voice = engine.default_voice()
    rate = engine.sample_rate(voice)
    samples = 0
    started = time.perf_counter()
    for text in texts:
        for chunk in engine.synthesize(SynthesisRequest(text, voice)):
            samples += len(chunk)
    return time.perf_counter() - started, samples / rate


def drop(daemon: Daemon, name: str, text: str) -> float:
    temp = daemon.inbox / f".{name}.tmp"
    temp.write_text(text)
    os.rename(temp, daemon.inbox / name)
    return time.time()


def wait_record(daemon: Daemon, name: str, timeout_s: float = 300) -> dict[str, Any]:
    """The result record of a .txt job: polls one path (cheap, so the bench stays quiet)."""
    path = daemon.outbox / (name.removesuffix(".txt") + ".json")
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result for {name}")
        time.sleep(0.005)
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def daemon_round(daemon: Daemon, texts: list[str], tag: str) -> tuple[float, float]:
    """(seconds, audio seconds) from the first drop to the last result record."""
    started = time.perf_counter()
    names = [f"{tag}-{n:03d}.txt" for n in range(len(texts))]
    for name, text in zip(names, texts, strict=True):
        drop(daemon, name, text)
    records = [wait_record(daemon, name) for name in names]
    return time.perf_counter() - started, sum(r["audio_s"] for r in records)


def pickup_latencies(daemon: Daemon, texts: list[str]) -> list[float]:
    latencies = []
    for n, text in enumerate(texts):
        name = f"pickup-{n:03d}.txt"
        dropped_at = drop(daemon, name, text)
        record = wait_record(daemon, name)
        latencies.append(record["timings"]["started_at"] - dropped_at)
    return latencies


def run(count: int, rounds: int, block: int) -> dict[str, Any]:
    texts = sentences(count)
    engine = load_engine(EngineConfig())
    direct_round(engine, texts[:3])  # warm-up, as the daemon's worker does
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        daemon = Daemon(Path(root), log={"level": "info"})
        daemon.start()
        try:
            assert daemon.process is not None
            direct: list[tuple[float, float]] = []
            through: list[tuple[float, float]] = []
            supervisor_cpu = cpu_seconds(daemon.process.pid)
            for r in range(rounds):
                for start in range(0, len(texts), block):
                    part = texts[start:start + block]
                    direct.append(direct_round(engine, part))
                    through.append(daemon_round(daemon, part, f"r{r}b{start}"))
            supervisor_cpu = cpu_seconds(daemon.process.pid) - supervisor_cpu
            pickup = pickup_latencies(daemon, texts)
            time.sleep(1.0)  # let the last writes settle before measuring idle
            pids = [daemon.process.pid, *children(daemon.process.pid)]
            idle = idle_cpu_percent(pids, 10.0)
        finally:
            daemon.stop()
    direct_s = sum(s for s, _ in direct)
    daemon_s = sum(s for s, _ in through)
    audio_direct = sum(a for _, a in direct)
    audio_daemon = sum(a for _, a in through)
    jobs = count * rounds
    return {
        "benchmark": "dropfolder",
        "sentences": count,
        "rounds": rounds,
        "block": block,
        "cpus": os.cpu_count(),
        "direct": {"jobs_per_s": round(jobs / direct_s, 3),
                   "audio_s_per_s": round(audio_direct / direct_s, 3)},
        "daemon": {"jobs_per_s": round(jobs / daemon_s, 3),
                   "audio_s_per_s": round(audio_daemon / daemon_s, 3)},
        "throughput_ratio": round(direct_s / daemon_s, 3),
        "supervisor_cpu_ms_per_job": round(supervisor_cpu / jobs * 1000, 2),
        "pickup_latency": summary_ms(pickup),
        "idle_cpu_percent_10s": idle,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(run(args.sentences, args.rounds, args.block), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
