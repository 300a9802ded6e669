"""The direct side of bench/cosyvoice.py: upstream's own generator, called in a process
prepared as the daemon's worker is, so that the two sides differ only by the daemon.

It reads the daemon's own config file and does what a worker does before its first job,
with the worker's own functions: `worker.place` (the device and CPU threads the pool would
give slot 0), `load_engine` (the same load options, fp16 included), `worker.warm_up`. Then
for each text it is sent it calls upstream's `inference_sft(stream=True)` itself, with only
the care every caller needs (`token_hop_len` put back, upstream PR #1849; CosyVoice3's
system prompt), and answers with the run's times and its stage timings, measured by the
same clock as the daemon's (engines/stageclock.py).

    python -m bench.cosyvoice_direct CONFIG    # JSON lines: texts in on stdin, runs out

Torch is imported only after `worker.place`, as in a worker: this module imports nothing
that imports it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from cosyvoiced import config as settings
from cosyvoiced import placement, stages, worker
from cosyvoiced.engines import load_engine


def _reply(pipe: IO[str], message: dict[str, Any]) -> None:
    pipe.write(json.dumps(message) + "\n")
    pipe.flush()


def _run(engine: Any, text: str, voice: str, hop: int | None) -> dict[str, Any]:
    """One streamed upstream call, timed as bench/cosyvoice.py's client times the daemon."""
    import torch  # noqa: PLC0415 - loaded by then; see the module's docstring

    from cosyvoiced.engines import cosyvoice as adapter  # noqa: PLC0415 - imports torch

    model = engine.upstream
    if hop is not None:
        model.model.token_hop_len = hop
    if engine.version == 3:
        text = adapter.V3_SYSTEM_PROMPT + text
    engine.clock.reset()
    started = time.perf_counter()
    first, samples = 0.0, 0
    with torch.inference_mode():
        for output in model.inference_sft(text, voice, stream=True):
            first = first or time.perf_counter() - started
            samples += output["tts_speech"].shape[1]
    total = time.perf_counter() - started
    measured = engine.clock.read()
    return {"first_s": first, "total_s": total, "samples": samples,
            "sample_rate": engine.sample_rate(voice),
            "stages": stages.job_timings([measured] if measured is not None else [])}


def main() -> int:
    loaded = settings.load(sys.argv[1])
    worker.place(placement.plan(loaded.worker.devices, loaded.worker.per_device,
                                placement.usable_cores(), loaded.engine.piper.threads)[0])
    # Upstream prints what it speaks: only the replies may reach the pipe on stdout.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    started = time.perf_counter()
    engine: Any = load_engine(loaded.engine)
    hop = getattr(engine.upstream.model, "token_hop_len", None)  # before a stream grows it
    load_s = time.perf_counter() - started
    worker.warm_up(engine)
    _reply(replies, {"load_s": round(load_s, 2),
                     "warmup_s": round(time.perf_counter() - started - load_s, 2)})
    for line in sys.stdin:
        request = json.loads(line)
        _reply(replies, _run(engine, request["text"], request["voice"], hop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
