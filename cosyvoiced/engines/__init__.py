"""The engine interface: load once, list voices, turn text into a stream of audio chunks.

Engines are found through the `cosyvoiced.engines` entry-point group; each entry point names
a `load(config: EngineConfig) -> Engine` function. Only the worker process imports engines.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cosyvoiced.config import ENGINE_ENTRY_POINTS, EngineConfig

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
