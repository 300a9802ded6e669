"""Pauses written into a job's text: `[pause:0.8]` (Kokoro's form, in seconds; `[pause:800ms]`
too) and SSML's `<break time="800ms"/>` (or `time="0.8s"`).

A pause never reaches the engine: `segments` gives each one a segment of its own, and the
worker makes that segment's audio as zeros at the job's sample rate (`silence`). Anything
that looks like a pause tag but does not say how long, or says more than `MAX_PAUSE_S`, is
an `invalid_field` error when the job is validated, rather than words read aloud.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from cosyvoiced.job import ErrorCode, JobFailure, Samples

MAX_PAUSE_S = 10.0
# All of one text's pauses, at most: silence costs no characters, and a job's audio is held
# whole until it is written ("[pause:10]" 2,000 times would be 5.5 hours at 48 kHz, 3.7 GiB).
MAX_PAUSES_TOTAL_S = 300.0
# What looks like a pause tag (found case-insensitively, bounded: no backtracking blow-up).
PAUSE = re.compile(r"\[pause:[^\]\n]{0,32}\]|<break\b[^<>\n]{0,64}>", re.IGNORECASE)
# How a valid one says its length.
_LENGTH = r"(?P<value>\d{1,6}(?:\.\d{1,6})?)\s*(?P<unit>ms|s)"
_PAUSE_LENGTH = re.compile(rf"\[pause:\s*{_LENGTH}?\s*\]", re.IGNORECASE)
_BREAK_LENGTH = re.compile(rf"<break\s+time\s*=\s*(?P<quote>[\"']){_LENGTH}(?P=quote)\s*/?>",
                           re.IGNORECASE)
Span = tuple[int, int]


def length_s(tag: str) -> float | None:
    """The seconds a pause tag asks for; None if it is malformed. `[pause:N]` is in
    seconds unless it says `ms`; `<break time=...>` must name its unit, as SSML does."""
    found = _PAUSE_LENGTH.fullmatch(tag)
    if found is None:
        found = _BREAK_LENGTH.fullmatch(tag)
        if found is None:
            return None
    value = found.group("value")
    if value is None:
        return None
    unit = (found.group("unit") or "s").lower()
    return float(value) / (1000.0 if unit == "ms" else 1.0)


def found(text: str) -> Iterator[re.Match[str]]:
    return PAUSE.finditer(text)


def check(text: str, field: str = "text") -> None:
    """A `JobFailure` (invalid_field) for the first pause tag that is malformed or too long,
    or for pauses that add up to more than MAX_PAUSES_TOTAL_S."""
    total_s = 0.0
    for tag in found(text):
        seconds = length_s(tag.group())
        where = f"{field}: the pause {tag.group()!r} at character {tag.start()}"
        if seconds is None:
            raise JobFailure(ErrorCode.INVALID_FIELD, f"{where} has no length; write "
                             "[pause:0.8] (seconds) or <break time=\"800ms\"/>", field)
        if seconds > MAX_PAUSE_S:
            raise JobFailure(ErrorCode.INVALID_FIELD, f"{where} is {seconds:g} s; a pause "
                             f"may be at most {MAX_PAUSE_S:g} s", field)
        total_s += seconds
        if total_s > MAX_PAUSES_TOTAL_S:
            raise JobFailure(ErrorCode.INVALID_FIELD, f"{where} makes the pauses add up to "
                             f"{total_s:g} s; one text's may add up to at most "
                             f"{MAX_PAUSES_TOTAL_S:g} s", field)


def of_segment(segment: str) -> float | None:
    """The seconds of silence a segment stands for, if it is a pause; None if it is text."""
    tag = segment.strip()
    if not tag or tag[0] not in "[<" or PAUSE.fullmatch(tag) is None:
        return None
    return length_s(tag)


def starts_at(text: str, position: int) -> bool:
    """Whether a pause tag starts at `position`, after any whitespace."""
    return PAUSE.match(text, past_whitespace(text, position)) is not None


_BLANK = re.compile(r"\s*")


def past_whitespace(text: str, position: int) -> int:
    """The first position at or after `position` that is not whitespace. Every segment that
    starts inside a long run of spaces crosses the rest of it: the regex engine does that
    some fifty times faster than a Python loop (60,000 spaces took 4 s, not 0.1 s)."""
    blank = _BLANK.match(text, position)
    return blank.end() if blank else position


def runs(text: str, span: Span) -> list[tuple[Span, bool]]:
    """`span` of `text` as runs that tile it, each a pause tag (True) or the text between
    (False). Whitespace alone between two pauses, or at an end, goes with a pause: it
    would be an engine call with nothing to say."""
    start, end = span
    tiles: list[tuple[Span, bool]] = []
    at = start
    for tag in PAUSE.finditer(text, start, end):
        if tag.start() > at:
            tiles.append(((at, tag.start()), False))
        tiles.append(((tag.start(), tag.end()), True))
        at = tag.end()
    if at < end:
        tiles.append(((at, end), False))
    return _blank_runs_joined(text, tiles)


def _blank_runs_joined(text: str, tiles: list[tuple[Span, bool]]) -> list[tuple[Span, bool]]:
    joined: list[tuple[Span, bool]] = []
    for index, ((start, end), is_pause) in enumerate(tiles):
        blank = not is_pause and not text[start:end].strip()
        if blank and joined and joined[-1][1]:  # onto the pause before it
            joined[-1] = ((joined[-1][0][0], end), True)
        elif blank and index + 1 < len(tiles):  # onto the pause after it
            (_, next_end), _ = tiles[index + 1]
            tiles[index + 1] = ((start, next_end), True)
        else:
            joined.append(((start, end), is_pause))
    return joined


def silence(seconds: float, sample_rate: int) -> Samples:
    """`seconds` of silence at `sample_rate`, to the nearest sample."""
    return np.zeros(round(seconds * sample_rate), dtype=np.float32)
