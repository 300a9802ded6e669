"""The worker pool and segment scheduling, measured side by side in one run (Piper voice).

    .venv/bin/pip install -e '.[bench]'   # flask (Piper's server), pocketsphinx (ASR)
    .venv/bin/python bench/pool.py [--sentences 16] [--rounds 3]

- clients: first audio of streamed requests, one client and 4 at once, for cosyvoiced with
  1 worker, with `worker.per_device = 2` and with the default ("auto": one Piper worker per
  core), next to Piper's own HTTP server;
- behind_long: a short streamed request sent while a ~200-word drop-folder job runs, against
  the same request alone (1 worker, 2, and the default);
- first_clause: first audio of a streamed long sentence with the first-segment cut
  (`scheduling.first_segment_words = 5`) and without it (0), and the word error rate of both
  by ASR (pocketsphinx's bundled English model), so the cut is seen not to hurt the words;
- throughput: audio seconds per wall second of a batch of drop-folder jobs, 2 workers
  against 1.
Ratios are what to compare (this machine is shared). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import soxr  # noqa: E402

from bench.common import Daemon, percentile, sentences, summary_ms  # noqa: E402
from bench.dropfolder import drop, wait_record  # noqa: E402
from bench.peer import run_piper  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402

LONG_JOB = " ".join(sentences(24))  # about 200 words
LONG_SENTENCE = ("When the evening finally came, after a long and very quiet day on the road, "
                 "the tired travellers reached the old inn at the edge of the village and asked "
                 "for bread, soup and a warm room for the night.")
RATE = 22050


@contextmanager
def daemon(**sections: dict[str, Any]) -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        running = Daemon(Path(root), log={"level": "info"}, **sections)
        running.start()
        try:
            with Client(running.endpoint, timeout_s=120) as client:
                wait_all_idle(client)
            yield running
        finally:
            running.stop()


def wait_all_idle(client: Client) -> None:
    deadline = time.monotonic() + 120
    while not all(w["state"] == "idle" for w in client.stats()["workers"]):
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not load")
        time.sleep(0.1)


def streamed(client: Client, text: str) -> tuple[float, bytes]:
    """(seconds to the first audio, all the audio as s16le)."""
    started = time.perf_counter()
    first = 0.0
    audio = []
    with client.stream(text) as stream:
        for pcm in stream:
            first = first or time.perf_counter() - started
            audio.append(pcm)
    return first, b"".join(audio)


def first_audio(endpoint: str, texts: list[str], clients: int) -> list[float]:
    firsts: list[float] = []
    lock = threading.Lock()

    def run(share: list[str]) -> None:
        with Client(endpoint, timeout_s=120) as client:
            for text in share:
                first, _audio = streamed(client, text)
                with lock:
                    firsts.append(first)

    threads = [threading.Thread(target=run, args=(texts[n::clients],)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return firsts


def clients_figures(texts: list[str], per_device: int | None) -> dict[str, Any]:
    """per_device None: the daemon's default."""
    with daemon(worker={"per_device": per_device}) as running:
        first_audio(running.endpoint, texts[:2], 1)  # warm every path once
        alone = first_audio(running.endpoint, texts, 1)
        four = first_audio(running.endpoint, texts, 4)
    return {"alone": summary_ms(alone), "4_clients": summary_ms(four),
            "slowdown_4_clients_p50": round(percentile(four, 0.5) / percentile(alone, 0.5), 2)}


def behind_long(rounds: int, per_device: int | None) -> dict[str, Any]:
    short = "Is the kitchen light on?"
    with daemon(worker={"per_device": per_device}) as running, \
            Client(running.endpoint, timeout_s=120,
                   admin_token=running.admin_token()) as client:  # sees the dropped job
        workers = len(client.stats()["workers"])
        alone = [streamed(client, short)[0] for _ in range(rounds)]
        behind = []
        for n in range(rounds):
            drop(running, f"long-{n}.txt", LONG_JOB)
            while not client.stats()["running"]:
                time.sleep(0.01)
            behind.append(streamed(client, short)[0])
            wait_record(running, f"long-{n}.txt")
    return {"workers": workers, "alone": summary_ms(alone),
            "behind_long_job": summary_ms(behind),
            "ratio_p50": round(percentile(behind, 0.5) / percentile(alone, 0.5), 2)}


_recognizer: Any = None


def word_error_rate(pcm: bytes, text: str) -> float | None:
    """WER of pocketsphinx's transcript of the audio (None without pocketsphinx)."""
    global _recognizer  # noqa: PLW0603 - one decoder per run
    try:
        from pocketsphinx import Decoder  # noqa: PLC0415 - bench extra
    except ImportError:
        return None
    if _recognizer is None:
        _recognizer = Decoder(samprate=16000, loglevel="FATAL")
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    audio16k = (soxr.resample(audio, RATE, 16000) * 32767).astype("<i2").tobytes()
    _recognizer.start_utt()
    _recognizer.process_raw(audio16k, full_utt=True)
    _recognizer.end_utt()
    heard = (_recognizer.hyp().hypstr if _recognizer.hyp() else "").lower().split()
    said = re.sub(r"[^a-z' ]", " ", text.lower()).split()
    return _edit_distance(said, heard) / len(said)


def _edit_distance(said: list[str], heard: list[str]) -> int:
    row = list(range(len(heard) + 1))
    for n, word in enumerate(said, 1):
        previous, row[0] = row[0], n
        for m, other in enumerate(heard, 1):
            previous, row[m] = row[m], min(row[m] + 1, row[m - 1] + 1,
                                           previous + (word != other))
    return row[-1]


def first_clause(rounds: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for words in (5, 0):
        with daemon(scheduling={"first_segment_words": words}) as running, \
                Client(running.endpoint, timeout_s=120) as client:
            streamed(client, LONG_SENTENCE)
            runs = [streamed(client, LONG_SENTENCE) for _ in range(rounds)]
        errors = [word_error_rate(pcm, LONG_SENTENCE) for _first, pcm in runs]
        figures[f"first_segment_words_{words}"] = {
            "first_audio": summary_ms([first for first, _pcm in runs]),
            "audio_s": round(len(runs[0][1]) / 2 / RATE, 2),
            "asr_word_error_rate": None if None in errors else
            round(sum(e for e in errors if e is not None) / len(errors), 3)}
    cut, whole = (figures[f"first_segment_words_{w}"]["first_audio"]["p50_ms"] for w in (5, 0))
    figures["ratio_p50_cut_over_whole"] = round(cut / whole, 2)
    return figures


def throughput(texts: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for workers in (1, 2):
        with daemon(worker={"per_device": workers}) as running:
            started = time.perf_counter()
            for n, text in enumerate(texts):
                drop(running, f"t-{n}.txt", text)
            audio_s = sum(wait_record(running, f"t-{n}.txt")["audio_s"]
                          for n in range(len(texts)))
            wall = time.perf_counter() - started
        figures[f"{workers}_workers"] = {"audio_s_per_s": round(audio_s / wall, 3),
                                         "wall_s": round(wall, 2)}
    figures["ratio_2_over_1"] = round(figures["2_workers"]["audio_s_per_s"]
                                      / figures["1_workers"]["audio_s_per_s"], 3)
    return figures


PARTS: dict[str, Callable[[list[str], int], dict[str, Any]]] = {
    "clients": lambda texts, _rounds: {
        "cosyvoiced_1_worker": clients_figures(texts, 1),
        "cosyvoiced_2_workers": clients_figures(texts, 2),
        "cosyvoiced_default": clients_figures(texts, None),
        "piper_http_server": run_piper(texts)},
    "behind_long": lambda _texts, rounds: {
        "1_worker": behind_long(rounds, 1), "2_workers": behind_long(rounds, 2),
        "default": behind_long(rounds, None)},
    "first_clause": lambda _texts, rounds: first_clause(rounds),
    "throughput": lambda texts, _rounds: throughput(sentences(4 * len(texts))),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated, of: " + ", ".join(PARTS))
    args = parser.parse_args()
    texts = sentences(args.sentences)
    report: dict[str, Any] = {"benchmark": "pool", "cpus": os.cpu_count(),
                              "sentences": len(texts)}
    for part in args.parts.split(","):
        report[part] = PARTS[part](texts, args.rounds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
