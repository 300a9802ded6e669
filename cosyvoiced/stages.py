"""Where a segment's synthesis time went, stage by stage, so that an operator can tell
"the LLM is the bottleneck" from the job record, the `job` log line or /metrics, without
a profiler.

An engine that has stages (CosyVoice: the LLM's prefill and token decoding, the flow
model, the HiFT vocoder) measures one `SegmentStages` per segment; the worker adds the
segment's first-chunk time and sends it with `SegmentFinished`. The job book sums a job's
segments into its `timings` (`job_timings`) and logs each segment (`SegmentStages.summary`).
An engine without stages (Piper) reports none, and none of these keys appear.

Upstream runs its LLM in a thread of its own while the consumer turns earlier tokens into
audio, so the stages overlap: they do not add up to `synth_s`.

Pure data and arithmetic: the supervisor imports this module, never an engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_DIGITS = 3  # of milliseconds in records and logs: a microsecond


@dataclass(frozen=True)
class SegmentStages:
    """One segment's stage timings, in milliseconds of wall time."""

    prefill_ms: float  # the LLM call's start to its first token (the prompt's forward pass)
    tokens: int  # speech tokens the LLM drew
    decode_ms: float  # its first token to its last: `tokens - 1` decoding steps
    flow_ms: tuple[float, ...] = ()  # the flow model (tokens to mel), one per chunk
    hift_ms: tuple[float, ...] = ()  # the HiFT vocoder (mel to samples), one per chunk
    first_chunk_ms: float = 0.0  # the segment's start to its first chunk, as the worker saw

    @property
    def ms_per_token(self) -> float:
        """Mean time of one decoding step (the prefill's first token left out)."""
        return self.decode_ms / (self.tokens - 1) if self.tokens > 1 else 0.0

    def summary(self) -> dict[str, object]:
        """The segment's figures for the `job` log line."""
        return {"prefill_ms": round(self.prefill_ms, _DIGITS), "tokens": self.tokens,
                "ms_per_token": round(self.ms_per_token, _DIGITS),
                "flow_ms": [round(ms, _DIGITS) for ms in self.flow_ms],
                "hift_ms": [round(ms, _DIGITS) for ms in self.hift_ms],
                "first_chunk_ms": round(self.first_chunk_ms, _DIGITS)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def job_timings(stages: Sequence[SegmentStages]) -> dict[str, float]:
    """A job's stage totals for its record's `timings`; empty when it has no stages.

    `llm_ms_per_token` weighs every decoding step alike, whatever its segment; the
    per-chunk means weigh every chunk alike."""
    if not stages:
        return {}
    steps = sum(max(0, segment.tokens - 1) for segment in stages)
    decode_ms = sum(segment.decode_ms for segment in stages)
    flow = [ms for segment in stages for ms in segment.flow_ms]
    hift = [ms for segment in stages for ms in segment.hift_ms]
    figures = {
        "llm_prefill_ms": sum(segment.prefill_ms for segment in stages),
        "llm_tokens": float(sum(segment.tokens for segment in stages)),
        "llm_decode_ms": decode_ms,
        "llm_ms_per_token": decode_ms / steps if steps else 0.0,
        "chunks": float(len(flow)),
        "flow_ms": sum(flow),
        "flow_ms_per_chunk": _mean(flow),
        "hift_ms": sum(hift),
        "hift_ms_per_chunk": _mean(hift),
    }
    return {name: round(value, _DIGITS) for name, value in figures.items()}
