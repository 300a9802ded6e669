"""The captions' values (captions.py makes them): apart, so that `JobResult` can carry them
without importing what makes them (that imports the job module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WordSpan = tuple[int, int]  # [start, end) samples from its segment's start


@dataclass(frozen=True)
class Cue:
    text: str
    start: float  # seconds from the audio's start
    end: float

    def to_dict(self, key: str) -> dict[str, Any]:
        return {key: self.text, "start_time": round(self.start, 3),
                "end_time": round(self.end, 3)}


@dataclass(frozen=True)
class Captions:
    sentences: tuple[Cue, ...]
    words: tuple[Cue, ...] | None  # None: the engine gave no alignment for some segment

    def to_dict(self) -> dict[str, Any]:
        return {"sentences": [cue.to_dict("text") for cue in self.sentences],
                "words": None if self.words is None else
                [cue.to_dict("word") for cue in self.words]}
