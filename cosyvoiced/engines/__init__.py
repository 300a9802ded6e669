"""The engine interface: load once, list voices, turn text into a stream of audio chunks.

Engines are found through the `cosyvoiced.engines` entry-point group; each entry point names
a `load(config: EngineConfig) -> Engine` function. Only the worker process imports engines.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cosyvoiced.config import ENGINE_ENTRY_POINTS, EngineConfig
from cosyvoiced.stages import SegmentStages

AudioChunk = npt.NDArray[np.float32]


# The optional request fields an engine may understand (its `features`).
FEATURES = ("prompt_audio", "prompt_text", "instruct", "language")


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language: str
    sample_rate: int
    engine: str
    kind: str = "builtin"  # or "registered": a zero-shot speaker a client added


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str | None  # None: the voice comes from `prompt_audio`
    speed: float = 1.0
    stream: bool = False  # the client plays chunks as they come: make them small and early
    prompt_audio: str | None = None  # path of a file soundfile can read
    prompt_text: str | None = None
    instruct: str | None = None
    language: str | None = None
    # A later segment of the same job: its audio follows audio already made, so an engine
    # may carry on from the previous segment's state (CosyVoice's grown stream hop).
    continues: bool = False


class Engine(Protocol):
    """What the worker needs from a speech engine."""

    name: str
    features: frozenset[str]  # which of FEATURES it serves; the worker refuses the others

    def voices(self) -> list[VoiceInfo]:
        """The voices as of now (registered ones may come and go while it runs)."""
        ...

    def default_voice(self) -> str | None:
        """The voice for requests that name none; None if every request must bring one."""
        ...

    def sample_rate(self, voice: str | None) -> int:
        """The rate `synthesize` yields for this voice (None: a voice from prompt audio)."""
        ...

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        """Yield mono float32 chunks in [-1, 1] at `sample_rate(voice)`, as they are made.

        `request.voice` is None or one of `voices()`: the worker refuses other names first.
        Raises `JobFailure` for a request the engine cannot serve.
        """
        ...


@runtime_checkable
class StagedEngine(Protocol):
    """An engine that can say where a synthesis spent its time (stages.py)."""

    def segment_stages(self) -> SegmentStages | None:
        """The stages of the last `synthesize` that ran to its end; None if unmeasured."""
        ...


@runtime_checkable
class AlignedEngine(Protocol):
    """An engine that can say where each word of a synthesis is heard (captions.py)."""

    def segment_words(self) -> tuple[tuple[int, int], ...] | None:
        """[start, end) samples of each whitespace-separated word of the last `synthesize`'s
        text, at its native rate; None if it has no alignment for it."""
        ...


@dataclass(frozen=True)
class StreamOutput:
    """What one step made for one open stream: an audio chunk at the stream's native rate,
    its end (with its stages, if measured), or its failure (`JobFailure` for the request,
    any other exception for an engine fault). A stream ends with exactly one `done` or
    `error` output, unless it was closed first."""

    stream_id: int
    audio: AudioChunk | None = None
    done: bool = False
    error: Exception | None = None
    stages: SegmentStages | None = None


@runtime_checkable
class MultiStreamEngine(Protocol):
    """An engine that makes several segments at once on one loaded model (CosyVoice2/3's
    batched decoder): the worker opens a stream per segment and steps them all together.
    One with `max_streams` 1 is served one `synthesize` at a time, as any engine."""

    max_streams: int

    def open(self, request: SynthesisRequest) -> int:
        """Start a segment; its id. Raises `JobFailure` for a request it cannot serve."""
        ...

    def close(self, stream_id: int) -> None:
        """Drop a stream (cancelled): it is freed at the next step and says nothing more."""
        ...

    def step(self) -> list[StreamOutput]:
        """Advance every open stream by one step (one token each, and any chunk due)."""
        ...


class EngineLoader(Protocol):
    def __call__(self, config: EngineConfig) -> Engine: ...


def load_engine(config: EngineConfig) -> Engine:
    """The engine `engine.name` names: an entry point, or a `module:loader` reference."""
    if ":" in config.name:
        module, _, attribute = config.name.partition(":")
        loader: EngineLoader = getattr(importlib.import_module(module), attribute)
    else:
        (entry,) = entry_points(group=ENGINE_ENTRY_POINTS, name=config.name)
        loader = entry.load()
    return loader(config)
