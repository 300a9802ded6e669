"""CosyVoice2/3 serving several segments at once on one model: the engine's MultiStreamEngine
side (`open`, `step`, `close`), over the batched decoder (batched.py).

A stream's text goes through upstream's own `inference_*` front end exactly as a
`synthesize` call's does (the engine's `_plan`); only its `model.tts` calls are caught,
each giving the `model_input` of one piece of the text (upstream cuts long texts itself),
and the pieces are spoken one after another as one stream by the decoder.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from cosyvoiced import cpuflags, logs
from cosyvoiced.config import CosyVoiceConfig
from cosyvoiced.engines import StreamOutput, SynthesisRequest
from cosyvoiced.engines.batched import (
    BatchedDecoder,
    KVBudgetError,
    StreamEvent,
    StreamRequest,
)
from cosyvoiced.engines.stageclock import StageTally
from cosyvoiced.job import ErrorCode, JobFailure

log = logs.get_logger("cosyvoiced.engines.cosyvoice")

# Segments a CosyVoice2/3 worker makes at once when engine.cosyvoice.max_streams is 0. On a
# GPU one stream at batch 1 leaves it launch-bound and mostly idle, so a step for 16 costs
# little more than a step for 1 (the target: 16 streams, >= 10 audio s per wall
# s); its KV cache is small (Qwen2-0.5B in fp16: 12 KiB a token, 16 x 2048 tokens =
# 384 MiB). A CPU is compute-bound, yet a batch shares the weight reads and each step's
# Python work: measured on 2 cores (full-size v2, random weights, 46 tokens a stream), 2,
# 4 and 8 streams made 1.26x, 1.8x and 2.2x the audio of one, their first chunks 1.6x,
# 2.0x and 3.2x later. 4 is the knee, and far ahead of queueing (a 4th client behind 3
# single streams waits about 7x one's first chunk).
DEFAULT_STREAMS = {"cuda": 16, "cpu": 4}
# What upstream's `inference_*` loop reads from each output of the `model.tts` calls that
# `_pieces` catches: a placeholder of one sample (it divides by the length).
_PLACEHOLDER_SPEECH = {"tts_speech": torch.zeros(1, 1)}


def stream_count(version: int, configured: int, device_type: str, vllm: bool) -> int:
    """How many segments one worker's model makes at once: `engine.cosyvoice.max_streams`,
    or the device's default when it is 0. CosyVoice-300M's transformer LM has no batched
    decoder, nor has an LLM running in vLLM: they serve one at a time."""
    if version == 1 or vllm:
        return 1
    if configured:
        return configured
    return DEFAULT_STREAMS.get(device_type, DEFAULT_STREAMS["cpu"])


def batched_decoder(model: Any, version: int,
                    settings: CosyVoiceConfig) -> BatchedDecoder | None:
    """The batched decoder for `max_streams` > 1; None where one stream is served."""
    device = torch.device(model.device).type
    streams = stream_count(version, settings.max_streams, device,
                           vllm=hasattr(model.llm, "vllm"))
    if streams < max(settings.max_streams, 1):
        log.warning("cosyvoice_single_stream", max_streams=settings.max_streams,
                    message="CosyVoice-300M and an LLM in vLLM serve one segment at a "
                            "time per worker; add workers (worker.per_device) instead")
    if streams == 1:
        if settings.cpu_bf16:
            log.warning("cosyvoice_bf16_unused", max_streams=streams,
                        message="engine.cosyvoice.cpu_bf16 is for the batched decoder "
                                "(max_streams > 1); one segment at a time runs upstream's "
                                "own float32 code")
        return None
    try:
        return BatchedDecoder(model, streams, settings.kv_cache_bytes or None,
                              cpu_bf16=_use_bf16(settings, device),
                              cuda_graphs=settings.cuda_graphs)
    except ValueError as error:  # a sampler other than upstream's RAS, for one
        log.warning("cosyvoice_batching_unavailable", reason=str(error),
                    message="serving one segment at a time")
        return None


def _use_bf16(settings: CosyVoiceConfig, device: str) -> bool:
    """engine.cosyvoice.cpu_bf16 for this worker's batched decoder: refused (the worker does
    not load) on a CPU that would emulate bfloat16, unused on CUDA (fp16 is the switch there)."""
    if not settings.cpu_bf16:
        return False
    if device != "cpu":
        log.warning("cosyvoice_bf16_unused", device=device,
                    message="engine.cosyvoice.cpu_bf16 is for CPU workers; on CUDA, "
                            "engine.cosyvoice.fp16 is upstream's half precision")
        return False
    problem = cpuflags.bf16_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return True


@dataclass
class _Segment:
    """An open stream: the pieces of its text, made one by one by upstream's front end
    (`_pieces`), and what they need until the last one is spoken (its prompt file)."""

    pieces: Generator[dict[str, Any], None, None]
    scope: contextlib.ExitStack
    stream: bool
    speed: float
    stages: StageTally = field(default_factory=StageTally)  # all its pieces'


class StreamSet:
    """The open streams of one model, on its batched decoder. `before_step` runs before
    each decoder step (the engine's stage clock, which the decoder's calls go through)."""

    def __init__(self, model: Any, decoder: BatchedDecoder,
                 before_step: Callable[[], None]) -> None:
        self._model = model
        self._decoder = decoder
        self._before_step = before_step
        self._segments: dict[int, _Segment] = {}
        self._segment_of: dict[int, int] = {}  # the decoder's piece id: its segment's id
        self._ended: list[int] = []  # segments with no piece at all: done at the next step
        self._stream_ids = itertools.count(1)
        self._carried_hop = 0  # the hop the last piece reached (0: the first hop)

    def open(self, request: SynthesisRequest, start: Callable[[], Iterator[dict[str, Any]]],
             scope: contextlib.ExitStack) -> int:
        """Start a segment (upstream's call `start`, whose files `scope` keeps): the front
        end of its first piece runs now (so a request it cannot serve fails here), the later
        pieces' when their turn comes."""
        try:
            pieces = self._pieces(start)
            scope.callback(pieces.close)  # before the prompt file it reads goes
            first = next(pieces, None)
        except BaseException:
            scope.close()
            raise
        stream_id = next(self._stream_ids)
        segment = _Segment(pieces, scope, stream=request.stream and request.speed == 1.0,
                           speed=request.speed)
        self._segments[stream_id] = segment
        if first is None:  # a text upstream's front end leaves nothing of
            self._ended.append(stream_id)
        else:
            self._add_piece(stream_id, first, self._carried_hop if request.continues else 0)
        return stream_id

    @property
    def open_count(self) -> int:
        """Streams opened and not yet ended nor closed."""
        return len(self._segments)

    def close(self, stream_id: int) -> None:
        segment = self._segments.pop(stream_id, None)
        if segment is None:
            return
        for piece, owner in list(self._segment_of.items()):
            if owner == stream_id:
                del self._segment_of[piece]
                self._decoder.cancel(piece)
        segment.scope.close()

    def step(self) -> list[StreamOutput]:
        outputs = [StreamOutput(stream_id, done=True) for stream_id in self._ended
                   if stream_id in self._segments]
        for output in outputs:
            self._end(output.stream_id)
        self._ended.clear()
        self._before_step()
        for event in self._decoder.step():
            outputs.extend(self._outputs(event))
        return outputs

    def _outputs(self, event: StreamEvent) -> list[StreamOutput]:
        stream_id = self._segment_of.get(event.stream_id)
        if stream_id is None:  # a piece of a stream closed since
            return []
        outputs = []
        if event.audio is not None and event.audio.numel():
            outputs.append(StreamOutput(stream_id, audio=event.audio.squeeze(0).numpy()))
        if event.error is not None:
            del self._segment_of[event.stream_id]
            outputs.append(StreamOutput(stream_id, error=_stream_error(event.error)))
            self._end(stream_id)
        elif event.done:
            del self._segment_of[event.stream_id]
            outputs.extend(self._next_piece(stream_id, event.hop))
        return outputs

    def _next_piece(self, stream_id: int, hop: int) -> list[StreamOutput]:
        """A piece ended: queue the next one, carrying on with the hop this one reached as
        upstream's loop over its pieces does; or end the stream after its last."""
        self._carried_hop = hop
        try:
            with torch.inference_mode():
                piece = next(self._segments[stream_id].pieces, None)
        except Exception as error:  # noqa: BLE001 - this stream's failure, not the step's
            self._end(stream_id)
            return [StreamOutput(stream_id, error=error)]
        if piece is None:
            stages = self._segments[stream_id].stages.read()
            self._end(stream_id)
            return [StreamOutput(stream_id, done=True, stages=stages)]
        self._add_piece(stream_id, piece, hop)
        return []

    def _add_piece(self, stream_id: int, model_input: dict[str, Any], hop: int) -> None:
        segment = self._segments[stream_id]
        # Each piece draws from its own random seed (ras.counter_uniforms, HiFT's noise).
        seed = int(torch.randint(0, 1 << 62, ()).item())
        piece = self._decoder.add(StreamRequest(model_input, stream=segment.stream,
                                                speed=segment.speed, seed=seed, hop=hop,
                                                stages=segment.stages))
        self._segment_of[piece] = stream_id

    def _end(self, stream_id: int) -> None:
        segment = self._segments.pop(stream_id, None)
        if segment is not None:
            segment.scope.close()

    def _pieces(self, start: Callable[[], Iterator[dict[str, Any]]]
                ) -> Generator[dict[str, Any], None, None]:
        """The `model_input` of each piece upstream's `inference_*` call speaks, in order,
        made by upstream's own front end when the next one is asked for: its `model.tts`
        calls are caught instead of run."""
        model = self._model
        caught: list[dict[str, Any]] = []

        def tts(stream: bool = False, speed: float = 1.0,
                **model_input: Any) -> Iterator[dict[str, Any]]:
            caught.append(model_input)
            yield _PLACEHOLDER_SPEECH

        outputs: Iterator[dict[str, Any]] | None = None
        try:
            while True:
                with _replaced(model, "tts", tts), torch.inference_mode():
                    if outputs is None:
                        outputs = start()
                    if next(outputs, None) is None:
                        return
                yield caught.pop()
        finally:
            if outputs is not None and hasattr(outputs, "close"):
                outputs.close()


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` for the block (an instance attribute over its method)."""
    had = name in vars(owner)
    before = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, before)
        else:
            delattr(owner, name)


def _stream_error(error: BaseException) -> Exception:
    """What a stream's failure in the decoder is for the job."""
    if isinstance(error, KVBudgetError):
        return JobFailure(ErrorCode.TEXT_TOO_LONG, f"text: a piece of this segment needs "
                          f"more KV cache than engine.cosyvoice.kv_cache_bytes holds ({error})",
                          "text")
    if not isinstance(error, Exception):
        raise error
    return error
