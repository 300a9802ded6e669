"""Daemon overhead on the cosyvoice engine: upstream's generator called directly in this
process vs the same texts streamed through the daemon over ZeroMQ, alternating, one run.

Runs in the CosyVoice lane's virtualenv (`make test-cosyvoice` builds it) on the tiny random
model; its absolute speed means nothing, the ratios are the figures. Prints JSON.

    .venv-cosyvoice/bin/python bench/cosyvoice.py [--count 12]
    COSYVOICE_REPO=/path/to/CosyVoice .venv-cosyvoice/bin/python bench/cosyvoice.py --version 2

The direct caller is given the care the daemon takes: `token_hop_len` put back before each
call (upstream grows it during a stream and keeps it), CosyVoice3's system prompt in front.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
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
from cosyvoiced.engines import cosyvoice as engine  # noqa: E402
from tests.cosyvoice import tiny_model  # noqa: E402
from tests.cosyvoice.conftest import MODEL_NAMES, cosyvoice_daemon  # noqa: E402

MODEL_CLASSES = dict(engine.MODEL_CLASSES.values())  # version -> upstream class name

VOICE = "English Female"


def direct(model: Any, text: str, hop: int | None) -> tuple[float, float, int]:
    """(first chunk s, total s, samples) for one streamed call in this process."""
    if hop is not None:
        model.model.token_hop_len = hop
    if type(model).__name__ == MODEL_CLASSES[3]:
        text = engine.V3_SYSTEM_PROMPT + text
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


def run(count: int, version: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-cosyvoice-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = tiny_model.build(root / MODEL_NAMES[version], version)
        from cosyvoice.cli import cosyvoice  # noqa: PLC0415 - after the build

        model_class = getattr(cosyvoice, MODEL_CLASSES[version])
        # The package's CosyVoice loads TorchScript parts by default; the tiny model has none.
        no_jit = {"load_jit": False} if "load_jit" in inspect.signature(model_class).parameters \
            else {}
        model = model_class(str(model_dir), **no_jit)
    hop = getattr(model.model, "token_hop_len", None)
    # The package (upstream of 2024) has no sample_rate attribute yet.
    rate = int(getattr(model, "sample_rate", 0) or model.model.hift.sampling_rate)
    served = cosyvoice_daemon(root / "daemon", model_dir)
    served.start()
    texts = sentences(count)
    results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "daemon": []}
    try:
        with Client(served.endpoint, timeout_s=120) as client:
            direct(model, texts[0], hop)  # warm both before measuring
            daemon(client, texts[0])
            for text in texts:
                results["direct"].append(direct(model, text, hop))
                results["daemon"].append(daemon(client, text))
    finally:
        served.stop()
    return {"model": MODEL_CLASSES[version], "sample_rate": rate} | _report(results, rate)


def _report(results: dict[str, list[tuple[float, float, int]]], rate: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name, runs in results.items():
        audio_s = sum(samples for _, _, samples in runs) / rate
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
    parser.add_argument("--version", type=int, choices=sorted(MODEL_CLASSES), default=1,
                        help="2 and 3 need COSYVOICE_REPO (an upstream checkout)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # upstream prints each text it speaks
        report = run(args.count, args.version)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
