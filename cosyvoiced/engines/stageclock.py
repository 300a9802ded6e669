"""Stage timings of upstream CosyVoice's model calls, taken around them, not inside them.

Upstream's per-request code calls three methods of the loaded model: `llm.inference` (a
token generator, run in upstream's LLM thread), `flow.inference` and `hift.inference`
(once per chunk, in the consumer's thread). `StageClock` replaces those bound methods on
this model's own objects with timed ones; upstream's code is neither copied nor changed,
and every version (v1 of 2024, v2, v3, vLLM, TensorRT) goes through them.

On CUDA the flow and HiFT calls only queue kernels: their times are read from CUDA events
once the request has ended (upstream copies each chunk to the host, which waits for them),
so timing adds no synchronisation. The LLM's steps are timed on the wall clock: each step's
sampled token comes to the host anyway.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from cosyvoiced.stages import SegmentStages

_MS = 1000.0


class _Span:
    """One call's duration: wall clock on the CPU, a pair of CUDA events on a GPU."""

    def __init__(self, cuda: bool) -> None:
        self._events = (torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True)) if cuda else None
        self._started = self._ended = 0.0

    def start(self) -> None:
        if self._events is not None:
            self._events[0].record()
        self._started = time.perf_counter()

    def end(self) -> None:
        if self._events is not None:
            self._events[1].record()
        self._ended = time.perf_counter()

    def ms(self) -> float:
        if self._events is None:
            return (self._ended - self._started) * _MS
        self._events[1].synchronize()
        return float(self._events[0].elapsed_time(self._events[1]))


@dataclass
class _Request:
    """What one request's calls have measured so far (the LLM thread writes its part)."""

    prefill_ms: float = 0.0
    tokens: int = 0
    decode_ms: float = 0.0
    flow: list[_Span] = field(default_factory=list)
    hift: list[_Span] = field(default_factory=list)


class StageClock:
    """Times the LLM, flow and HiFT calls of one loaded upstream model (its `.model`)."""

    def __init__(self, model: Any) -> None:
        self._cuda = torch.cuda.is_available()
        self._request = _Request()
        model.llm.inference = self._timed_tokens(model.llm.inference)
        model.flow.inference = self._timed_call(model.flow.inference, "flow")
        model.hift.inference = self._timed_call(model.hift.inference, "hift")

    def reset(self) -> None:
        """A new request starts: what follows is measured apart from what came before."""
        self._request = _Request()

    def read(self) -> SegmentStages | None:
        """The request's stages; None if its LLM drew no token (it failed or was cut)."""
        request = self._request
        if request.tokens == 0:
            return None
        return SegmentStages(request.prefill_ms, request.tokens, request.decode_ms,
                             tuple(span.ms() for span in request.flow),
                             tuple(span.ms() for span in request.hift))

    def _timed_tokens(self, inference: Callable[..., Iterator[Any]]
                      ) -> Callable[..., Iterator[Any]]:
        @functools.wraps(inference)
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            return self._count(self._request, inference(*args, **kwargs))
        return timed

    @staticmethod
    def _count(request: _Request, tokens: Iterator[Any]) -> Iterator[Any]:
        """`tokens` as they come, timed into `request` (kept as it was at the call: an LLM
        thread that outlives its request writes nothing into the next one's)."""
        started = time.perf_counter()
        first = 0.0
        for token in tokens:
            now = time.perf_counter()
            if request.tokens == 0:
                first = now
                request.prefill_ms = (now - started) * _MS
            request.tokens += 1
            request.decode_ms = (now - first) * _MS
            yield token

    def _timed_call(self, call: Callable[..., Any], stage: str) -> Callable[..., Any]:
        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            span = _Span(self._cuda)
            getattr(self._request, stage).append(span)
            span.start()
            try:
                return call(*args, **kwargs)
            finally:
                span.end()
        return timed
