"""Captions: when each sentence (and, where the engine aligns its audio, each word) is heard
in a job's audio, and the same as WebVTT, SubRip or JSON.

Pure functions of what the job book knows: each segment's text and sample count, and the
word spans an aligning engine reported for it (Piper: its phoneme durations summed per word).

- Segments follow each other, so a segment's start is the sum of the samples before it:
  that part is exact. A pause segment is silence: it gets no cue, and the next cue starts
  after it.
- Within a segment that holds several sentences, a sentence starts where its first word
  starts (aligned), or after its share of the segment by characters (no alignment), and
  runs up to where the next one starts; the segment's last one runs to its end. So the
  cues tile each segment's audio and the last end is the audio's end.
- Words come only from aligned segments whose spans match the text's words one to one;
  elsewhere there are none (a number that the engine reads as three words, for one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cosyvoiced import pauses, sentences
from cosyvoiced.cues import Captions, Cue, WordSpan

__all__ = ["Captions", "Cue", "SegmentAudio", "WordSpan", "build", "render"]

LEVELS = ("sentence", "word")  # `timestamps` (HTTP, ZeroMQ)
FILE_KINDS = ("vtt", "srt", "json")  # `captions` (drop folder)
# The file's extension beside the audio: OUT.json is already the result's record.
FILE_EXTENSIONS = {"vtt": "vtt", "srt": "srt", "json": "captions.json"}
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class SegmentAudio:
    """One segment as made: its text, its length, and its word spans if the engine had them."""

    text: str
    samples: int
    words: tuple[WordSpan, ...] | None = None


def build(segments: Sequence[SegmentAudio], sample_rate: int) -> Captions:
    """The cues of a job whose segments, in order, are `segments`."""
    sentence_cues: list[Cue] = []
    word_cues: list[Cue] | None = []
    offset = 0
    for segment in segments:
        if pauses.of_segment(segment.text) is None and segment.text.strip():
            said, words = _segment_cues(segment, offset, sample_rate)
            sentence_cues.extend(said)
            word_cues = None if word_cues is None or words is None else word_cues + words
        offset += segment.samples
    return Captions(tuple(sentence_cues), None if word_cues is None else tuple(word_cues))


def _segment_cues(segment: SegmentAudio, offset: int,
                  rate: int) -> tuple[list[Cue], list[Cue] | None]:
    text = segment.text
    spans = [(start, end) for start, end in sentences.sentence_spans(text)
             if text[start:end].strip()] or [(0, len(text))]
    words = [(found.group(), found.start()) for found in _WORD.finditer(text)]
    aligned = segment.words is not None and len(segment.words) == len(words)
    starts = _aligned_starts(spans, words, segment) if aligned else \
        _proportional_starts(text, spans, segment.samples)
    bounds = [*starts, segment.samples]
    cues = [Cue(" ".join(text[start:end].split()), (offset + bounds[i]) / rate,
                (offset + bounds[i + 1]) / rate) for i, (start, end) in enumerate(spans)]
    if not aligned or segment.words is None:
        return cues, None
    return cues, _word_cues(words, segment.words, segment.samples, offset, rate)


def _clamped(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def _aligned_starts(spans: list[tuple[int, int]], words: list[tuple[str, int]],
                    segment: SegmentAudio) -> list[int]:
    """Each sentence starts where its first word does; the first at the segment's start."""
    assert segment.words is not None
    starts = [0]
    for start, _end in spans[1:]:
        first = next((i for i, (_word, at) in enumerate(words) if at >= start), None)
        at = starts[-1] if first is None else segment.words[first][0]
        starts.append(_clamped(at, starts[-1], segment.samples))
    return starts


def _proportional_starts(text: str, spans: list[tuple[int, int]], samples: int) -> list[int]:
    """No alignment: each sentence gets its share of the segment by the characters it
    speaks (whitespace and engine tags left out)."""
    weights = [max(1, len("".join(sentences.TAG.sub("", text[start:end]).split())))
               for start, end in spans]
    total = sum(weights)
    starts, running = [], 0
    for weight in weights:
        starts.append(samples * running // total)
        running += weight
    return starts


def _word_cues(words: list[tuple[str, int]], spans: tuple[WordSpan, ...], samples: int,
               offset: int, rate: int) -> list[Cue]:
    """Words at their aligned places, never going backwards; the last one runs to the
    segment's end (the engine's closing silence is its tail)."""
    cues: list[Cue] = []
    floor = 0
    for i, ((word, _at), (said_from, said_to)) in enumerate(zip(words, spans, strict=True)):
        start = _clamped(said_from, floor, samples)
        end = samples if i == len(words) - 1 else _clamped(said_to, start, samples)
        cues.append(Cue(word, (offset + start) / rate, (offset + end) / rate))
        floor = end
    return cues


# -- files ----------------------------------------------------------------------------------
def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def _timed(cues: Iterable[Cue], separator: str) -> Iterable[tuple[str, str]]:
    for cue in cues:
        yield f"{_clock(cue.start, separator)} --> {_clock(cue.end, separator)}", cue.text


def to_vtt(captions: Captions) -> str:
    blocks = [f"{times}\n{text}" for times, text in _timed(captions.sentences, ".")]
    return "WEBVTT\n\n" + "".join(f"{block}\n\n" for block in blocks)


def to_srt(captions: Captions) -> str:
    return "".join(f"{n}\n{times}\n{text}\n\n"
                   for n, (times, text) in enumerate(_timed(captions.sentences, ","), 1))


def to_json(captions: Captions) -> str:
    return json.dumps(captions.to_dict(), ensure_ascii=False, indent=1) + "\n"


def render(captions: Captions, kind: str) -> bytes:
    """The caption file of `kind` (one of FILE_KINDS)."""
    renderers = {"vtt": to_vtt, "srt": to_srt, "json": to_json}
    return renderers[kind](captions).encode()
