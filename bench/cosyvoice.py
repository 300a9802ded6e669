"""Daemon overhead on the cosyvoice engine: upstream's generator called directly in this
process vs the same texts streamed through the daemon over ZeroMQ, alternating, one run.

Runs in the CosyVoice lane's virtualenv (`make test-cosyvoice` builds it) on the tiny random
model; its absolute speed means nothing, the ratios are the figures. Prints JSON.

    .venv-cosyvoice/bin/python bench/cosyvoice.py [--count 12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # bench/zmq.py would shadow pyzmq

import torch  # noqa: E402

from bench.common import sentences, summary_ms  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402
from tests.cosyvoice import tiny_model  # noqa: E402
from tests.cosyvoice.conftest import cosyvoice_daemon  # noqa: E402

VOICE = "English Female"


def direct(model: Any, text: str) -> tuple[float, float, int]:
    """(first chunk s, total s, samples) for one streamed call in this process."""
    started = time.perf_counter()
    first, samples = 0.0, 0
    with torch.inference_mode():
        for output in model.inference_sft(text, VOICE, stream=True):
            first = first or time.perf_counter() - started
            samples += output["tts_speech"].shape[1]
    return first, time.perf_counter() - started, samples


def daemon(client: Client, text: str) -> tuple[float, float, int]:
    started = time.perf_counter()
    first, samples = 0.0, 0
    with client.stream(text, voice=VOICE) as stream:
        for pcm in stream:
            first = first or time.perf_counter() - started
            samples += len(pcm) // 2
    return first, time.perf_counter() - started, samples


def run(count: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-cosyvoice-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = tiny_model.build(root / "CosyVoice-300M")
        from cosyvoice.cli.cosyvoice import CosyVoice  # noqa: PLC0415 - after the build

        model = CosyVoice(str(model_dir), load_jit=False)
    served = cosyvoice_daemon(root / "daemon", model_dir)
    served.start()
    texts = sentences(count)
    results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "daemon": []}
    try:
        with Client(served.endpoint, timeout_s=120) as client:
            direct(model, texts[0])  # warm both before measuring
            daemon(client, texts[0])
            for text in texts:
                results["direct"].append(direct(model, text))
                results["daemon"].append(daemon(client, text))
    finally:
        served.stop()
    return _report(results)


def _report(results: dict[str, list[tuple[float, float, int]]]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name, runs in results.items():
        audio_s = sum(samples for _, _, samples in runs) / 22050
        wall_s = sum(total for _, total, _ in runs)
        report[name] = {"first_chunk": summary_ms([first for first, _, _ in runs]),
                        "per_job": summary_ms([total for _, total, _ in runs]),
                        "seconds_per_audio_second": round(wall_s / audio_s, 4)}
    report["ratios"] = {
        "first_chunk_p50": round(report["daemon"]["first_chunk"]["p50_ms"]
                                 / report["direct"]["first_chunk"]["p50_ms"], 3),
        # Per audio second: the random model's lengths differ from call to call.
        "seconds_per_audio_second": round(report["daemon"]["seconds_per_audio_second"]
                                          / report["direct"]["seconds_per_audio_second"], 3),
    }
    report["overhead_per_job_ms_mean"] = round(report["daemon"]["per_job"]["mean_ms"]
                                               - report["direct"]["per_job"]["mean_ms"], 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12)
    with contextlib.redirect_stdout(sys.stderr):  # upstream prints each text it speaks
        report = run(parser.parse_args().count)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
