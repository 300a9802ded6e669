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


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language: str
    sample_rate: int
    engine: str


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str
    speed: float = 1.0


class Engine(Protocol):
    """What the worker needs from a speech engine."""

    name: str

    def voices(self) -> list[VoiceInfo]: ...

    def default_voice(self) -> str: ...

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        """Yield mono float32 chunks in [-1, 1] at the voice's sample rate, as they are made.

        `request.voice` is always one of `voices()`: the worker refuses other names first.
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
