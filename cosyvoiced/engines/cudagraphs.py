"""The batched decoding step replayed from CUDA graphs (`engine.cosyvoice.cuda_graphs`).

A graph replays the kernels it captured, with fixed shapes at fixed addresses, without the
Python and launch work of each of them: a decoding step of Qwen2-0.5B is a few hundred small
kernels, which at batch 1 leave a GPU mostly idle. The step's own shapes change at every
step (a prefix one token longer, streams joining and leaving), so each step is padded up to
a bucket (`decodestep.pad_rows`): the streams to a power of two, the span to a power of two
of at least `MIN_SPAN` tokens. A bucket's graph is captured the first time a step needs it,
and its inputs are copied into the bucket's own tensors before each replay. All buckets
share one memory pool: only one replays at a time.

Where a capture fails (an operation that cannot be captured, a torch without graphs), the
step runs eagerly from then on, and one `cuda_graphs_unavailable` warning says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cosyvoiced import logs
from cosyvoiced.engines.decodestep import DecodeStep, pad_rows

log = logs.get_logger("cosyvoiced.engines.cosyvoice")

MIN_SPAN = 128
# Runs before a capture, on a side stream as torch asks: they do the first-call work (cuBLAS
# handles, lazy module loading, allocator growth) that a graph cannot hold.
WARM_UP_RUNS = 2

# capture(run) -> (replay, output): `run` once captured; `replay` runs it again, on the
# same input tensors, into the same `output` tensor.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], object], torch.Tensor]]


def bucket(count: int, smallest: int = 1) -> int:
    """The smallest power of two that holds `count`, and at least `smallest`."""
    return max(smallest, 1 << max(count - 1, 0).bit_length())


class _CudaCapture:
    """torch's CUDA graph capture on `device`, all graphs in one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: object | None = None

    def __call__(self, run: Callable[[], torch.Tensor]
                 ) -> tuple[Callable[[], object], torch.Tensor]:
        with torch.cuda.device(self.device):
            return self._capture(run)

    def _capture(self, run: Callable[[], torch.Tensor]
                 ) -> tuple[Callable[[], object], torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = run()
        return graph.replay, output


@dataclass(frozen=True)
class _Graph:
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    replay: Callable[[], object]
    output: torch.Tensor


class GraphedStep:
    """A `DecodeStep` replayed from one graph per (streams, span) bucket; eager after a
    capture has failed. `capture` is torch's CUDA capture unless another is given."""

    def __init__(self, step: DecodeStep, capture: Capture | None = None) -> None:
        self.step = step
        self._capture = capture or _CudaCapture(step.pool.device)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.failure: str | None = None

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (streams, span) buckets captured so far."""
        return sorted(self._graphs)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
        if self.failure is not None:
            return self.step(tokens, positions, slots)
        streams, span = bucket(tokens.shape[0]), bucket(slots.shape[1], MIN_SPAN)
        graph = self._graphs.get((streams, span)) or self._captured(streams, span)
        if graph is None:  # its capture failed just now
            return self.step(tokens, positions, slots)
        padded = pad_rows(self.step.pool, tokens, positions, slots, streams=streams, span=span)
        for target, source in zip((graph.tokens, graph.positions, graph.slots), padded,
                                  strict=True):
            target.copy_(source)
        graph.replay()
        return graph.output[:tokens.shape[0]].clone()

    def _captured(self, streams: int, span: int) -> _Graph | None:
        pool = self.step.pool
        tokens = torch.zeros(streams, dtype=torch.long, device=pool.device)
        positions = torch.zeros(streams, dtype=torch.long, device=pool.device)
        # every row a padding row: the warm-up runs and the capture touch the scratch slot only
        slots = torch.full((streams, span), pool.scratch_slot, dtype=torch.long,
                           device=pool.device)
        try:
            replay, output = self._capture(lambda: self.step(tokens, positions, slots))
        except Exception as error:  # noqa: BLE001 - any failure falls back, and says why
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("cuda_graphs_unavailable", reason=self.failure, streams=streams,
                        span=span, message="the batched decoding step runs eagerly from "
                        "now on; engine.cosyvoice.cuda_graphs = false skips the capture")
            return None
        log.info("cuda_graph_captured", streams=streams, span=span)
        graph = _Graph(tokens, positions, slots, replay, output)
        self._graphs[(streams, span)] = graph
        return graph


__all__ = ["GraphedStep", "bucket"]
