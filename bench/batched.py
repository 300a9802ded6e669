"""The batched CosyVoice2 decoder (cosyvoiced/engines/batched.py): N streams on one model
copy against one stream, in one process, on a full-size CosyVoice2-0.5B with random weights.

Every text gets the same fixed number of speech tokens (tests/cosyvoice/full_size.py; the
decoder is given the same ratio), so runs compare. For each N, the N streams start at the
same step; the report gives speech tokens per second over all streams (per wall second,
per second of the language model with its prefill, and per second of its decoding steps
alone), audio seconds per wall second, first-chunk latency (p50, p95: from `add` to the
stream's first audio chunk) and the ratios against N = 1. One warm-up run comes first. Prints JSON.

    COSYVOICE_REPO=/path/to/CosyVoice .venv-cosyvoice/bin/python bench/batched.py \\
        --model-dir /some/dir/CosyVoice2-0.5B [--streams 1,4] [--chars 30] [--rounds 3] \\
        [--bf16]

--rounds R has each client speak R texts back to back (of 1, 1.5 and 2 times --chars, so
the clients fall out of step and streams join while others are playing); each N is then
also measured with a job's first audio not going first (`first_audio_patience` 0), side by
side, with the ratios of the default to that.

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
    """Seconds spent in the language model's prefill, its decoding steps (with sampling)
    and token to wave, by timing the decoder's own stage methods on this instance."""
    spent = {"prefill": 0.0, "decode": 0.0, "token2wav": 0.0}
    for stage, name in (("prefill", "_admit"), ("decode", "_decode_and_sample"),
                        ("token2wav", "_vocode")):
        method = getattr(decoder, name)

        def timed(*args: Any, _method: Any = method, _stage: str = stage) -> Any:
            began = time.perf_counter()
            try:
                return _method(*args)
            finally:
                spent[_stage] += time.perf_counter() - began

        setattr(decoder, name, timed)
    return spent


def measure(model: Any, inputs: list[dict[str, Any]], streams: int, sample_rate: int,
            *, rounds: int = 1, patience: int | None = None,
            cpu_bf16: bool = False) -> dict[str, Any]:
    """N clients at once, each speaking `rounds` texts back to back (its next stream added
    when its last one ends); their tokens, audio and first-chunk latencies (from each
    stream's `add` to its first audio chunk). `patience`: the decoder's
    `first_audio_patience` (0: a job's first audio does not go first)."""
    decoder = BatchedDecoder(model, max_streams=streams,
                             min_token_text_ratio=TOKENS_PER_TEXT_TOKEN,
                             max_token_text_ratio=TOKENS_PER_TEXT_TOKEN,
                             first_audio_patience=patience, cpu_bf16=cpu_bf16)
    spent = _time_stages(decoder)
    started = time.perf_counter()
    added: dict[int, tuple[int, float]] = {}  # stream id: its client, when it was added
    spoken = [0] * streams

    def add(client: int) -> None:
        text = inputs[(client + spoken[client]) % len(inputs)]
        added[decoder.add(StreamRequest(text, seed=client))] = (client, time.perf_counter())

    for client in range(streams):
        add(client)
    latencies: list[float] = []
    heard: set[int] = set()
    tokens = samples = 0
    while not decoder.idle:
        for event in decoder.step():
            if event.error is not None:
                raise event.error
            client, since = added[event.stream_id]
            if event.audio is not None:
                if event.stream_id not in heard:
                    heard.add(event.stream_id)
                    latencies.append((time.perf_counter() - since) * 1000)
                samples += event.audio.shape[1]
            tokens += len(event.speech_tokens)
            if event.done:
                spoken[client] += 1
                if spoken[client] < rounds:
                    add(client)
    wall = time.perf_counter() - started
    return {"streams": streams, "rounds": rounds, "wall_s": round(wall, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "audio_s_per_wall_s": round(samples / sample_rate / wall, 4),
            "first_chunk_ms_p50": round(statistics.median(latencies), 1),
            "first_chunk_ms_p95": round(percentile(latencies, 0.95), 1),
            "prefill_s": round(spent["prefill"], 3), "decode_s": round(spent["decode"], 3),
            "token2wav_s": round(spent["token2wav"], 3),
            "llm_tokens_per_s": round(tokens / (spent["prefill"] + spent["decode"]), 2),
            "decode_tokens_per_s": round(tokens / spent["decode"], 2),
            "kv_bytes_reserved": decoder.kv_bytes_reserved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--chars", type=int, default=30,
                        help="characters (= text tokens) per text: 30 make 50 speech tokens")
    parser.add_argument("--rounds", type=int, default=1,
                        help="texts each client speaks back to back; above 1, each N is "
                        "measured with and without a job's first audio going first")
    parser.add_argument("--bf16", action="store_true",
                        help="then every N again with engine.cosyvoice.cpu_bf16, and the "
                        "ratios to float32 (and to float32's first N)")
    args = parser.parse_args()
    if not REPO:
        parser.error("CosyVoice2 code is only in an upstream checkout: set COSYVOICE_REPO")
    cosyvoice = _load(args.model_dir)
    # Back to back, texts of 1, 1.5 and 2 times --chars keep the clients out of step.
    lengths = [args.chars * (2 + index % 3) // 2 if args.rounds > 1 else args.chars
               for index in range(8)]
    inputs = [cosyvoice.frontend.frontend_sft(_text(length, index), VOICE)
              for index, length in enumerate(lengths)]
    counts = [int(count) for count in args.streams.split(",")]
    rate = cosyvoice.sample_rate
    measure(cosyvoice.model, inputs, 1, rate)  # warm-up
    results = [measure(cosyvoice.model, inputs, count, rate, rounds=args.rounds)
               for count in counts]
    base = results[0]
    for result in results:
        for figure in ("tokens_per_s", "llm_tokens_per_s", "decode_tokens_per_s"):
            result[f"{figure}_vs_first"] = round(result[figure] / base[figure], 2)
        result["audio_vs_first"] = round(result["audio_s_per_wall_s"]
                                         / base["audio_s_per_wall_s"], 2)
        result["first_chunk_p50_vs_first"] = round(result["first_chunk_ms_p50"]
                                                   / base["first_chunk_ms_p50"], 2)
        if args.rounds > 1:
            result["first_audio_not_first"] = _against(
                result, measure(cosyvoice.model, inputs, result["streams"], rate,
                                rounds=args.rounds, patience=0))
    report: dict[str, Any] = {"device": str(cosyvoice.model.device),
                              "threads": torch.get_num_threads(), "chars": args.chars,
                              "results": results}
    if args.bf16:  # after float32: the conversion is in place, for good
        report["cpu_bf16"] = [_bf16_against(
            measure(cosyvoice.model, inputs, result["streams"], rate, rounds=args.rounds,
                    cpu_bf16=True), result, base) for result in results]
    print(json.dumps(report, indent=2))


def _bf16_against(chosen: dict[str, Any], fp32: dict[str, Any],
                  fp32_base: dict[str, Any]) -> dict[str, Any]:
    """A cpu_bf16 result, with its ratios to float32 at the same N and at the first N."""
    ratios = {}
    for figure in ("tokens_per_s", "decode_tokens_per_s", "audio_s_per_wall_s",
                   "first_chunk_ms_p50"):
        ratios[f"{figure}_vs_fp32"] = round(chosen[figure] / fp32[figure], 2)
        ratios[f"{figure}_vs_fp32_first"] = round(chosen[figure] / fp32_base[figure], 2)
    return {**chosen, **ratios}


def _against(chosen: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`other`'s figures, and the chosen way's ratios to them."""
    return {**other, "first_chunk_p50_ratio": round(
                chosen["first_chunk_ms_p50"] / other["first_chunk_ms_p50"], 2),
            "first_chunk_p95_ratio": round(
                chosen["first_chunk_ms_p95"] / other["first_chunk_ms_p95"], 2),
            "audio_ratio": round(chosen["audio_s_per_wall_s"]
                                 / other["audio_s_per_wall_s"], 2)}


if __name__ == "__main__":
    main()
