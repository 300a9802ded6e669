"""The batched CosyVoice2 decoder (cosyvoiced/engines/batched.py): N streams on one model
copy against one stream, in one process, on a full-size CosyVoice2-0.5B with random weights.

Every text gets the same fixed number of speech tokens (tests/cosyvoice/full_size.py; the
decoder is given the same ratio), so runs compare. For each N, the N streams start at the
same step; the report gives speech tokens per second over all streams, audio seconds per
wall second, first-chunk latency (p50, p95: from `add` to the stream's first audio chunk)
and the ratios against N = 1. One warm-up run comes first. Prints JSON.

    COSYVOICE_REPO=/path/to/CosyVoice .venv-cosyvoice/bin/python bench/batched.py \\
        --model-dir /some/dir/CosyVoice2-0.5B [--streams 1,4] [--chars 30]

--model-dir keeps the built model (about 4.3 GB) for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # bench/zmq.py would shadow pyzmq
REPO = os.environ.get("COSYVOICE_REPO", "")
if REPO:
    sys.path[:0] = [REPO, str(Path(REPO) / "third_party" / "Matcha-TTS")]

import torch  # noqa: E402

from bench.common import percentile  # noqa: E402
from cosyvoiced.engines.batched import BatchedDecoder, StreamRequest  # noqa: E402
from tests.cosyvoice import full_size  # noqa: E402

VOICE = "English Female"
# full_v2.yaml's fixed speech tokens per text token (tests/cosyvoice/fixed_length.py)
TOKENS_PER_TEXT_TOKEN = 1.6667


def _load(model_dir: Path) -> Any:
    if not (model_dir / "llm.pt").exists():
        full_size.build(model_dir, 2)
    from cosyvoice.cli.cosyvoice import CosyVoice2  # noqa: PLC0415 - from COSYVOICE_REPO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CosyVoice2(str(model_dir))


def _text(chars: int, index: int) -> str:
    words = f"Stream {index} says a few plain words for the benchmark, again and again. " * 20
    return words[:chars]


def _time_stages(decoder: BatchedDecoder) -> dict[str, float]:
    """Seconds spent in the language model (prefill, decode, sampling) and in token to
    wave, by timing the decoder's own stage methods on this instance."""
    spent = {"llm": 0.0, "token2wav": 0.0}
    for stage, names in (("llm", ("_admit", "_decode_and_sample")), ("token2wav", ("_vocode",))):
        for name in names:
            method = getattr(decoder, name)

            def timed(*args: Any, _method: Any = method, _stage: str = stage) -> Any:
                began = time.perf_counter()
                try:
                    return _method(*args)
                finally:
                    spent[_stage] += time.perf_counter() - began

            setattr(decoder, name, timed)
    return spent


def measure(model: Any, inputs: list[dict[str, Any]], streams: int,
            sample_rate: int) -> dict[str, Any]:
    """N streams added at once; their tokens, audio and first-chunk latencies."""
    decoder = BatchedDecoder(model, max_streams=streams,
                             min_token_text_ratio=TOKENS_PER_TEXT_TOKEN,
                             max_token_text_ratio=TOKENS_PER_TEXT_TOKEN)
    spent = _time_stages(decoder)
    started = time.perf_counter()
    ids = [decoder.add(StreamRequest(inputs[index % len(inputs)], seed=index))
           for index in range(streams)]
    first: dict[int, float] = {}
    tokens = samples = 0
    while not decoder.idle:
        for event in decoder.step():
            if event.error is not None:
                raise event.error
            if event.audio is not None:
                first.setdefault(event.stream_id, time.perf_counter() - started)
                samples += event.audio.shape[1]
            tokens += len(event.speech_tokens)
    wall = time.perf_counter() - started
    latencies = [first[stream_id] * 1000 for stream_id in ids]
    return {"streams": streams, "wall_s": round(wall, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "audio_s_per_wall_s": round(samples / sample_rate / wall, 4),
            "first_chunk_ms_p50": round(statistics.median(latencies), 1),
            "first_chunk_ms_p95": round(percentile(latencies, 0.95), 1),
            "llm_s": round(spent["llm"], 3), "token2wav_s": round(spent["token2wav"], 3),
            "llm_tokens_per_s": round(tokens / spent["llm"], 2),
            "kv_bytes_reserved": decoder.kv_bytes_reserved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--chars", type=int, default=30,
                        help="characters (= text tokens) per text: 30 make 50 speech tokens")
    args = parser.parse_args()
    if not REPO:
        parser.error("CosyVoice2 code is only in an upstream checkout: set COSYVOICE_REPO")
    cosyvoice = _load(args.model_dir)
    inputs = [cosyvoice.frontend.frontend_sft(_text(args.chars, index), VOICE)
              for index in range(8)]
    counts = [int(count) for count in args.streams.split(",")]
    measure(cosyvoice.model, inputs, 1, cosyvoice.sample_rate)  # warm-up
    results = [measure(cosyvoice.model, inputs, count, cosyvoice.sample_rate)
               for count in counts]
    base = results[0]
    for result in results:
        result["tokens_per_s_vs_first"] = round(result["tokens_per_s"] / base["tokens_per_s"], 2)
        result["audio_vs_first"] = round(result["audio_s_per_wall_s"]
                                         / base["audio_s_per_wall_s"], 2)
        result["first_chunk_p50_vs_first"] = round(result["first_chunk_ms_p50"]
                                                   / base["first_chunk_ms_p50"], 2)
    print(json.dumps({"device": str(cosyvoice.model.device),
                      "threads": torch.get_num_threads(), "chars": args.chars,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
