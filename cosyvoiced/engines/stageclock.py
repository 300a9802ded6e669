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


class Span:
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
class StageTally:
    """What one segment's calls have measured so far (the LLM thread writes its part). A
    segment whose text upstream cuts into pieces makes one LLM call per piece: each adds its
    own prefill and its own first-to-last-token time."""

    prefill_ms: float = 0.0
    tokens: int = 0
    decode_ms: float = 0.0
    flow: list[Span] = field(default_factory=list)
    hift: list[Span] = field(default_factory=list)

    def token(self, started: float, previous: float | None, now: float) -> None:
        """A token of an LLM call that started at `started`, drawn at `now`; `previous`:
        when the call's token before it came (None for its first)."""
        if previous is None:
            self.prefill_ms += (now - started) * _MS
        else:
            self.decode_ms += (now - previous) * _MS
        self.tokens += 1

    def read(self) -> SegmentStages | None:
        """The segment's stages; None if its LLM drew no token (it failed or was cut)."""
        if self.tokens == 0:
            return None
        return SegmentStages(self.prefill_ms, self.tokens, self.decode_ms,
                             tuple(span.ms() for span in self.flow),
                             tuple(span.ms() for span in self.hift))


class StageClock:
    """Times the LLM, flow and HiFT calls of one loaded upstream model (its `.model`)."""

    def __init__(self, model: Any) -> None:
        self._cuda = torch.cuda.is_available()
        self._request = StageTally()
        model.llm.inference = self._timed_tokens(model.llm.inference)
        model.flow.inference = self._timed_call(model.flow.inference, "flow")
        model.hift.inference = self._timed_call(model.hift.inference, "hift")

    def reset(self) -> None:
        """A new request starts: what follows is measured apart from what came before."""
        self._request = StageTally()

    def read(self) -> SegmentStages | None:
        """The request's stages; None if its LLM drew no token (it failed or was cut)."""
        return self._request.read()

    def _timed_tokens(self, inference: Callable[..., Iterator[Any]]
                      ) -> Callable[..., Iterator[Any]]:
        @functools.wraps(inference)
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            return self._count(self._request, inference(*args, **kwargs))
        return timed

    @staticmethod
    def _count(request: StageTally, tokens: Iterator[Any]) -> Iterator[Any]:
        """`tokens` as they come, timed into `request` (kept as it was at the call: an LLM
        thread that outlives its request writes nothing into the next one's)."""
        started = time.perf_counter()
        previous: float | None = None
        for token in tokens:
            now = time.perf_counter()
            request.token(started, previous, now)
            previous = now
            yield token

    def _timed_call(self, call: Callable[..., Any], stage: str) -> Callable[..., Any]:
        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            span = Span(self._cuda)
            getattr(self._request, stage).append(span)
            span.start()
            try:
                return call(*args, **kwargs)
            finally:
                span.end()
        return timed
